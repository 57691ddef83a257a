"""Load a local checkpoint (safetensors, or a .pth/.pt read with ``weights_only=True``) into a model.

Every family uses :func:`load_checkpoint`, so a checkpoint whose keys or shapes do not match the
model fails the same way everywhere: one :class:`hawq.HawqError` line naming the first mismatches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from hawq import HawqError

# Keys a checkpoint may legitimately lack: BatchNorm step counters are not saved by every trainer.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
# Containers that trainers commonly wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_SHOW = 3  # mismatches listed per kind in the error message


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a safetensors file or of a .pth/.pt file loaded with ``weights_only=True``.

    A .pth holding ``{"state_dict": {...}}`` (or ``model``/``model_state_dict``) is unwrapped, and a
    DataParallel ``module.`` prefix on every key is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise HawqError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise HawqError(f"checkpoint {path}: unreadable safetensors file ({e})") from None
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle/zip errors come in many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HawqError(f"checkpoint {path}: cannot be read with torch.load(weights_only=True) ({first})") \
                from None
        for key in _WRAPPER_KEYS:
            if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
                state = state[key]
                break
    else:
        raise HawqError(f"checkpoint {path}: unsupported file type '{path.suffix}' (use .safetensors or .pth)")
    if not isinstance(state, Mapping) or not state:
        raise HawqError(f"checkpoint {path}: no state dict of tensors inside")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise HawqError(f"checkpoint {path}: no tensors inside")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def checkpoint_mismatches(model: nn.Module, state: Mapping[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, 'key: checkpoint shape vs model shape') of a state dict."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load ``path`` into ``model`` in place (strict on names and shapes) and return the model."""
    state = read_state_dict(path)
    missing, unexpected, shapes = checkpoint_mismatches(model, state)
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
                parts.append(f"{label} {len(items)}: {', '.join(items[:_SHOW])}{more}")
        raise HawqError(f"checkpoint {path} does not match model {type(model).__name__}: {'; '.join(parts)}")
    expected = model.state_dict()
    for k, v in state.items():
        if v.dtype != expected[k].dtype and v.is_floating_point() != expected[k].is_floating_point():
            raise HawqError(f"checkpoint {path}: tensor '{k}' has dtype {v.dtype}, model expects {expected[k].dtype}")
    model.load_state_dict(state, strict=False)  # names/shapes checked above; optional counters may be absent
    return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's state dict as safetensors, atomically (shared tensors are cloned for the format)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint
