"""Per-layer costs of a model: MACs, parameter counts, model size, BOPS and weight perturbations.

Conventions (see docs/search.md for the derivation against HAWQ-V3's table):

* MB is 2**20 bytes.
* Model size: each quantized layer's weight at its weight bits, plus one 32-bit scale per output
  channel (per group when grouped, one per tensor when per-tensor), plus every other parameter
  (BN affine, biases, unquantized layers) at 32 bits. Buffers (BN running statistics) are not
  counted: they fold into the integer requantization and are not model parameters.
  ``bits=32`` uniform means everything at 32 bits and no scales.
* BOPS (in G = 1e9): sum over the quantizable layers of ``MACs * w_bits * a_bits`` for one example;
  a layer left in float counts 32 x 32; embeddings have no MACs. Uniform integer bits ``b`` means
  ``W b A b`` (HAWQ-V3's table: INT8 = W8A8, FP32 = 32 x 32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hawq import HawqError, bars_off
from hawq.bitmap import FLOAT_BITS, BitMap, as_bitmap, check_bits
from hawq.layers import quantizable_layers

MB = 2**20  # bytes
SCALE_BITS = 32  # one fp32 scale per output channel / group
GROUPED_KINDS = ("linear", "embedding")  # group_size applies to these (Q-BERT); convs stay per-channel


@dataclass
class LayerCost:
    """What one quantizable layer costs, measured from one traced forward.

    ``macs`` and ``out_shape`` are per example (the traced batch dimension is divided out); a layer
    called several times in one forward (shared heads, weight tying) sums its MACs over calls.
    """

    name: str
    kind: str  # "conv2d", "linear", "embedding", ... (lower-cased module class name)
    params: int  # all parameters of the module (weight + bias)
    macs: int
    out_shape: tuple
    weight_numel: int
    out_channels: int  # size of the weight's first axis: the per-channel scale axis


def _module_kind(module: nn.Module) -> str:
    return type(module).__name__.lower()


def _macs_per_output(module: nn.Module) -> int:
    """MACs per output element: the weight fan-in (0 for lookups)."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return 0
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return module.weight[0].numel()  # (C_in / groups) * prod(kernel)
    raise HawqError(f"layer_costs: cannot count MACs of {type(module).__name__} "
                    "(supported: Conv, Linear, Embedding)")


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        for item in out:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def layer_costs(model: nn.Module, forward_fn: Callable[[nn.Module], Any],
                layers: list[str] | None = None) -> dict[str, LayerCost]:
    """Trace one forward (``forward_fn(model)`` runs the model on an example batch) with forward hooks.

    The model runs in eval mode under ``torch.no_grad`` (BN statistics untouched; the training flag
    is restored afterwards). Layers the forward never reaches get ``macs=0`` and ``out_shape=()``.
    """
    names = quantizable_layers(model) if layers is None else list(layers)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise HawqError(f"layer_costs: unknown layer '{unknown[0]}'")
    macs: dict[str, int] = {n: 0 for n in names}
    shapes: dict[str, tuple] = {n: () for n in names}
    handles = []

    def make_hook(name: str, per_output: int) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            out = _first_tensor(output)
            if out is None:
                return
            # Batched outputs put the batch first: (N, C, H, W) for convs, (N, ..., F) for linears.
            batched = out.dim() >= 2
            batch = out.shape[0] if batched else 1
            per_example = out.numel() // max(batch, 1)
            macs[name] += per_example * per_output
            if not shapes[name]:
                shapes[name] = tuple(out.shape[1:]) if batched else tuple(out.shape)
        return hook

    for n in names:
        handles.append(modules[n].register_forward_hook(make_hook(n, _macs_per_output(modules[n]))))
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            forward_fn(model)
    finally:
        for h in handles:
            h.remove()
        for m, flag in was_training.items():
            m.training = flag
    out: dict[str, LayerCost] = {}
    for n in names:
        m = modules[n]
        weight = m.weight
        out[n] = LayerCost(
            name=n, kind=_module_kind(m), params=sum(p.numel() for p in m.parameters(recurse=False)),
            macs=int(macs[n]), out_shape=shapes[n], weight_numel=weight.numel(), out_channels=weight.shape[0],
        )
    return out


def num_scales(weight_shape: tuple | torch.Size, kind: str, per_channel: bool = True,
               group_size: int | None = None) -> int:
    """How many fp32 scales a quantized weight carries (matches ``hawq.quant.quantize_weight``)."""
    if group_size is not None and kind in GROUPED_KINDS:  # groups run along the last dim
        return math.prod(int(s) for s in weight_shape[:-1]) * math.ceil(int(weight_shape[-1]) / group_size)
    return int(weight_shape[0]) if per_channel else 1


def _resolve_bits(model: nn.Module, bits: int | BitMap, layers: Iterable[str] | None,
                  where: str) -> dict[str, tuple[int, int]]:
    """Layer -> (weight bits, activation bits) for the layers that are quantized (not float)."""
    modules = dict(model.named_modules())
    if isinstance(bits, int) and not isinstance(bits, bool):
        check_bits(bits, where)
        if bits == FLOAT_BITS:
            return {}
        names = quantizable_layers(model) if layers is None else list(layers)
        for name in names:
            if name not in modules:
                raise HawqError(f"{where}: unknown layer '{name}' in layers")
        return {n: (bits, bits) for n in names}
    out = {}
    for name, lb in as_bitmap(bits, where).items():
        if name not in modules:
            raise HawqError(f"{where}: unknown layer '{name}' in bit map")
        out[name] = (lb.weight, lb.activation)
    return out


def model_size_mb(model: nn.Module, bits: int | BitMap, layers: list[str] | None = None,
                  per_channel: bool = True, group_size: int | None = None) -> float:
    """Model size in MB (2**20 bytes) with the module docstring's convention.

    ``bits`` is one width for every layer in ``layers`` (default: all quantizable layers; 32 =
    everything float) or a bit map (layers absent from it, or at 32 bits, stay float).
    """
    quantized = {n: wa[0] for n, wa in _resolve_bits(model, bits, layers, "model_size_mb").items()
                 if wa[0] != FLOAT_BITS}
    modules = dict(model.named_modules())
    quantized_weight_ids: dict[int, tuple[int, int]] = {}  # id(weight) -> (bits, scales)
    for name, w_bits in quantized.items():
        m = modules[name]
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise HawqError(f"model_size_mb: layer '{name}' has no weight to quantize")
        quantized_weight_ids[id(w)] = (w_bits, num_scales(w.shape, _module_kind(m), per_channel, group_size))
    total_bits = 0
    for p in model.parameters():  # parameters() deduplicates shared (tied) tensors
        if id(p) in quantized_weight_ids:
            w_bits, scales = quantized_weight_ids[id(p)]
            total_bits += w_bits * p.numel() + SCALE_BITS * scales
        else:
            total_bits += FLOAT_BITS * p.numel()
    return total_bits / 8 / MB


def _example_forward(model: nn.Module, input_shape: tuple) -> Callable[[nn.Module], Any]:
    # Token models (first quantizable layer an embedding) take integer ids, everything else floats.
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))), None)
    dtype = torch.long if isinstance(first, nn.Embedding) else torch.float32
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return lambda m: m(torch.zeros((1, *input_shape), dtype=dtype, device=device))


def _trace_costs(model: nn.Module, input_shape: tuple) -> dict[str, LayerCost]:
    """layer_costs at one example of ``input_shape`` (no batch dimension); a shape the model rejects is a HawqError."""
    try:
        return layer_costs(model, _example_forward(model, input_shape))
    except HawqError:
        raise
    except Exception as e:  # noqa: BLE001 -- the model's own error, whatever its type, means a bad shape
        hint = f"; did you mean input_shape={input_shape[1:]}?" if len(input_shape) > 1 and input_shape[0] == 1 else ""
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise HawqError(f"bops_g: input_shape is one example's shape without the batch dimension, e.g. (3, 224, 224); "
                        f"the model rejects a batch of shape (1, *{input_shape}) ({first}){hint}") from None


def bops_g(model: nn.Module, bits: int | BitMap, input_shape: tuple | None = None,
           costs: dict[str, LayerCost] | None = None) -> float:
    """Bit operations in G (1e9) for one example: sum of ``MACs * w_bits * a_bits`` over the layers.

    The layers are ``costs``' keys (or all quantizable layers traced at ``input_shape``). With
    uniform ``bits`` b every layer is ``W b A b``; with a bit map, absent layers count 32 x 32.
    """
    if isinstance(bits, int) and not isinstance(bits, bool):
        check_bits(bits, "bops_g")
    else:
        bits = as_bitmap(bits, "bops_g")
    if costs is None:
        if input_shape is None:
            raise HawqError("bops_g: pass costs= (from layer_costs) or input_shape=")
        costs = _trace_costs(model, tuple(input_shape))
    if isinstance(bits, dict):
        unknown = [n for n in bits if n not in costs]
        if unknown:
            raise HawqError(f"bops_g: layer '{unknown[0]}' of the bit map has no cost entry")
    total = 0
    for name, c in costs.items():
        if isinstance(bits, int):
            w, a = bits, bits
        elif name in bits:
            w, a = bits[name].weight, bits[name].activation
        else:
            w, a = FLOAT_BITS, FLOAT_BITS
        total += c.macs * w * a
    return total / 1e9


def _quantize_weight_fn() -> Callable:
    try:
        from hawq.quant.quantizers import quantize_weight
    except ImportError as e:  # the quant stage provides it; without it there is nothing to measure
        raise HawqError(f"weight_perturbations: hawq.quant.quantizers.quantize_weight "
                        f"unavailable ({e})") from None
    return quantize_weight


def weight_perturbations(model: nn.Module, layers: list[str], weight_bits: list[int],
                         per_channel: bool = True, group_size: int | None = None,
                         progress: bool = False) -> dict[str, dict[int, float]]:
    """``||Q_b(W_l) - W_l||_2^2`` for every layer and bit width (32 bits = float = 0)."""
    modules = dict(model.named_modules())
    quantize_weight = None
    out: dict[str, dict[int, float]] = {}
    for name in tqdm(layers, desc="perturbations", disable=bars_off(progress)):
        if name not in modules:
            raise HawqError(f"weight_perturbations: unknown layer '{name}'")
        m = modules[name]
        w = m.weight.detach()
        groups = group_size if _module_kind(m) in GROUPED_KINDS else None
        row: dict[int, float] = {}
        for b in weight_bits:
            if b == FLOAT_BITS:
                row[b] = 0.0
                continue
            if quantize_weight is None:
                quantize_weight = _quantize_weight_fn()
            with torch.no_grad():
                q = quantize_weight(w, b, per_channel=per_channel, group_size=groups)
                row[b] = float((q.double() - w.double()).pow(2).sum())
        out[name] = row
    return out
