"""Where model and data meet: does this data set fit this model? (called by the pipeline).

The model's facts come from its :class:`ModelSpec` (how many classes it predicts) and its task
(whether it needs labels, whether a wider head is fine); nothing here knows a model family.
"""

from __future__ import annotations

from torch import nn

from hawq import HawqError
from hawq.data import DataBundle
from hawq.models.registry import ModelSpec
from hawq.models.tasks import Task, get_task


def check_compatible(spec: ModelSpec, model: nn.Module, bundle: DataBundle) -> None:
    """Raise a one-line HawqError when the data set cannot feed this model (class count, labels)."""
    task = get_task(spec.task)
    if not task.needs_labels:
        return
    if bundle.num_classes is None:
        raise HawqError(f"model '{spec.name}' (task {spec.task}) needs a labelled data set; "
                        f"'{(bundle.info or {}).get('name', '?')}' has no labels")
    outputs = spec.num_outputs(model)
    if outputs is not None and outputs != bundle.num_classes:
        where = (bundle.info or {}).get("name", "the data set")
        if task.wider_head_ok and outputs > bundle.num_classes:
            return
        raise HawqError(f"model '{spec.name}' predicts {outputs} classes but {where} has {bundle.num_classes}: "
                        f"set model.num_classes: {bundle.num_classes} (a new head) or use matching data")


def configure_task(task: Task, bundle: DataBundle) -> Task:
    """Let the data set pick the task's primary metric (GLUE: matthews for CoLA, f1 for MRPC/QQP)."""
    configure = getattr(task, "configure", None)
    if callable(configure):
        configure(bundle.info)
    return task
