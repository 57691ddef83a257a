"""Model registry (timm style): a name maps to a builder plus what the pipeline needs to know.

Every family registers a :class:`ModelSpec`: how to build it, which task scores it, and the facts
generic code would otherwise have to guess (how many classes it predicts, which batch keys feed
it, which heads exist only in training, whether it ships a tokenizer). Its ``task`` names a
:class:`~hawq.models.tasks.Task` (registered with :func:`~hawq.models.tasks.register_task`): the
loss used for the Hessian and for training, the distillation outputs and the evaluator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from hawq import HawqError, did_you_mean
from hawq.layers import quantizable_layers


def last_linear_outputs(model: nn.Module, skip: tuple[str, ...] = ()) -> int | None:
    """``out_features`` of the model's last ``nn.Linear`` outside ``skip`` (None without one)."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.startswith(skip):
            last = m
    return None if last is None else int(last.out_features)


def no_classes(model: nn.Module) -> None:
    """``num_outputs`` of a model without a classifier (encoders): nothing to match against labels."""
    return None


@dataclass
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]  # builder(num_classes=..., **kwargs) -> nn.Module
    task: str  # a registered task: "classification", "detection", "sequence_classification", "encoder"
    input_shape: tuple[int, ...]  # one example's shape (C, H, W) or (seq_len,) for text
    default_pins: dict[str, dict[str, int]] = field(default_factory=dict)
    # the quantizable layers; None: every Conv/Linear/Embedding outside ``training_only``
    layers: Callable[[nn.Module], list[str]] | None = None
    description: str = ""
    # the number of classes a built model predicts (checked against the data); None: the last
    # Linear outside ``training_only``
    num_outputs: Callable[[nn.Module], int | None] | None = None
    # a dict batch's keys that are the model's positional inputs, in order (tuple batches: ``batch[0]``)
    input_keys: tuple[str, ...] = ()
    # submodules that exist only in training (Inception-V3's auxiliary head): not quantized, left out of the
    # deployable checkpoint, whose model_info gets ``deploy_kwargs`` so the rebuilt model lacks them
    training_only: tuple[str, ...] = ()
    deploy_kwargs: dict[str, Any] = field(default_factory=dict)
    # the model ships its tokenizer files: ``data.tokenizer: <model name>`` finds them
    tokenizer: Callable[[], Path] | None = None
    # the builder loads trained weights that ship with a package (no checkpoint or pretraining needed)
    ships_weights: bool = False

    def __post_init__(self) -> None:
        heads = self.training_only
        if self.layers is None:
            self.layers = lambda model: [n for n in quantizable_layers(model) if not n.startswith(heads)]
        if self.num_outputs is None:
            self.num_outputs = lambda model: last_linear_outputs(model, heads)

    def model_inputs(self, batch: Any) -> tuple[Any, ...]:
        """The positional inputs ``model(*inputs)`` of a batch (ONNX export, tracing)."""
        if isinstance(batch, dict):
            return tuple(batch[k] for k in self.input_keys if k in batch)
        return (batch[0],)


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODELS:
        raise ValueError(f"model '{spec.name}' registered twice")
    MODELS[spec.name] = spec
    return spec


def load_builtin() -> None:
    """Import every built-in family (each registers its models and tasks)."""
    # local: the family modules import this one to register, so importing them at the top is a cycle
    from hawq.models import families  # noqa: F401


def list_models() -> list[str]:
    load_builtin()
    return sorted(MODELS)


def get_model_spec(name: str) -> ModelSpec:
    load_builtin()
    if name not in MODELS:
        raise HawqError(f"unknown model '{name}'{did_you_mean(name, MODELS)}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def shipped_tokenizer(name: str) -> Callable[[], Path] | None:
    """How to find the tokenizer folder of the registered model ``name`` when it ships one, else None."""
    load_builtin()
    spec = MODELS.get(name)
    return None if spec is None else spec.tokenizer
