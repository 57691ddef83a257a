"""Tasks: the loss (for the Hessian and for training), distillation and evaluation of a family.

A batch is whatever the task's data loader yields; the task alone knows how to move it to a
device, run the model on it and score it, so the sensitivity, search and training stages stay
model-agnostic: they call ``task.loss(model, batch)`` and ``task.forward(model, batch)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hawq import HawqError, bars_off, did_you_mean
from hawq.models.registry import load_builtin


def move_to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


class Task:
    """Base task. Subclasses set ``name`` and ``primary_metric`` and implement the hooks."""

    name = "task"
    primary_metric = "score"
    higher_is_better = True
    needs_labels = True  # False: label-free (an encoder scored against its FP32 outputs)
    wider_head_ok = False  # True: a head with more classes than the data's labels still trains (detection)
    logits_output = False  # the model output is class logits (argmax = the prediction)

    reference: nn.Module | None = None  # the full-precision model, for label-free losses and metrics

    def bind_reference(self, model: nn.Module) -> None:
        """Called by the pipeline with the FP32 model before sensitivity and evaluation."""
        self.reference = model

    def to_device(self, batch: Any, device: torch.device | str) -> Any:
        return move_to(batch, device)

    def forward(self, model: nn.Module, batch: Any) -> Any:
        raise NotImplementedError

    def loss_from_outputs(self, outputs: Any, batch: Any) -> Tensor:
        raise NotImplementedError

    def output_forward(self, model: nn.Module, batch: Any) -> Any:
        """The outputs that label-free losses and distillation compare (``output_distance``,
        ``distill_loss``): ``forward``'s, unless the task's forward returns something else (detection:
        its training losses)."""
        return self.forward(model, batch)

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        return self.loss_from_outputs(self.forward(model, batch), batch)

    def distill_loss(self, student: Any, teacher: Any, temperature: float) -> Tensor:
        """KL(teacher || student) on softened logits, scaled by T^2 (Hinton et al.)."""
        t = temperature
        return F.kl_div(
            F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
            log_target=True, reduction="batchmean",
        ) * (t * t)

    def output_distance(self, outputs: Any, reference: Any) -> Tensor:
        """Label-free loss: 0.5 * mean squared distance to the reference outputs (per example)."""
        return 0.5 * (outputs - reference).pow(2).sum() / outputs.shape[0]

    def batch_size(self, batch: Any) -> int:
        first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values()))
        return len(first)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], device: torch.device | str = "cpu",
                 progress: bool = True, desc: str = "eval") -> dict[str, float]:
        raise NotImplementedError


IGNORE_INDEX = -100  # F.cross_entropy's default: a label that is skipped, not out of range


def check_pair(batch: Any, labels: bool = True) -> None:
    """A classification batch is ``(inputs, labels)`` (``(inputs,)`` to run the model): a bare tensor
    would be split along its batch dimension."""
    if not isinstance(batch, (list, tuple)) or len(batch) < (2 if labels else 1):
        raise HawqError(f"a classification batch is an (inputs, labels) pair, got {type(batch).__name__}"
                        + (f" of shape {tuple(batch.shape)}" if isinstance(batch, Tensor) else ""))


def check_labels(labels: Any, num_classes: int) -> None:
    """Integer labels are in ``0..num_classes-1`` (cross-entropy indexes with them; on a GPU a bad one
    is a device-side assert, not an error message)."""
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        return  # soft (probability) targets, or not labels at all: cross-entropy says what it needs
    outside = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= num_classes)
    if labels.numel() and bool(outside.any()):
        bad = labels[outside][0].item()
        raise HawqError(f"label {bad} is outside the model's {num_classes} classes (0..{num_classes - 1})")


TASKS: dict[str, type[Task]] = {}
T = TypeVar("T", bound=type[Task])


def register_task(cls: T) -> T:
    """Class decorator: make a task available to ``ModelSpec.task`` by its ``name``."""
    if cls.name in TASKS:
        raise ValueError(f"task '{cls.name}' registered twice")
    TASKS[cls.name] = cls
    return cls


@register_task
class ClassificationTask(Task):
    """Batches are ``(images, labels)``; metrics are top-1 accuracy in percent, top-5 (only with more
    than 5 classes) and mean loss."""

    name = "classification"
    primary_metric = "top1"
    logits_output = True

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        check_pair(batch, labels=False)
        out = model(batch[0])
        # torchvision Inception-V3 returns (logits, aux_logits) in training mode
        return out.logits if hasattr(out, "logits") else out

    def loss_from_outputs(self, outputs: Tensor, batch: Any) -> Tensor:
        check_pair(batch)
        check_labels(batch[1], outputs.shape[-1])
        return F.cross_entropy(outputs, batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], device: torch.device | str = "cpu",
                 progress: bool = True, desc: str = "eval") -> dict[str, float]:
        was_training = model.training
        model.eval()
        n = correct1 = correct5 = classes = 0
        loss_sum = 0.0
        for batch in tqdm(batches, desc=desc, disable=bars_off(progress), leave=False):
            batch = self.to_device(batch, device)
            logits = self.forward(model, batch)
            y = batch[1]
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            classes = logits.shape[1]
            k = min(5, classes)
            top = logits.topk(k, dim=1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(dim=1).sum().item()
            n += y.numel()
        model.train(was_training)
        n = max(n, 1)
        out = {"top1": 100.0 * correct1 / n, "loss": loss_sum / n, "n": n}
        if classes > 5:  # with 5 classes or fewer every label is in the top 5: 100% says nothing
            out["top5"] = 100.0 * correct5 / n
        return out


def get_task(name: str) -> Task:
    """A fresh instance of the registered task ``name`` (tasks hold per-run state: the reference model)."""
    load_builtin()  # the families register their tasks
    if name not in TASKS:
        raise HawqError(f"unknown task '{name}'{did_you_mean(name, TASKS)}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]()
