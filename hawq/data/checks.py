"""Where model and data meet: does this data set fit this model? (called by the pipeline)."""

from __future__ import annotations

from torch import nn

from hawq import HawqError
from hawq.data import DataBundle
from hawq.models.registry import ModelSpec
from hawq.models.tasks import Task

LABEL_FREE_TASKS = ("encoder",)


def model_num_outputs(model: nn.Module) -> int | None:
    """Number of classes the model predicts, or None when it has no classifier (encoders)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "classifier"):
        return int(config.num_labels)
    head = getattr(model, "head", None)
    cls_head = getattr(head, "classification_head", None)
    if cls_head is not None and hasattr(cls_head, "num_classes"):
        return int(cls_head.num_classes)
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.startswith("AuxLogits"):
            last = m
    return None if last is None else int(last.out_features)


def check_compatible(spec: ModelSpec, model: nn.Module, bundle: DataBundle) -> None:
    """Raise a one-line HawqError when the data set cannot feed this model (class count, labels)."""
    if spec.task in LABEL_FREE_TASKS:
        return
    if bundle.num_classes is None:
        raise HawqError(f"model '{spec.name}' (task {spec.task}) needs a labelled data set; "
                        f"'{(bundle.info or {}).get('name', '?')}' has no labels")
    outputs = model_num_outputs(model)
    if outputs is not None and outputs != bundle.num_classes:
        where = (bundle.info or {}).get("name", "the data set")
        if spec.task == "detection" and outputs > bundle.num_classes:
            return  # a head with more classes than the data's category ids can still be trained/evaluated
        raise HawqError(f"model '{spec.name}' predicts {outputs} classes but {where} has {bundle.num_classes}: "
                        f"set model.num_classes: {bundle.num_classes} (a new head) or use matching data")


def configure_task(task: Task, bundle: DataBundle) -> Task:
    """Let the data set pick the task's primary metric (GLUE: matthews for CoLA, f1 for MRPC/QQP)."""
    configure = getattr(task, "configure", None)
    if callable(configure):
        configure(bundle.info)
    return task
