"""Loss functions for the Hessian that need no labels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hawq.models.tasks import Task
from hawq.sensitivity.hvp import LossFn


def label_free_loss(task: Task, reference_model: nn.Module) -> LossFn:
    """``loss_fn(model, batch) = task.output_distance(f(model, batch), f(reference, batch))``.

    At ``model == reference_model`` the residual is zero, so the Hessian of this loss is exactly the
    Gauss-Newton matrix ``J^T (d^2 distance) J`` of the model outputs (for the default
    ``0.5 * ||.||^2 / batch`` distance: ``J^T J / batch``), positive semi-definite, and needs no labels.
    The reference outputs are computed without a graph, so they are constants for the Hessian.
    """

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        with torch.no_grad():
            reference = task.forward(reference_model, batch)
        reference = _detach(reference)
        return task.output_distance(task.forward(model, batch), reference)

    return loss_fn


def _detach(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v) for v in obj)
    return obj
