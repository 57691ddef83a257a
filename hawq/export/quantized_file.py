"""``model.safetensors``: packed integer weights + scales + bit map, rebuilt into a quantized model.

File format (see docs/export.md): a plain safetensors file. For every quantized layer ``L``

* ``L.weight.qcodes`` -- the signed integer weight codes, flattened and packed (:mod:`hawq.export.packing`);
* ``L.weight.qscale`` -- float32 weight scales exactly as ``int_weight()`` returned them
  (per-output-channel, per-group or per-tensor); weights are symmetric, so the zero point is 0;

and every other entry of the model's state dict (BN statistics, biases, float layers, the
activation quantizers' ``scale``/``zero_point`` buffers) under its own name and dtype. The
safetensors string metadata carries ``format``, ``format_version``, ``bits`` (bit map JSON),
``model_info`` (registry name + builder kwargs), ``quant_config`` and ``packing`` (per layer:
tensor names, bits, layout, shape, numel).

Loading never executes anything from the file: the header is parsed and checked by hand before
safetensors reads the tensors, and the metadata must agree with the tensors it describes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

import hawq
from hawq import HawqError
from hawq.bitmap import FLOAT_BITS, BitMap, as_bitmap, atomic_write_bytes, bitmap_from_dict, bitmap_to_dict
from hawq.export.packing import pack_codes, packed_dtype, packed_nbytes, packing_layout, unpack_codes
from hawq.quant import (
    QuantConfig,
    fold_bn,
    infer_quant_config,
    integer_layers,
    quantize_model,
    to_integer,
    weight_from_codes,
)

FORMAT_NAME = "hawq.quantized"
FORMAT_VERSION = 1
CODES_SUFFIX = ".weight.qcodes"
SCALE_SUFFIX = ".weight.qscale"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
INTEGER_PREFIX = "integer/"  # integer-only model tensors (state dict of hawq.quant.to_integer's model)
_DERIVED_FROM_CODES = ("weight_codes", "weight_mat_t", "weight_rowsum")  # rebuilt from the packed codes
REQUIRED_METADATA = ("format", "format_version", "bits", "model_info", "quant_config", "packing")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---------------------------------------------------------------------------------------------
# helpers shared with the ONNX exporter


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers with integer weights (``hawq.quant`` modules exposing ``int_weight()``), by name."""
    return {name: m for name, m in model.named_modules()
            if name and callable(getattr(m, "int_weight", None))
            and getattr(m, "weight_bits", FLOAT_BITS) < FLOAT_BITS}


def _json_meta(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise HawqError(f"{what} must be JSON-serializable ({e})") from None


def _quant_config_dict(quant_config: Any) -> dict:
    if dataclasses.is_dataclass(quant_config):
        return dataclasses.asdict(quant_config)
    if isinstance(quant_config, Mapping):
        return dict(quant_config)
    raise HawqError(f"quant_config must be a QuantConfig or a mapping, got {type(quant_config).__name__}")


# ---------------------------------------------------------------------------------------------
# save


def sorted_metadata(data: bytes) -> bytes:
    """The same safetensors file with its ``__metadata__`` keys sorted.

    safetensors writes the metadata from a hash map, in an order that changes from process to
    process; sorted, two identical saves are byte-identical. Tensor offsets are relative to the
    end of the header, so only the header (re-padded to 8 bytes, as safetensors does) changes.
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def save_quantized(model: nn.Module, bits: BitMap, path: str | os.PathLike, model_info: dict,
                   quant_config: Any = None, integer: bool | None = None,
                   example_input: torch.Tensor | None = None) -> dict:
    """Write ``model`` (quantized by ``hawq.quant.quantize_model`` with ``bits``) to ``path`` atomically.

    ``model_info`` is ``{"name": registry name, "kwargs": builder kwargs}`` (extra JSON keys are
    kept); ``quant_config`` is the ``QuantConfig`` used (default: read back from the model's
    modules, :func:`infer_quant_config`). Returns a size summary: ``file_bytes``,
    ``header_bytes``, ``packed_weight_bytes`` (integer codes), ``scale_bytes``,
    ``ilp_weight_bytes`` (``sum(numel * bits / 8) + 4 * scales``, the size the bit allocation
    assumes), ``other_tensor_bytes`` (everything stored in float/native dtype), ``integer_bytes``,
    ``integer`` (whether the integer model was stored) and ``quantized_layers``.

    ``integer``: also store the integer-only model's requantization constants (dyadic multipliers
    and shifts, int32 biases, BN/residual rescaling; see :func:`integer_tensors`) so that
    ``load_quantized(path, integer=True)`` returns exactly ``hawq.quant.to_integer(model)``.
    ``None`` stores them when the model converts and records why not otherwise; ``True`` requires
    it. ``example_input`` (one batch) is passed to ``to_integer``; its shape is recorded.
    """
    path = Path(path)
    if path.is_dir():
        raise HawqError(f"save_quantized: {path} is a folder; give a file path such as {path / 'model.safetensors'}")
    bits = as_bitmap(bits, "save_quantized")
    if not isinstance(model_info, Mapping):
        raise HawqError("model_info must be a dict like {'name': ..., 'kwargs': {...}}")
    kwargs = model_info.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise HawqError("model_info['kwargs'] must be a dict of builder keyword arguments")
    if quant_config is None:
        quant_config = infer_quant_config(model)
    bn_folded = infer_quant_config(model).fold_bn
    if bn_folded:
        # A QuantBnConv2d quantizes ``W * gamma / sigma``, not its stored ``W``: export the folded
        # convs (what inference runs) and fold the same way again when loading.
        model = fold_bn(copy.deepcopy(model))
    layers = quantized_layers(model)
    expected = {name for name, b in bits.items() if b.weight != FLOAT_BITS}
    if set(layers) != expected:
        missing = sorted(expected - set(layers)) or sorted(set(layers) - expected)
        raise HawqError(f"model and bit map disagree on which layers are quantized (first: '{missing[0]}'); "
                        "quantize the model with this bit map before saving")

    tensors: dict[str, torch.Tensor] = {}
    packing: dict[str, dict] = {}
    packed_bytes = scale_bytes = 0
    ilp_bytes = 0.0
    for name, layer in layers.items():
        b = int(layer.weight_bits)
        if b != bits[name].weight:
            raise HawqError(f"layer '{name}' is quantized to {b} bits but the bit map says "
                            f"{bits[name].weight}")
        with torch.no_grad():
            codes, scale = layer.int_weight()
        codes_name, scale_name = name + CODES_SUFFIX, name + SCALE_SUFFIX
        packed = pack_codes(codes, b)
        scale32 = scale.detach().to(torch.float32).cpu().contiguous().clone()
        tensors[codes_name], tensors[scale_name] = packed, scale32
        packing[name] = {"codes": codes_name, "scale": scale_name, "bits": b, "layout": packing_layout(b),
                         "shape": list(codes.shape), "numel": int(codes.numel()),
                         "scale_shape": list(scale32.shape), "group_size": getattr(layer, "group_size", None)}
        packed_bytes += packed.numel() * packed.element_size()
        scale_bytes += scale32.numel() * 4
        ilp_bytes += codes.numel() * b / 8 + scale32.numel() * 4

    other_bytes = 0
    skip = {name + ".weight" for name in layers}
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        if key in tensors:
            raise HawqError(f"state dict key '{key}' collides with a packed-weight tensor name")
        # Clone: safetensors refuses tensors that share storage (tied weights).
        tensors[key] = value.detach().cpu().contiguous().clone()
        other_bytes += value.numel() * value.element_size()

    integer_info = {"stored": False, "reason": "not requested"}
    integer_bytes = 0
    if integer is None or integer:
        try:
            int_tensors = integer_tensors(model, tensors, packing, example_input)
        except Exception as e:  # noqa: BLE001 -- optional part: any failure is recorded, not fatal
            if integer:
                raise
            integer_info["reason"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        else:
            for key, value in int_tensors.items():
                tensors[INTEGER_PREFIX + key] = value
                integer_bytes += value.numel() * value.element_size()
            integer_info = {"stored": True, "example_shape": None if example_input is None
                            else list(example_input.shape)}

    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "hawq_version": hawq.__version__,
        "bits": _json_meta(bitmap_to_dict(bits), "bit map"),
        "model_info": _json_meta(dict(model_info), "model_info"),
        "quant_config": _json_meta(_quant_config_dict(quant_config), "quant_config"),
        "packing": _json_meta(packing, "packing"),
        "bn_folded": "true" if bn_folded else "false",
        "integer": _json_meta(integer_info, "integer"),
    }
    data = sorted_metadata(safetensors_save(tensors, metadata=metadata))
    atomic_write_bytes(path, data)
    (header_len,) = struct.unpack("<Q", data[:8])
    return {
        "path": str(path), "file_bytes": len(data), "header_bytes": 8 + header_len,
        "packed_weight_bytes": packed_bytes, "scale_bytes": scale_bytes,
        "ilp_weight_bytes": int(round(ilp_bytes)), "other_tensor_bytes": other_bytes,
        "integer_bytes": integer_bytes, "integer": integer_info["stored"], "quantized_layers": len(layers),
    }


def integer_tensors(model: nn.Module, packed: Mapping[str, torch.Tensor], packing: Mapping[str, dict],
                    example_input: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The state dict of ``hawq.quant.to_integer(model)`` minus what the packed codes already hold.

    Kept: dyadic multipliers/shifts (``in_mult``, ``in_shift``, ``mult_*``, ``shift_*``), int32
    biases, BN gains, activation and output scales. Dropped: each layer's ``weight_codes`` and the
    buffers derived from them (``weight_mat_t``, ``weight_rowsum``): ``to_integer`` takes its codes
    from ``int_weight()``, the same function that wrote the packed codes.
    """
    int_model = to_integer(model, example_input)
    for name, layer in integer_layers(int_model).items():
        info = packing.get(name)
        if info is None:
            raise HawqError(f"integer model layer '{name}' has no packed weights")
        stored = unpack_codes(packed[info["codes"]], info["bits"], info["numel"])
        if not torch.equal(layer.weight_codes.reshape(-1).to(torch.int32), stored):
            raise HawqError(f"integer model layer '{name}' does not use the packed weight codes")
    return {key: value.detach().cpu().contiguous().clone() for key, value in int_model.state_dict().items()
            if key.rpartition(".")[2] not in _DERIVED_FROM_CODES}


def _set_codes(layer: nn.Module, codes: torch.Tensor) -> None:
    """Replace an integer layer's weight codes and the GEMM buffers ``hawq.quant.integer`` derives from them."""
    layer.weight_codes.copy_(codes)
    matrix = codes.reshape(codes.shape[0], -1)
    if getattr(layer, "weight_mat_t", None) is not None:
        layer.weight_mat_t.copy_(matrix.t())
    if getattr(layer, "weight_rowsum", None) is not None:
        layer.weight_rowsum.copy_(matrix.to(torch.int64).sum(1).to(layer.weight_rowsum.dtype))


def _load_integer(path: Path, model: nn.Module, tensors: Mapping[str, torch.Tensor], meta: dict) -> nn.Module:
    info = meta["integer"]
    if not info.get("stored"):
        raise HawqError(f"{path}: the file holds no integer model ({info.get('reason', 'not stored')})")
    shape = info.get("example_shape")
    int_model = to_integer(model, None if shape is None else torch.zeros(shape))
    stored = {k[len(INTEGER_PREFIX):]: v for k, v in tensors.items() if k.startswith(INTEGER_PREFIX)}
    # Files written before the codes were computed once (integer codes then came from float64) carry
    # sparse "code patches" from the packed codes to their integer model's codes; new files have none.
    patches = {k: stored.pop(k) for k in [k for k in stored if ".weight_codes_patch_" in k]}
    module_path = {id(m): n for n, m in int_model.named_modules()}
    applied = set()
    with torch.no_grad():
        for name, layer in integer_layers(int_model).items():
            p = meta["packing"][name]
            codes = unpack_codes(tensors[p["codes"]], p["bits"], p["numel"])
            if not torch.equal(layer.weight_codes.reshape(-1).to(torch.int32), codes):
                raise HawqError(f"{path}: integer layer '{name}' does not reproduce the packed codes")
            prefix = module_path[id(layer)] + ".weight_codes_patch_"
            if prefix + "index" in patches:
                index, value = patches[prefix + "index"], patches.get(prefix + "value")
                if value is None or index.shape != value.shape or index.dtype != torch.int64 or (
                        index.numel() and (int(index.min()) < 0 or int(index.max()) >= codes.numel())):
                    raise HawqError(f"{path}: invalid integer code patch for layer '{name}'")
                patched = layer.weight_codes.reshape(-1).clone()
                patched[index] = value.to(patched.dtype)
                _set_codes(layer, patched.reshape(layer.weight_codes.shape))
                applied.update((prefix + "index", prefix + "value"))
    if set(patches) - applied:
        raise HawqError(f"{path}: integer code patch '{sorted(set(patches) - applied)[0]}' matches no layer")
    state = int_model.state_dict()
    extra = sorted(set(stored) - set(state))
    if extra:
        raise HawqError(f"{path}: integer tensor '{extra[0]}' does not exist in the rebuilt integer model")
    for key, value in state.items():
        if key in stored:
            if stored[key].shape != value.shape or stored[key].dtype != value.dtype:
                raise HawqError(f"{path}: integer tensor '{key}' has the wrong shape or dtype")
        elif key.rpartition(".")[2] not in _DERIVED_FROM_CODES:
            raise HawqError(f"{path}: integer tensor '{key}' is missing")
    int_model.load_state_dict({**state, **stored}, strict=True)
    return int_model


# ---------------------------------------------------------------------------------------------
# read + validate


def _check_header(path: Path, data: bytes) -> dict:
    """Parse the safetensors header by hand so every malformed file gets one clear line."""
    header_len = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
    plausible = 0 < header_len <= min(MAX_HEADER_BYTES, len(data) - 8)
    raw = data[8:8 + header_len] if plausible else b""
    if not raw.lstrip().startswith(b"{"):
        # Not a safetensors header: say what the file looks like instead (nothing is unpickled).
        if data[:4] == b"PK\x03\x04":
            raise HawqError(f"{path}: is a zip archive (torch.save checkpoint?), not safetensors; "
                            "refusing it")
        if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            raise HawqError(f"{path}: is a pickle file, not safetensors; refusing to unpickle it")
        if 0 < header_len < MAX_HEADER_BYTES and header_len > len(data) - 8:
            raise HawqError(f"{path}: truncated safetensors file (header claims {header_len} bytes, "
                            f"file has {len(data)})")
        raise HawqError(f"{path}: not a safetensors file")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HawqError(f"{path}: safetensors header is not valid JSON (truncated or corrupt file)") from None
    if not isinstance(header, dict):
        raise HawqError(f"{path}: safetensors header is not a JSON object")
    body = len(data) - 8 - header_len
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise HawqError(f"{path}: safetensors entry '{key}' has no valid data_offsets")
        end = max(end, offsets[1])
    if end > body:
        raise HawqError(f"{path}: truncated file (tensor data needs {end} bytes, only {body} present)")
    if end < body:
        raise HawqError(f"{path}: {body - end} unexpected trailing bytes after the tensor data")
    return header


def _meta_json(meta: Mapping[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError:
        raise HawqError(f"{path}: metadata '{key}' is not valid JSON") from None


def read_quantized_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validated tensors and decoded metadata (``bits`` as a BitMap, JSON fields parsed) of a hawq file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise HawqError(f"quantized model file not found: {path}") from None
    except IsADirectoryError:
        raise HawqError(f"{path}: is a directory, expected a model.safetensors file") from None
    header = _check_header(path, data)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise HawqError(f"{path}: safetensors file without hawq metadata (format != '{FORMAT_NAME}')")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise HawqError(f"{path}: metadata lacks '{missing[0]}'")
    if meta["format_version"] != str(FORMAT_VERSION):
        raise HawqError(f"{path}: format version {meta['format_version']} is not supported "
                        f"(this hawq reads version {FORMAT_VERSION})")
    for key, info in header.items():
        if key != "__metadata__" and info.get("dtype") not in _ST_DTYPES:
            raise HawqError(f"{path}: tensor '{key}' has unsupported dtype {info.get('dtype')!r}")
    try:
        tensors = safetensors_load(data)
    except SafetensorError as e:
        raise HawqError(f"{path}: invalid safetensors data ({str(e).splitlines()[0]})") from None

    decoded = {key: _meta_json(meta, key, path) for key in ("bits", "model_info", "quant_config", "packing")}
    bits = bitmap_from_dict(decoded["bits"])
    packing = decoded["packing"]
    if not isinstance(packing, dict):
        raise HawqError(f"{path}: metadata 'packing' must be a JSON object")
    quantized = {name for name, b in bits.items() if b.weight != FLOAT_BITS}
    if set(packing) != quantized:
        odd = sorted(set(packing) ^ quantized)[0]
        raise HawqError(f"{path}: metadata 'packing' and 'bits' disagree about layer '{odd}'")
    for name, info in packing.items():
        _check_packing_entry(path, name, info, bits[name].weight, tensors)
    decoded["bits"] = bits
    decoded["integer"] = _meta_json(meta, "integer", path) if "integer" in meta else {"stored": False}
    if not isinstance(decoded["integer"], dict):
        raise HawqError(f"{path}: metadata 'integer' must be a JSON object")
    has_int = any(k.startswith(INTEGER_PREFIX) for k in tensors)
    if has_int != bool(decoded["integer"].get("stored")):
        raise HawqError(f"{path}: metadata 'integer' and the integer/ tensors disagree")
    if meta.get("bn_folded", "false") not in ("true", "false"):
        raise HawqError(f"{path}: metadata 'bn_folded' must be 'true' or 'false'")
    decoded["bn_folded"] = meta.get("bn_folded") == "true"
    decoded["format_version"] = int(meta["format_version"])
    decoded["hawq_version"] = meta.get("hawq_version", "")
    return tensors, decoded


def _check_packing_entry(path: Path, name: str, info: Any, bits: int,
                         tensors: dict[str, torch.Tensor]) -> None:
    keys = ("codes", "scale", "bits", "layout", "shape", "numel", "scale_shape", "group_size")
    if not isinstance(info, dict) or any(k not in info for k in keys):
        raise HawqError(f"{path}: packing entry of '{name}' must have keys {', '.join(keys)}")
    if info["bits"] != bits:
        raise HawqError(f"{path}: layer '{name}' is packed at {info['bits']} bits but the bit map "
                        f"says {bits}")
    shape = info["shape"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise HawqError(f"{path}: packing entry of '{name}' has an invalid shape {shape!r}")
    numel = 1
    for d in shape:
        numel *= d
    group = info["group_size"]
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise HawqError(f"{path}: packing entry of '{name}' has an invalid group_size {group!r}")
    if info["numel"] != numel or info["layout"] != packing_layout(bits):
        raise HawqError(f"{path}: packing entry of '{name}' is inconsistent (numel/layout vs shape/bits)")
    codes, scale = tensors.get(info["codes"]), tensors.get(info["scale"])
    if codes is None or scale is None:
        raise HawqError(f"{path}: tensors for layer '{name}' are missing "
                        f"('{info['codes']}' / '{info['scale']}')")
    expected_len = numel if info["layout"] != "bitstream_lsb" else packed_nbytes(numel, bits)
    if codes.dtype != packed_dtype(bits) or codes.numel() != expected_len:
        raise HawqError(f"{path}: tensor '{info['codes']}' is {codes.dtype}[{codes.numel()}], metadata says "
                        f"{packed_dtype(bits)}[{expected_len}]")
    if scale.dtype != torch.float32 or list(scale.shape) != info["scale_shape"]:
        raise HawqError(f"{path}: tensor '{info['scale']}' does not match its metadata "
                        f"(float32 {info['scale_shape']})")
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise HawqError(f"{path}: weight scales of '{name}' must be finite and positive")


# ---------------------------------------------------------------------------------------------
# load


def _build_from_info(model_info: Mapping) -> nn.Module:
    from hawq.models import get_model_spec

    name = model_info.get("name")
    kwargs = model_info.get("kwargs", {})
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise HawqError("model_info in the file lacks a registry 'name' / 'kwargs'; "
                        "pass build=... to load it")
    return get_model_spec(name).builder(**kwargs)


def unpacked_state_dict(tensors: Mapping[str, torch.Tensor],
                        packing: Mapping[str, dict]) -> dict[str, torch.Tensor]:
    """The model state dict: packed layers turned back into float weights, the rest as stored."""
    state: dict[str, torch.Tensor] = {}
    packed_names = set()
    for name, info in packing.items():
        codes = unpack_codes(tensors[info["codes"]], info["bits"], info["numel"]).reshape(info["shape"])
        state[name + ".weight"] = weight_from_codes(codes, tensors[info["scale"]], info["bits"],
                                                    info["group_size"])
        packed_names.update((info["codes"], info["scale"]))
    for key, value in tensors.items():
        if key not in packed_names and not key.startswith(INTEGER_PREFIX):
            state[key] = value
    return state


def _verify_codes(path: Path, model: nn.Module, tensors: Mapping[str, torch.Tensor],
                  packing: Mapping[str, dict]) -> None:
    """The rebuilt layers must quantize to exactly the stored codes and scales."""
    layers = quantized_layers(model)
    for name, info in packing.items():
        if name not in layers:
            raise HawqError(f"{path}: layer '{name}' was not quantized when the model was rebuilt")
        with torch.no_grad():
            codes, scale = layers[name].int_weight()
        stored = unpack_codes(tensors[info["codes"]], info["bits"], info["numel"]).reshape(info["shape"])
        if not (torch.equal(codes.to(torch.int32), stored)
                and torch.equal(scale.to(torch.float32), tensors[info["scale"]])):
            raise HawqError(f"{path}: layer '{name}' does not reproduce its stored integer weights "
                            "after loading")


def load_quantized(path: str | os.PathLike, build: Callable[[dict], nn.Module] | None = None,
                   integer: bool = False) -> nn.Module:
    """Rebuild the quantized model stored by :func:`save_quantized` (in eval mode).

    The architecture comes from ``hawq.models.get_model_spec(model_info['name']).builder(**kwargs)``
    unless ``build(model_info)`` is given; it is then quantized with the stored bit map and
    ``QuantConfig`` and loaded with the unpacked weights and activation ranges. ``integer=True``
    returns the integer-only model (``hawq.quant.to_integer``) with the stored requantization
    constants, identical to ``to_integer`` of the model that was saved.
    """
    path = Path(path)
    tensors, meta = read_quantized_file(path)
    model = build(meta["model_info"]) if build is not None else _build_from_info(meta["model_info"])
    if not isinstance(model, nn.Module):
        raise HawqError(f"build returned {type(model).__name__}, expected an nn.Module")
    known = {f.name for f in dataclasses.fields(QuantConfig)}
    unknown = sorted(set(meta["quant_config"]) - known)
    if unknown:
        raise HawqError(f"{path}: quant_config key '{unknown[0]}' is unknown to this hawq version")
    cfg = QuantConfig(**meta["quant_config"])
    model = quantize_model(model, meta["bits"], cfg)
    if meta["bn_folded"]:
        model = fold_bn(model)
    state = unpacked_state_dict(tensors, meta["packing"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise HawqError(f"{path}: tensors do not match the rebuilt model ({detail[:300]})") from None
    _verify_codes(path, model, tensors, meta["packing"])
    model.eval()
    return _load_integer(path, model, tensors, meta) if integer else model
