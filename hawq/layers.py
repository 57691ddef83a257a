"""Which modules hawq measures and quantizes: the contract every stage keys its artifacts by."""

from __future__ import annotations

from torch import nn

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear, nn.Embedding)


def quantizable_layers(model: nn.Module, types: tuple[type[nn.Module], ...] = QUANTIZABLE_TYPES) -> list[str]:
    """Names (``named_modules`` order) of modules with a weight that hawq can quantize."""
    return [name for name, m in model.named_modules() if name and isinstance(m, types)]
