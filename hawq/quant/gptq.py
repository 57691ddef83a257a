"""Second-order weight rounding: GPTQ / Optimal Brain Quantization, post-training, no finetuning.

Math (Frantar et al., "GPTQ", 2023, Algorithm 1; OBQ, Frantar & Alistarh, 2022). For one layer
with weight rows ``w`` (one output channel each, ``d`` input columns) and calibration inputs
``X`` (``n x d``: Linear inputs over all leading dims; a conv's unfolded patches, one conv group
at a time), rounding changes the layer output by ``E X^T`` with ``E = W - Q``; its squared norm
is ``tr(E H E^T) / 2`` with the layer-input Hessian ``H = 2 X^T X / n``. Rows are independent, so
each row minimises ``e H e^T`` over the grid. GPTQ rounds the columns one at a time in a fixed
order and, after rounding column ``j`` to ``q_j``, moves the not-yet-rounded columns ``F`` to
their optimum given ``q_j``:

    delta_F = -(w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{j,F}

where ``H_F^-1`` is the inverse Hessian of the remaining columns. All those rows come from one
upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``): row ``j`` of ``U`` is
``[H_F^-1]_{j,F} / sqrt([H_F^-1]_jj)``, so with ``err_j = (w_j - q_j) / U_jj`` the update is
``w_F -= err_j * U_{j,F}``. Updates are applied lazily: inside a block of ``block_size`` columns
immediately, to the columns after the block once per block (``W_rest -= Err_block @ U_block,rest``),
which gives the same result with matrix-matrix products.

Choices (each a documented GPTQ option or a deviation with its reason):

* damping: ``H += damp * mean(diag H) * I`` (numerical stability; more damping if Cholesky fails);
* dead inputs (``H_jj = 0``: never non-zero on the calibration data): ``H_jj := 1``. The column then
  decouples and rounds to nearest. GPTQ zeroes such weights; we keep them, because a small
  calibration set may simply not reach an input that test data reaches;
* ``act_order``: columns in order of decreasing ``H_jj`` (the hardest first), scales unchanged;
* scales are fixed before rounding, from the weights as in hawq's nearest path
  (:func:`hawq.quant.weight_scale`: per tensor, per output channel or per group of the last dim),
  optionally times a per-row clip ratio chosen to minimise the nearest-rounding output error
  ``e H e^T`` (``clip_search``);
* the element of largest ``|w|`` of every scale unit (channel / group / tensor) is rounded to
  ``+-qmax``, as round-to-nearest rounds it (its error is fed back like any other). This keeps the
  quantization contract below exact.

The contract (why no code buffer is needed): hawq computes integer codes in one place,
``quantize_to_int(source weight)`` (rounding by ``round_to_codes``) with the scale derived from the weight
(``max|w| / qmax``) -- the fake-quant forward, ``int_weight()``, ``to_integer``, ``to_fbgemm``, both ONNX exports and
``save_quantized`` all go through it. :func:`gptq_round_` therefore writes the rounded result back
as a float weight: ``weight_from_codes(codes, scale)`` (the helper ``load_quantized`` uses), which
is ``codes * scale`` with the peak codes holding the value that re-derives ``scale`` bit-exactly.
Every unit has a peak code ``+-qmax`` (above), so re-quantizing that weight gives back exactly the
GPTQ codes; :func:`gptq_round_` checks this per layer and raises if it ever does not hold. A model
rounded this way is an ordinary quantized model: export, save/load and finetuning need nothing new.

Sequential mode (GPTQ's standard): layers are rounded in forward order, each one's Hessian taken
from inputs produced by the already-rounded prefix (activation quantizers off: GPTQ is
weight-only; activation ranges are calibrated afterwards). ``asymmetric=True`` (GPTAQ's asymmetric
calibration) instead keeps the calibrated activation quantizers on and targets the FP32 model's
layer outputs: see :func:`asymmetric_target`. Layers that receive the very same input
tensor (q/k/v projections, a block's first conv and its downsample) share one pass; each pass stops
the forward once its layers have seen their input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hawq import HawqError, bars_off
from hawq.quant.config import QuantConfig
from hawq.quant.modules import QuantBnConv2d, QuantConv2d, QuantLinear
from hawq.quant.quantizers import FLOAT_BITS, expand_scale, qmax_signed, weight_from_codes, weight_scale

CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5: clip search grid
_DAMP_RETRIES = 6


# --- pure math ----------------------------------------------------------------------------------
def layer_output_error(weight: Tensor, quantized: Tensor, hessian: Tensor) -> float:
    """``tr(E H E^T)`` with ``E = weight - quantized`` (rows x d): the output error on the calibration inputs."""
    e = (weight - quantized).to(torch.float64)
    return float(((e @ hessian.to(torch.float64)) * e).sum())


def _inverse_cholesky_upper(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` with ``lambda = damp * mean(diag H)``."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp * float(torch.diagonal(h).mean())
    for _ in range(_DAMP_RETRIES):
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
        lam = max(lam * 10.0, 1e-8 * float(torch.diagonal(h).abs().mean()) + 1e-12)
    raise HawqError("gptq: the layer-input Hessian is not positive definite even with extra damping; "
                    "give more calibration data or raise quant.gptq_damp")


def gptq_codes(weight: Tensor, hessian: Tensor, scale: Tensor, bits: int, forced: Tensor | None = None,
               block_size: int = 128, damp: float = 0.01, act_order: bool = False) -> Tensor:
    """GPTQ rounding of one weight matrix; returns integer-valued float codes, shape of ``weight``.

    ``weight`` is ``rows x d``, ``hessian`` ``d x d`` (``2 X^T X / n``), ``scale`` the step of every
    element (``rows x d``, already broadcast). ``forced`` (same shape, NaN = free) pins codes:
    the element keeps that code and its error is fed back like any other. Codes lie in
    ``[-qmax, qmax]``, ``qmax = 2^(bits-1) - 1``.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]) or scale.shape != weight.shape:
        raise HawqError("gptq_codes: expected weight (rows, d), hessian (d, d) and scale (rows, d)")
    if block_size < 1:
        raise HawqError(f"gptq_codes: block_size must be >= 1, got {block_size}")
    qmax = qmax_signed(bits)
    d = weight.shape[1]
    w = weight.detach().to(torch.float32).clone()
    s = scale.detach().to(torch.float32)
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, s, h = w[:, perm], s[:, perm], h[perm][:, perm]
        forced = forced[:, perm] if forced is not None else None
    u = _inverse_cholesky_upper(h, damp).to(torch.float32)
    codes = torch.zeros_like(w)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        w_blk = w[:, i1:i2].clone()
        err_blk = torch.zeros_like(w_blk)
        u_blk = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w_blk[:, i]
            step = s[:, i1 + i]
            c = torch.clamp(torch.round(col / step), -qmax, qmax)
            if forced is not None:
                pin = forced[:, i1 + i]
                c = torch.where(torch.isnan(pin), c, pin)
            codes[:, i1 + i] = c
            err = (col - c * step) / u_blk[i, i]
            w_blk[:, i:] -= err.unsqueeze(1) * u_blk[i, i:].unsqueeze(0)
            err_blk[:, i] = err
        if i2 < d:
            w[:, i2:] -= err_blk @ u[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


def _nearest(w: Tensor, step: Tensor, qmax: int) -> Tensor:
    return torch.clamp(torch.round(w / step), -qmax, qmax)


def clip_ratios(weight: Tensor, hessian: Tensor, step: Tensor, bits: int, per_row: bool = True) -> Tensor:
    """Per row (or one for the tensor) the ratio in :data:`CLIP_RATIOS` whose scaled step minimises ``e H e^T``.

    ``step`` is the max-derived step of every element (``rows x d``); the error is that of
    round-to-nearest at ``ratio * step`` (a cheap proxy for GPTQ's own error).
    """
    qmax = qmax_signed(bits)
    w = weight.to(torch.float32)
    h = hessian.to(torch.float32)
    best_err = torch.full((w.shape[0],), math.inf, dtype=torch.float64, device=w.device)
    best = torch.ones(w.shape[0], dtype=torch.float32, device=w.device)
    for r in CLIP_RATIOS:
        e = w - _nearest(w, step * r, qmax) * step * r
        err = ((e @ h) * e).sum(1).to(torch.float64)
        if not per_row:
            err = err.sum().expand_as(best_err)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def peak_codes(weight: Tensor, scale_units: Tensor, qmax: int) -> Tensor:
    """Pinned codes: ``sign(w) * qmax`` at the largest ``|w|`` of every scale unit, NaN elsewhere.

    ``scale_units`` gives each element's unit id (``rows x d``, ids ``0..k-1``). A unit of zeros
    (scale 1 by convention) has all its codes pinned to 0.
    """
    a = weight.detach().abs().flatten().to(torch.float64)
    units = scale_units.flatten()
    k = int(units.max()) + 1 if units.numel() else 0
    amax = torch.zeros(k, dtype=a.dtype, device=a.device).scatter_reduce(0, units, a, reduce="amax",
                                                                         include_self=True)
    # first position of each unit's max (a deterministic tie-break: lowest flat index)
    idx = torch.arange(a.numel(), device=a.device)
    is_max = a == amax[units]
    first = torch.full((k,), a.numel(), dtype=torch.long, device=a.device).scatter_reduce(
        0, units[is_max], idx[is_max], reduce="amin", include_self=True)
    out = torch.full_like(a, math.nan)
    live = amax > 0
    sign = torch.sign(weight.detach().flatten().to(torch.float64))
    out[first[live]] = sign[first[live]] * qmax
    out[~live[units]] = 0.0
    return out.reshape(weight.shape).to(torch.float32)


# --- collecting layer-input Hessians ------------------------------------------------------------
def _layer_inputs_2d(layer: nn.Module, x: Tensor) -> Tensor:
    """Calibration rows of one forward: ``(n, d)``, or ``(groups, n, d)`` for a conv (unfolded patches)."""
    x = x.detach()
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).unsqueeze(0)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    pad = layer._reversed_padding_repeated_twice
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=0, stride=layer.stride)
    n, cd, length = cols.shape
    g = layer.groups
    return cols.reshape(n, g, cd // g, length).permute(1, 0, 3, 2).reshape(g, n * length, cd // g)


class _HessianAccumulator:
    """Running ``H = 2 X^T X / n`` over calls, and with a target input ``Y`` also ``C = 2 Y^T X / n`` (float64)."""

    def __init__(self) -> None:
        self.h: Tensor | None = None
        self.c: Tensor | None = None
        self.n = 0

    def add(self, rows: Tensor, target_rows: Tensor | None = None) -> None:
        x = rows.to(torch.float64)
        m = x.shape[1]
        if m == 0:
            return
        total = self.n + m
        xtx = x.transpose(1, 2) @ x
        if self.h is None:
            self.h = torch.zeros_like(xtx)
        self.h.mul_(self.n / total).add_(xtx, alpha=2.0 / total)
        if target_rows is not None:
            ytx = target_rows.to(torch.float64).transpose(1, 2) @ x
            if self.c is None:
                self.c = torch.zeros_like(ytx)
            self.c.mul_(self.n / total).add_(ytx, alpha=2.0 / total)
        self.n = total


class _StopForward(Exception):
    """Raised by a hook once every layer of the current pass has its input (saves the rest of the forward)."""


def gptq_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers :func:`gptq_round_` rounds: quantized Conv2d / Linear with integer weights (< 32 bits)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_bits < FLOAT_BITS}


def _act_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if callable(getattr(m, "set_mode", None)) and hasattr(m, "mode")]


# --- per-layer rounding ---------------------------------------------------------------------------
def _source_weight(layer: nn.Module) -> Tensor:
    return layer.quant_source_weight().detach()


def asymmetric_target(weight: Tensor, hessian: Tensor, cross: Tensor, damp: float) -> Tensor:
    """``W* = W + W (C - H) (H + lambda I)^-1``: the weight on the quantized inputs that best gives the FP32 output.

    With ``H = 2 Xq^T Xq / n`` and ``C = 2 Y^T Xq / n`` (``Y`` the FP32 model's input, ``Xq`` the
    quantized model's), the least-squares ``W* = W C H^-1`` splits ``||Y W^T - Xq Q^T||^2`` into
    ``||Y W^T - Xq W*^T||^2`` plus ``n/2 tr((W* - Q) H (W* - Q)^T)``, so GPTQ of ``W*`` under ``H``
    minimises the error against the FP32 layer output. Written as ``W`` plus a correction driven by
    the input error ``Y - Xq`` (``C - H = 2 (Y - Xq)^T Xq / n``), the damping regularises the
    correction towards ``W`` rather than the weight towards 0 (with ``Y = Xq``, ``W* = W`` exactly).
    """
    h = hessian.to(torch.float64)
    lam = damp * float(torch.diagonal(h).mean())
    h_damped = h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    w = weight.to(torch.float64)
    correction = torch.linalg.solve(h_damped, (w @ (cross.to(torch.float64) - h)).T).T
    return (w + correction).to(torch.float32)


def _round_layer(layer: nn.Module, hessians: Tensor, block_size: int, damp: float, act_order: bool,
                 clip_search: bool, cross: Tensor | None = None) -> tuple[Tensor, Tensor, float, float]:
    """GPTQ codes (source-weight shape), compact scale, and the nearest / GPTQ output errors."""
    w_src = _source_weight(layer).to(torch.float32)
    if cross is not None:
        n_g = hessians.shape[0]
        w_g = w_src.reshape(n_g, w_src.shape[0] // n_g, -1)
        w_src = torch.cat([asymmetric_target(w_g[g], hessians[g], cross[g], damp) for g in range(n_g)]
                          ).reshape(w_src.shape)
    bits, per_channel, group = layer.weight_bits, layer.per_channel, layer.group_size
    qmax = qmax_signed(bits)
    scale = weight_scale(w_src, bits, per_channel, group).to(torch.float32)
    rows_total = w_src.shape[0]
    w2 = w_src.reshape(rows_total, -1)
    n_groups = hessians.shape[0]
    rows = rows_total // n_groups
    grouped_scale = group is not None
    per_row = grouped_scale or (per_channel and w_src.dim() >= 2)
    if clip_search:
        step0 = expand_scale(scale, w_src.shape, group).expand(w_src.shape).reshape(rows_total, -1)
        ratios = torch.cat([clip_ratios(w2[g * rows:(g + 1) * rows], hessians[g], step0[g * rows:(g + 1) * rows],
                                        bits, per_row) for g in range(n_groups)])
        if not per_row:
            ratios = ratios[:1]  # one scale for the tensor: the first group's choice (groups share it)
        scale = scale * (ratios.reshape(-1, *([1] * (scale.dim() - 1))) if scale.dim() else ratios[0])
    step = expand_scale(scale, w_src.shape, group).expand(w_src.shape).reshape(rows_total, -1)
    units = _unit_ids(w_src, per_channel, group).to(w_src.device)
    forced = peak_codes(w2, units, qmax)
    codes = torch.empty_like(w2)
    err_near = err_gptq = 0.0
    for g in range(n_groups):
        sl = slice(g * rows, (g + 1) * rows)
        codes[sl] = gptq_codes(w2[sl], hessians[g], step[sl], bits, forced[sl], block_size, damp, act_order)
        near = torch.where(torch.isnan(forced[sl]), _nearest(w2[sl], step[sl], qmax), forced[sl])
        err_near += layer_output_error(w2[sl], near * step[sl], hessians[g])
        err_gptq += layer_output_error(w2[sl], codes[sl] * step[sl], hessians[g])
    return codes.reshape(w_src.shape), scale, err_near, err_gptq


def _unit_ids(w: Tensor, per_channel: bool, group: int | None) -> Tensor:
    """The scale-unit id of every element of ``w`` (as ``rows x d``), matching :func:`weight_scale`."""
    rows = w.shape[0]
    d = w.numel() // rows
    if group is not None:
        per = math.ceil(w.shape[-1] / group)
        col = torch.arange(w.shape[-1]) // group
        lead = torch.arange(w.numel() // w.shape[-1]).unsqueeze(1) * per
        return (lead + col.unsqueeze(0)).reshape(rows, d)
    if per_channel and w.dim() >= 2:
        return torch.arange(rows).unsqueeze(1).expand(rows, d).clone()
    return torch.zeros(rows, d, dtype=torch.long)


@torch.no_grad()
def _write_back(layer: nn.Module, codes: Tensor, scale: Tensor, name: str) -> None:
    """Store the GPTQ result as the layer's float weight; check it re-quantizes to exactly ``codes``."""
    target = weight_from_codes(codes.to(torch.int32), scale, layer.weight_bits, layer.group_size)
    if isinstance(layer, QuantBnConv2d):
        g = layer._bn_factor(layer.bn.running_var).detach().reshape(-1, 1, 1, 1)
        if bool((g == 0).any()):
            raise HawqError(f"gptq: layer '{name}' folds a BatchNorm with a zero gain")
        target = target / g
    layer.weight.copy_(target.to(layer.weight.dtype))
    got, _ = layer.int_weight()
    if not torch.equal(got.to(torch.int32), codes.to(torch.int32)):
        raise HawqError(f"gptq: layer '{name}' does not re-quantize to its GPTQ codes "
                        "(the float weight cannot hold them exactly in its dtype)")


# --- the model-level call -----------------------------------------------------------------------
def _check_options(block_size: int, damp: float, act_order: bool, clip_search: bool, sequential: bool) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise HawqError(f"gptq: block_size must be a positive integer, got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
        raise HawqError(f"gptq: damp must be a number in (0, 1), got {damp!r}")
    for key, value in (("act_order", act_order), ("clip_search", clip_search), ("sequential", sequential)):
        if not isinstance(value, bool):
            raise HawqError(f"gptq: {key} must be true or false, got {value!r}")


def _input_key(x: Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)


@torch.no_grad()
def gptq_round_(model: nn.Module, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any], *,
                block_size: int = 128, damp: float = 0.01, act_order: bool = False, clip_search: bool = False,
                sequential: bool = True, asymmetric: bool = False, layers: Iterable[str] | None = None,
                progress: bool = False) -> dict[str, dict[str, float]]:
    """Round the weights of a quantized model with GPTQ, in place; return per-layer output errors.

    ``model`` comes from :func:`hawq.quant.quantize_model` (its bit map fixes each layer's bits,
    ``per_channel`` and ``group_size``); ``forward(model, batch)`` runs one calibration batch
    (e.g. ``task.forward``). Every quantized Conv2d / Linear (or those named in ``layers``) is
    rounded; embeddings and float layers keep their weights. Activation quantizers are off while
    the Hessians are collected (unless ``asymmetric``) and restored afterwards: calibrate
    activations after this call.

    ``asymmetric=True`` (the asymmetric calibration of GPTAQ, Li et al. 2025): the target of each
    layer is its output in the FP32 model (a float copy run on the same batch), the Hessian that of
    the input the quantized model gives it, activation quantization included -- so each layer also
    compensates the error of the prefix and of its own input quantizer. It needs calibrated
    activation quantizers (run :func:`hawq.quant.calibrate` first; calibrating again afterwards is fine).

    Returns ``{layer: {"bits", "error_nearest", "error_gptq"}}``: ``tr(E H E^T)`` on the
    calibration inputs for round-to-nearest and for GPTQ at the same scales (relative to
    ``tr(W H W^T)``).
    """
    _check_options(block_size, damp, act_order, clip_search, sequential)
    if not isinstance(asymmetric, bool):
        raise HawqError(f"gptq: asymmetric must be true or false, got {asymmetric!r}")
    batches = list(batches)
    if not batches:
        raise HawqError("gptq: no calibration batches were given")
    targets = gptq_layers(model)
    if layers is not None:
        wanted = list(layers)
        unknown = [n for n in wanted if n not in targets]
        if unknown:
            raise HawqError(f"gptq: '{unknown[0]}' is not a quantized Conv2d/Linear layer of the model")
        targets = {n: targets[n] for n in wanted}
    if not targets:
        return {}
    acts = _act_modules(model)
    modes = [a.mode for a in acts]
    was_training = model.training
    model.eval()
    reference = None
    if asymmetric:
        uncalibrated = [a for a in acts if getattr(a, "calibrated", True) is False and a.mode != "off"]
        if uncalibrated:
            raise HawqError("gptq: asymmetric rounding needs calibrated activation quantizers; "
                            "run hawq.quant.calibrate(model, batches, forward) first")
        reference = _float_reference(model)
        for a in acts:
            if a.mode in ("calibrating", "tracking"):
                a.set_mode("frozen")
    else:
        for a in acts:
            a.set_mode("off")
    report: dict[str, dict[str, float]] = {}
    try:
        order, passes, repeated = _discover(model, targets, batches[0], forward)
        if not sequential:
            passes = [order]
        bar = tqdm(total=len(order), desc="gptq", disable=bars_off(progress))
        for group in passes:
            hessians = _collect(model, {n: targets[n] for n in group}, batches, forward,
                                stop_early=sequential and not repeated.intersection(group), reference=reference)
            for name in group:
                layer = targets[name]
                if hessians[name].h is None:
                    raise HawqError(f"gptq: layer '{name}' saw no calibration input; is it on the forward path?")
                h = hessians[name].h
                codes, scale, e_near, e_gptq = _round_layer(layer, h, block_size, damp, act_order, clip_search,
                                                            hessians[name].c)
                w2 = _source_weight(layer).to(torch.float32).reshape(h.shape[0], -1, h.shape[1])
                ref = sum(layer_output_error(w2[g], torch.zeros_like(w2[g]), h[g]) for g in range(h.shape[0]))
                _write_back(layer, codes, scale, name)
                report[name] = {"bits": float(layer.weight_bits), "error_nearest": e_near / max(ref, 1e-300),
                                "error_gptq": e_gptq / max(ref, 1e-300)}
                bar.update(1)
        bar.close()
    finally:
        for a, m in zip(acts, modes):
            a.set_mode(m)
        model.train(was_training)
    return report


def _discover(model: nn.Module, targets: dict[str, nn.Module], batch: Any,
              forward: Callable[[nn.Module, Any], Any]) -> tuple[list[str], list[list[str]], set[str]]:
    """Forward order of the target layers, their passes (layers sharing one input tensor) and the layers
    called more than once per forward (their pass runs the whole forward)."""
    seen: list[tuple[str, tuple]] = []
    calls: dict[str, int] = {}
    alive: list[Tensor] = []  # inputs held until the grouping is done: a freed input's address can be
    # reused by the next layer's (different) input, which would group them by chance of the allocator

    def hook(name: str) -> Callable:
        def fn(_module: nn.Module, args: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                seen.append((name, _input_key(args[0])))
                alive.append(args[0])
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        forward(model, batch)
    finally:
        for hd in handles:
            hd.remove()
    missing = [n for n in targets if n not in calls]
    if missing:
        raise HawqError(f"gptq: layer '{missing[0]}' saw no calibration input; is it on the forward path?")
    order = [n for n, _ in seen]
    passes: list[list[str]] = []
    last_key = None
    for name, key in seen:
        if passes and key == last_key and calls[name] == 1 and all(calls[p] == 1 for p in passes[-1]):
            passes[-1].append(name)
        else:
            passes.append([name])
        last_key = key
    return order, passes, {n for n, c in calls.items() if c > 1}


def _float_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` computing in float: weights unquantized, activation quantizers off."""
    import copy

    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if hasattr(m, "weight_bits"):
            m.weight_bits = FLOAT_BITS
    for a in _act_modules(ref):
        a.set_mode("off")
    return ref


def _layer_input(layer: nn.Module, x: Tensor) -> Tensor:
    """What the layer computes with: its input after its own input quantizer (when one is active)."""
    iq = getattr(layer, "input_quant", None)
    return x if iq is None or iq.mode == "off" else iq(x)


def _collect(model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Any],
             forward: Callable[[nn.Module, Any], Any], stop_early: bool,
             reference: nn.Module | None = None) -> dict[str, _HessianAccumulator]:
    """Layer-input Hessians over ``batches``; with ``reference``, also the cross terms with its inputs."""
    acc = {n: _HessianAccumulator() for n in layers}
    pending: set[str] = set()
    targets: dict[str, list[Tensor]] = {n: [] for n in layers}

    def hook(name: str) -> Callable:
        def fn(module: nn.Module, args: tuple) -> None:
            rows = _layer_inputs_2d(module, _layer_input(module, args[0]))
            acc[name].add(rows, targets[name].pop(0) if reference is not None else None)
            pending.discard(name)
            if stop_early and not pending:
                raise _StopForward
        return fn

    def ref_hook(name: str) -> Callable:
        def fn(module: nn.Module, args: tuple) -> None:
            targets[name].append(_layer_inputs_2d(module, args[0]))
            pending.discard(name)
            if stop_early and not pending:
                raise _StopForward
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    if reference is not None:
        handles += [reference.get_submodule(n).register_forward_pre_hook(ref_hook(n)) for n in layers]
    try:
        for batch in batches:
            for net in ((reference, model) if reference is not None else (model,)):
                pending.update(layers)
                try:
                    forward(net, batch)
                except _StopForward:
                    pass
    finally:
        for hd in handles:
            hd.remove()
    return acc


def gptq_options(cfg: QuantConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`gptq_round_` that a :class:`QuantConfig` sets."""
    return {"block_size": cfg.gptq_block_size, "damp": cfg.gptq_damp, "act_order": cfg.gptq_act_order,
            "clip_search": cfg.gptq_clip_search, "sequential": cfg.gptq_sequential,
            "asymmetric": cfg.gptq_asymmetric}
