"""The portable per-layer bit map shared by search, quantization, training and export.

On disk (``bits.yaml``)::

    defaults: {weight: 8, activation: 8}
    layers:
      conv1: {weight: 8, activation: 8}
      layer1.0.conv1: {weight: 4, activation: 8}

Layer names are ``model.named_modules()`` names. In memory a bit map is a plain
``dict[str, LayerBits]``; layers absent from it stay in floating point.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from hawq import HawqError, did_you_mean

MIN_BITS, MAX_BITS = 2, 16
FLOAT_BITS = 32  # a layer "at 32 bits" is left in floating point


def check_bits(value: object, where: str) -> int:
    """``value`` as a bit width: an integer in MIN_BITS..MAX_BITS, or FLOAT_BITS (float)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise HawqError(f"{where}: bits must be an integer, got {value!r}")
    if value != FLOAT_BITS and not MIN_BITS <= value <= MAX_BITS:
        raise HawqError(f"{where}: bits must be in {MIN_BITS}..{MAX_BITS} (or 32 for float), got {value}")
    return value


@dataclass(frozen=True)
class LayerBits:
    weight: int
    activation: int

    def __post_init__(self) -> None:
        check_bits(self.weight, "LayerBits.weight")
        check_bits(self.activation, "LayerBits.activation")

    def as_dict(self) -> dict[str, int]:
        return {"weight": self.weight, "activation": self.activation}


BitMap = dict[str, LayerBits]


def uniform_bitmap(layers: Iterable[str], weight: int, activation: int = 8) -> BitMap:
    return {name: LayerBits(weight, activation) for name in layers}


def bitmap_from_dict(data: Mapping, valid_layers: Iterable[str] | None = None) -> BitMap:
    """Parse ``{defaults: {...}, layers: {...}}`` (or a bare ``{layer: {...}}`` map) and validate it."""
    if not isinstance(data, Mapping):
        raise HawqError("bit map: expected a mapping with 'layers' (and optional 'defaults')")
    layers = data.get("layers", data if "defaults" not in data else {})
    defaults = data.get("defaults", {}) or {}
    valid = None if valid_layers is None else list(valid_layers)
    out: BitMap = {}
    for name, spec in (layers or {}).items():
        if valid is not None and name not in valid:
            hint = did_you_mean(name, valid)
            raise HawqError(f"bit map: unknown layer '{name}'{hint}")
        if isinstance(spec, int):
            spec = {"weight": spec}
        if not isinstance(spec, Mapping):
            raise HawqError(f"bit map: layer '{name}' must map to {{weight: N, activation: N}}")
        extra = set(spec) - {"weight", "activation"}
        if extra:
            raise HawqError(f"bit map: layer '{name}' has unknown key '{sorted(extra)[0]}'")
        w = spec.get("weight", defaults.get("weight", 8))
        a = spec.get("activation", defaults.get("activation", 8))
        out[name] = LayerBits(check_bits(w, f"bit map '{name}'.weight"),
                              check_bits(a, f"bit map '{name}'.activation"))
    return out


def as_bitmap(bits: Mapping, where: str) -> BitMap:
    """A bit map given as LayerBits values or plain ``{layer: {weight: 4, activation: 8}}`` dicts."""
    if not isinstance(bits, Mapping):
        raise HawqError(f"{where}: bits must be a bit map {{layer: LayerBits or {{weight, activation}}}}, "
                        f"got {type(bits).__name__} {bits!r}"[:300])
    if all(isinstance(b, LayerBits) for b in bits.values()):
        return dict(bits)
    plain = {n: b.as_dict() if isinstance(b, LayerBits) else b for n, b in bits.items()}
    try:
        return bitmap_from_dict({"layers": plain})
    except HawqError as e:
        raise HawqError(f"{where}: {e}") from None


def bitmap_to_dict(bits: BitMap) -> dict:
    return {"layers": {name: b.as_dict() for name, b in bits.items()}}


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file + fsync + rename so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_bitmap(bits: BitMap, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(bitmap_to_dict(bits), sort_keys=False))


def load_bitmap(path: str | os.PathLike, valid_layers: Iterable[str] | None = None) -> BitMap:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise HawqError(f"bit map file not found: {path}") from None
    except yaml.YAMLError as e:
        raise HawqError(f"bit map {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    return bitmap_from_dict(data or {}, valid_layers)
