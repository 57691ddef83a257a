"""Symmetric uniform weight quantizers (pure functions) and their straight-through estimators.

A ``bits``-bit symmetric quantizer maps a real tensor ``w`` to integer codes
``q = clamp(round(w / s), -Q, Q)`` with ``Q = 2^(bits-1) - 1`` and dequantizes as ``q * s``.
The scale ``s = max|w| / Q`` is taken over one of three granularities:

* per tensor (``per_channel=False``, ``group_size=None``): one scale;
* per output channel (``per_channel=True``): one scale per index of dim 0;
* per group (``group_size=g``): one scale per contiguous run of ``g`` elements along the
  last dim (Q-BERT group-wise quantization); a last, shorter group takes the remainder.

Because ``s`` comes from the maximum, nothing is ever clipped, so ``|Q(w) - w| <= s / 2``
elementwise. The restricted range ``[-Q, Q]`` (no ``-2^(bits-1)``) keeps the grid symmetric,
which the integer pipeline relies on (negating a code is exact).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hawq import HawqError

FLOAT_BITS = 32
INT32_MAX = 2**31 - 1  # the accumulator bound every integer kernel is checked against


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise HawqError(f"quantizer: bits must be an integer, got {bits!r}")
    if bits < 2:
        raise HawqError(f"quantizer: bits must be >= 2 for a symmetric quantizer, got {bits}")


def qmax_signed(bits: int) -> int:
    """Largest code of the restricted symmetric grid: ``2^(bits-1) - 1`` (127 at 8 bits)."""
    return 2 ** (bits - 1) - 1


def _check_group(w: Tensor, group_size: int | None) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise HawqError(f"quantizer: group_size must be a positive integer, got {group_size!r}")
    if w.dim() < 1:
        raise HawqError("quantizer: group-wise quantization needs a tensor with at least one dim")


def _amax(w: Tensor, per_channel: bool, group_size: int | None) -> Tensor:
    """max|w| at the requested granularity, in the compact scale shape (see :func:`weight_scale`)."""
    a = w.detach().abs()
    if group_size is not None:
        k = a.shape[-1]
        n_groups = math.ceil(k / group_size)
        pad = n_groups * group_size - k
        if pad:
            a = torch.nn.functional.pad(a, (0, pad))
        return a.reshape(*a.shape[:-1], n_groups, group_size).amax(dim=-1)
    if per_channel and w.dim() >= 2:
        return a.reshape(a.shape[0], -1).amax(dim=1)
    return a.amax()


def weight_scale(w: Tensor, bits: int, per_channel: bool = True, group_size: int | None = None) -> Tensor:
    """The quantization step ``s = max|w| / (2^(bits-1) - 1)`` in its compact shape.

    Shapes: per tensor ``()``; per channel ``(w.shape[0],)``; per group
    ``(*w.shape[:-1], ceil(w.shape[-1] / group_size))``. ``group_size`` takes precedence over
    ``per_channel``; 1-D tensors (biases) are always per tensor unless grouped. An all-zero
    slice gets scale 1 (any scale represents it exactly) so that no division by zero occurs.
    """
    _check_bits(bits)
    _check_group(w, group_size)
    if bits >= FLOAT_BITS:
        raise HawqError(f"quantizer: {bits} bits means floating point; there is no scale")
    amax = _amax(w, per_channel, group_size).to(torch.float32 if w.dtype != torch.float64 else w.dtype)
    scale = amax / qmax_signed(bits)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def expand_scale(scale: Tensor, shape: torch.Size | tuple[int, ...], group_size: int | None = None) -> Tensor:
    """Broadcast a compact scale from :func:`weight_scale` to a tensor of ``shape``."""
    if group_size is not None:
        full = scale.repeat_interleave(group_size, dim=-1)[..., : shape[-1]]
        return full.reshape(shape)
    if scale.dim() == 0:
        return scale
    return scale.reshape(scale.shape[0], *([1] * (len(shape) - 1)))


def round_to_codes(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """The one rounding rule: ``clamp(round(w / scale), -Q, Q)`` as floats (``scale`` already expanded).

    Fake-quant (:func:`quantize_weight`), the integer codes (:func:`quantize_to_int`, hence
    ``int_weight()``, ``to_integer``, ``to_fbgemm``, the ONNX exports and ``model.safetensors``)
    all round here, in the weight's own dtype, so they agree code for code.
    """
    q = qmax_signed(bits)
    return torch.clamp(torch.round(w / scale), -q, q)


def quantize_to_int(w: Tensor, bits: int, per_channel: bool = True,
                    group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Integer codes and compact scale: ``w ~= codes * expand_scale(scale)``.

    Codes are ``torch.int8`` for ``bits <= 8`` (4-bit codes use the int8 container too) and
    ``torch.int16`` up to 16 bits.
    """
    _check_bits(bits)
    if bits > 16:
        raise HawqError(f"quantize_to_int: integer codes need bits <= 16, got {bits}")
    scale = weight_scale(w, bits, per_channel, group_size)
    codes = round_to_codes(w.detach(), expand_scale(scale, w.shape, group_size), bits)
    return codes.to(torch.int8 if bits <= 8 else torch.int16), scale


def quantize_weight(w: Tensor, bits: int, per_channel: bool = True, group_size: int | None = None) -> Tensor:
    """Fake-quantize ``w`` (quantize then dequantize) to ``bits`` bits; ``bits >= 32`` returns ``w``.

    Not differentiable through the rounding (its gradient is zero almost everywhere); use
    :func:`fake_quant_weight_ste` inside training graphs.
    """
    if not isinstance(bits, bool) and isinstance(bits, int) and bits >= FLOAT_BITS:
        return w
    scale = expand_scale(weight_scale(w, bits, per_channel, group_size), w.shape, group_size).to(w.dtype)
    return round_to_codes(w, scale, bits) * scale


def _max_reproducing_scale(scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per scale entry a float ``m`` with ``fl(m / qmax) == scale`` (``qmax * scale`` give or take an ulp).

    hawq's quantizers derive the scale from the weights (``max|w| / qmax``); storing ``m`` at the
    positions of the largest codes makes the rebuilt layer derive the stored scale bit-exactly.
    """
    m = scale * qmax
    best, found = m.clone(), (m / qmax) == scale
    up, down = m, m
    for _ in range(4):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.zeros_like(down))
        for cand in (up, down):
            hit = ~found & ((cand / qmax) == scale)
            best, found = torch.where(hit, cand, best), found | hit
    return best


def weight_from_codes(codes: torch.Tensor, scale: torch.Tensor, bits: int,
                      group_size: int | None) -> torch.Tensor:
    """A float weight whose quantization gives back exactly ``codes`` and ``scale``.

    It is ``codes * scale`` except at the largest codes (``|code| == 2^(bits-1) - 1``), which hold
    the value whose ``max / qmax`` re-derives ``scale`` bit-exactly (see :func:`weight_scale`).
    """
    scale = scale.to(torch.float32)
    qmax = qmax_signed(bits)
    weight = codes.to(torch.float32) * expand_scale(scale, codes.shape, group_size)
    peak = expand_scale(_max_reproducing_scale(scale, qmax), codes.shape, group_size)
    at_peak = codes.abs() == qmax
    return torch.where(at_peak, torch.sign(codes.to(torch.float32)) * peak, weight)


def check_overflow(v: Tensor, where: str, limit: int = INT32_MAX) -> Tensor:
    """``v`` unchanged, or a HawqError naming ``where`` if some ``|v| > limit`` (integer inference checks)."""
    if v.numel() and int(v.abs().max()) > limit:
        raise HawqError(f"integer inference: overflow in {where} (|value| > {limit})")
    return v


class FakeQuantSTE(torch.autograd.Function):
    """Weight fake-quantization with the straight-through estimator: forward ``Q(w)``, backward identity.

    Weights are never clipped (the scale comes from ``max|w|``), so passing the gradient
    unchanged is the plain STE of Bengio et al. (2013) used by HAWQ-V3.
    """

    @staticmethod
    def forward(ctx, w: Tensor, bits: int, per_channel: bool, group_size: int | None) -> Tensor:  # noqa: D102
        return quantize_weight(w, bits, per_channel, group_size)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        return grad, None, None, None


def fake_quant_weight_ste(w: Tensor, bits: int, per_channel: bool = True,
                          group_size: int | None = None) -> Tensor:
    """Differentiable fake-quant of a weight (STE); identity for ``bits >= 32``."""
    if bits >= FLOAT_BITS:
        return w
    return FakeQuantSTE.apply(w, bits, per_channel, group_size)


def fake_quant_act(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Activation fake-quant ``clamp(round(x / s), qmin, qmax) * s`` with a clipped STE.

    The gradient passes where ``x`` lies inside the representable range ``[qmin*s, qmax*s]``
    and is zero where the quantizer clips (the usual STE for ranged activations).
    """
    q = torch.clamp(torch.round(x / scale), qmin, qmax) * scale
    inside = (x >= qmin * scale) & (x <= qmax * scale)
    # Value of q, gradient of x masked to the unclipped region.
    return torch.where(inside, x + (q - x).detach(), q.detach())
