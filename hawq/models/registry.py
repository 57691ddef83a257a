"""Model registry (timm style): a name maps to a builder plus what the pipeline needs to know.

Every family registers a :class:`ModelSpec`. Its ``task`` names a :class:`Task` from
``hawq.models.tasks``: the task owns the loss used for the Hessian and for training, the
teacher/student outputs used for distillation, and the evaluator.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hawq import HawqError
from hawq.layers import quantizable_layers


@dataclass
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]  # builder(num_classes=..., **kwargs) -> nn.Module
    task: str  # "classification", "detection", "sequence_classification", "encoder"
    input_shape: tuple[int, ...]  # one example's shape (C, H, W) or (seq_len,) for text
    default_pins: dict[str, dict[str, int]] = field(default_factory=dict)
    layers: Callable[[nn.Module], list[str]] = quantizable_layers
    description: str = ""
    # Submodules that only exist for training (Inception-V3's auxiliary head): left out of the
    # deployable checkpoint, whose model_info gets ``deploy_kwargs`` so the rebuilt model lacks them.
    training_only: tuple[str, ...] = ()
    deploy_kwargs: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODELS:
        raise ValueError(f"model '{spec.name}' registered twice")
    MODELS[spec.name] = spec
    return spec


def _load_builtin() -> None:
    # Importing a family module registers it; families with optional dependencies register lazily.
    from hawq.models import families  # noqa: F401


def list_models() -> list[str]:
    _load_builtin()
    return sorted(MODELS)


def get_model_spec(name: str) -> ModelSpec:
    _load_builtin()
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise HawqError(f"unknown model '{name}'{hint}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]
