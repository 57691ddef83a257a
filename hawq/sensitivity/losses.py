"""Loss functions for the Hessian that need no labels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hawq.models.tasks import Task


def label_free_loss(task: Task, reference_model: nn.Module) -> OutputLoss:
    """``loss_fn(model, batch) = task.output_distance(f(model, batch), f(reference, batch))``.

    At ``model == reference_model`` the residual is zero, so the Hessian of this loss is exactly the
    Gauss-Newton matrix ``J^T (d^2 distance) J`` of the model outputs (for the default
    ``0.5 * ||.||^2 / batch`` distance: ``J^T J / batch``), positive semi-definite, and needs no labels.
    The reference outputs are computed without a graph, so they are constants for the Hessian.
    """

    def distance(outputs: Any, batch: Any) -> Tensor:
        with torch.no_grad():
            reference = task.output_forward(reference_model, batch)
        return task.output_distance(outputs, _detach(reference))

    return OutputLoss(task.output_forward, distance)


def _detach(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v) for v in obj)
    return obj


@dataclass(frozen=True)
class OutputLoss:
    """A loss of the model outputs: ``loss_fn(model, batch) = loss(forward(model, batch), batch)``.

    Callable like any ``loss_fn``; the split into model outputs and a loss on them is what lets
    :func:`hawq.sensitivity.hessian_traces` compute exact Gauss-Newton traces (docs/sensitivity.md).
    """

    forward: Callable[[nn.Module, Any], Any]
    loss: Callable[[Any, Any], Tensor]

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        return self.loss(self.forward(model, batch), batch)


def task_loss(task: Task) -> OutputLoss:
    """The task's training loss, split into ``task.forward`` and ``task.loss_from_outputs``."""
    return OutputLoss(task.forward, task.loss_from_outputs)
