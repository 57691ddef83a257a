"""Integer-only transformer kernels (I-BERT, Kim et al. 2021): i-GELU, i-exp / i-softmax, i-sqrt / i-LayerNorm.

Every kernel takes integer tensors (int64 storage, values kept in int32 range where the module
docs say so) and runs integer ops only: add, multiply, shifts, comparisons, floor division. What
a value *means* travels as metadata fixed at conversion time: an integer tensor ``q`` with a
positive real scale ``S`` stands for ``q * S``. The constants a kernel needs (``floor(b / S)``,
``1 / (a S^2)``, ...) are computed once, in float, when the kernel is built -- never at run time.

Approximations (I-BERT section 3):

* ``erf(x) ~ sgn(x) * [a (min(|x|, -b) + b)^2 + 1]`` with ``a = -0.2888, b = -1.769``, so
  ``GELU(x) = x/2 * (1 + erf(x / sqrt 2))`` is a second-order polynomial on integers.
* ``exp(x)`` for ``x <= 0``: ``x = -z ln2 + p`` with ``p in (-ln2, 0]``, ``exp(x) = 2^-z exp(p)``,
  ``exp(p) ~ 0.3585 (p + 1.353)^2 + 0.344``; ``2^-z`` is a right shift. Here the input grid is
  chosen as ``S = ln2 / 2^K``, so the range reduction itself is a shift and a mask (exact).
* ``sqrt``: integer Newton iteration ``x <- (x + n // x) // 2`` from a power of two above
  ``sqrt(n)``; it returns ``floor(sqrt(n))`` exactly.
* ``tanh`` (BERT's pooler; not in I-BERT): ``tanh(|x|) = (1 - e) / (1 + e)`` with ``e = exp(-2|x|)``
  from i-exp, an integer rounded division.

A whole Hugging Face BERT classifier or sentence encoder becomes traceable as :class:`TraceableBert`
(embeddings, every encoder layer with the padding mask, pooler + classifier or masked mean pooling +
L2 normalisation). Every integer module here lowers itself to ONNX (``to_onnx``) with the same
integer operations.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from hawq import HawqError
from hawq.quant.config import QuantConfig
from hawq.quant.modules import ACT_MODES, QUANTIZING_MODES, QuantAct, _share_params
from hawq.quant.quantizers import check_overflow

ERF_A, ERF_B = -0.2888, -1.769  # I-BERT's erf polynomial (fit on [0, -b])
EXP_A, EXP_B, EXP_C = 0.3585, 1.353, 0.344  # I-BERT's exp polynomial on (-ln2, 0]
GELU_ERF_BITS = 14  # the erf term (and "1") are kept at this many bits: |q| * 2^15 < 2^31
EXP_FRACTION_BITS = 10  # softmax input grid S = ln2 / 2^10: exact range reduction by shift and mask
EXP_MAX_SHIFT = 30  # exp(x) for x < -30 ln2 is below 2^-30 of the row maximum: it is 0
INT64_SAFE = 2**62
INNER_BITS = 16  # grids of the inputs of GELU and LayerNorm, and of a float input feeding integer ops
INNER_MARGIN = 2.0  # those 16-bit grids cover twice the calibrated range (one bit of headroom)
EXP_CLAMP = 2**40  # the softmax input on the ln2 / 2^K grid: int_exp saturates far below this
MASK_MAX = -1e4  # an additive attention mask entry at or below this masks (HF: -10000 or finfo.min)
# tensor methods that only move entries (integer tensors pass through them; grids go before them)
SHAPE_METHODS = ("transpose", "permute", "view", "reshape", "contiguous", "unflatten", "flatten")


# --- pure integer kernels ------------------------------------------------------------------------
def bit_length(n: Tensor) -> Tensor:
    """Number of bits of non-negative int64 values (0 -> 0), by integer comparisons only."""
    n = n.to(torch.int64)
    bits = torch.zeros_like(n)
    for k in range(63):
        bits += (n >= (1 << k)).to(torch.int64)
    return bits


def isqrt(n: Tensor) -> Tensor:
    """``floor(sqrt(n))`` of non-negative int64 values by integer Newton iteration (exact)."""
    n = n.to(torch.int64)
    if n.numel() and int(n.min()) < 0:
        raise HawqError("isqrt: negative input")
    m = n.clamp_min(1)  # 0 is patched in at the end (Newton would divide by zero)
    # Start at 2^ceil(bits/2) >= sqrt(n): from above, Newton decreases monotonically to floor(sqrt n).
    x = torch.bitwise_left_shift(torch.ones_like(m), (bit_length(m) + 1) // 2)
    while True:
        y = torch.bitwise_right_shift(x + torch.div(m, x, rounding_mode="floor"), 1)
        done = y >= x
        if bool(done.all()):
            break
        x = torch.where(done, x, y)
    return torch.where(n == 0, torch.zeros_like(x), x)


def round_div(num: Tensor, den: Tensor) -> Tensor:
    """``round(num / den)`` (half up) for integers, ``den > 0``."""
    return torch.div(2 * num + den, 2 * den, rounding_mode="floor")


POW2 = torch.tensor([1 << k for k in range(63)], dtype=torch.int64)  # 2^0 .. 2^62
ISQRT_ONNX_STEPS = 10  # Newton steps unrolled in ONNX: from <= 2 sqrt(n), 7 reach floor(sqrt(n)) for n < 2^63


# --- the same kernels in ONNX (integer tensors travel as INT64; ``g`` is a hawq.quant.OnnxBuilder) ----
def onnx_bit_length(g: Any, n: str, name: str) -> str:
    """:func:`bit_length` in ONNX: the number of powers of two ``2^0 .. 2^62`` at or below each ``n``."""
    above = g.op("GreaterOrEqual", [g.op("Unsqueeze", [n, g.const(f"{name}_ax", [-1], torch.int64)], f"{name}_col"),
                                    g.const(f"{name}_pow2", POW2, torch.int64)], f"{name}_ge")
    return g.op("ReduceSum", [g.cast(above, torch.int64, f"{name}_ge64"), g.const(f"{name}_axes", [-1], torch.int64)],
                f"{name}_bits", keepdims=0)


def onnx_isqrt(g: Any, n: str, name: str) -> str:
    """:func:`isqrt` in ONNX: the same start and Newton steps, unrolled ``ISQRT_ONNX_STEPS`` times (a
    finished entry stays put, as in the loop), so the result is the same ``floor(sqrt(n))``."""
    one = g.const(f"{name}_one", 1, torch.int64)
    m = g.op("Max", [n, one], f"{name}_m")
    half_bits = g.op("Div", [g.op("Add", [onnx_bit_length(g, m, f"{name}_bl"), one], f"{name}_b1"),
                             g.const(f"{name}_two", 2, torch.int64)], f"{name}_hb")
    x = g.op("Gather", [g.const(f"{name}_pow2t", POW2, torch.int64), half_bits], f"{name}_x0", axis=0)
    for i in range(ISQRT_ONNX_STEPS):
        q = g.op("Div", [m, x], f"{name}_q{i}")  # m, x > 0: truncation is floor
        y = g.op("Div", [g.op("Add", [x, q], f"{name}_s{i}"), g.const(f"{name}_two{i}", 2, torch.int64)],
                 f"{name}_y{i}")
        x = g.op("Where", [g.op("GreaterOrEqual", [y, x], f"{name}_done{i}"), x, y], f"{name}_x{i + 1}")
    zero = g.const(f"{name}_zero", 0, torch.int64)
    return g.op("Where", [g.op("Equal", [n, zero], f"{name}_is0"), zero, x], f"{name}_out")


def onnx_round_div_pos(g: Any, num: str, den: str, name: str) -> str:
    """:func:`round_div` for ``num >= 0``, ``den > 0`` (ONNX's truncating Div is floor there)."""
    two = g.const(f"{name}_two", 2, torch.int64)
    top = g.op("Add", [g.op("Mul", [num, two], f"{name}_2n"), den], f"{name}_top")
    return g.op("Div", [top, g.op("Mul", [den, two], f"{name}_2d")], f"{name}_out")


def onnx_int_exp(g: Any, x: str, c: ExpConstants, name: str) -> str:
    """:func:`int_exp` in ONNX (``x <= 0``)."""
    x = g.op("Max", [x, g.const(f"{name}_min", -EXP_MAX_SHIFT << c.k, torch.int64)], f"{name}_clamp")
    unit = g.const(f"{name}_unit", 1 << c.k, torch.int64)
    z = g.op("Div", [g.op("Neg", [x], f"{name}_neg"), unit], f"{name}_z")  # -x >= 0: floor
    p = g.op("Add", [x, g.op("Mul", [z, unit], f"{name}_zk")], f"{name}_p")
    t = g.op("Add", [p, g.const(f"{name}_qb", c.q_b, torch.int64)], f"{name}_t")
    poly = g.op("Add", [g.op("Mul", [t, t], f"{name}_sq"), g.const(f"{name}_qc", c.q_c, torch.int64)], f"{name}_poly")
    shift = g.op("Gather", [g.const(f"{name}_pow2", POW2, torch.int64), z], f"{name}_2z", axis=0)
    return g.op("Div", [poly, shift], f"{name}_out")  # poly >= 0: floor, i.e. the right shift


class GeluConstants:
    """Integer constants of i-GELU for an input grid of scale ``scale`` (a positive float)."""

    def __init__(self, scale: float) -> None:
        s_erf = scale / math.sqrt(2.0)  # erf sees x / sqrt(2)
        self.q_b = math.floor(ERF_B / s_erf)  # negative
        # erf ~ -[(t + q_b)^2 + q_c] * |a| s_erf^2, and "1" is q_one at that scale
        erf_scale = -ERF_A * s_erf**2
        self.q_c = math.floor(-1.0 / erf_scale)  # a < 0: the "+1" term is -1/|a s^2|
        self.shift = max(0, math.ceil(math.log2(1.0 / erf_scale)) - GELU_ERF_BITS)
        erf_scale *= 2.0**self.shift
        self.q_one = math.floor(1.0 / erf_scale)
        self.out_scale = scale * erf_scale / 2.0
        if self.q_b**2 + abs(self.q_c) > INT64_SAFE:
            raise HawqError("i-GELU: input scale too small for int64 intermediates")


def int_gelu(q: Tensor, c: GeluConstants) -> Tensor:
    """i-GELU: integer codes ``q`` (scale ``S``) -> integers at scale ``c.out_scale``."""
    q = q.to(torch.int64)
    t = torch.clamp(q.abs(), max=-c.q_b)
    erf_mag = -((t + c.q_b) ** 2 + c.q_c)  # >= 0: |erf| / (|a| s^2)
    erf = torch.sign(q) * torch.bitwise_right_shift(erf_mag, c.shift)
    return q * (erf + c.q_one)


class ExpConstants:
    """Integer constants of i-exp on the grid ``S = ln2 / 2^K`` (``K = EXP_FRACTION_BITS``)."""

    def __init__(self, fraction_bits: int = EXP_FRACTION_BITS) -> None:
        self.k = fraction_bits
        self.scale = math.log(2.0) / 2.0**fraction_bits
        self.q_b = math.floor(EXP_B / self.scale)
        self.q_c = math.floor(EXP_C / (EXP_A * self.scale**2))
        self.out_scale = EXP_A * self.scale**2  # of exp(p) before the 2^-z shift


def int_exp(x: Tensor, c: ExpConstants) -> Tensor:
    """i-exp of non-positive integers ``x`` on the grid ``c.scale``; result at scale ``c.out_scale``."""
    x = torch.clamp(x.to(torch.int64), min=-EXP_MAX_SHIFT << c.k)
    z = torch.bitwise_right_shift(-x, c.k)  # floor(-x / 2^K): how many ln2 to take out
    p = x + torch.bitwise_left_shift(z, c.k)  # in (-2^K, 0], i.e. (-ln2, 0]
    poly = (p + c.q_b) ** 2 + c.q_c
    return torch.bitwise_right_shift(poly, z)


def int_softmax(x: Tensor, c: ExpConstants, out_max: int, dim: int = -1, keep: Tensor | None = None) -> Tensor:
    """i-softmax of integers ``x`` on the grid ``c.scale``: codes in ``[0, out_max]``, scale ``1/out_max``.

    The row maximum is subtracted (integer), i-exp applied, and each entry normalised by an
    integer rounded division by the row sum, so a row's codes sum to ``out_max`` up to rounding
    (at most half a code per entry). ``keep`` (broadcastable to ``x``; 0 = masked) is an attention
    mask: masked entries become ``-EXP_CLAMP``, whose i-exp is exactly 0 beside any kept entry, so
    their probability code is 0 (a fully masked row is uniform, as float softmax of equal values).
    """
    x = x.to(torch.int64)
    if keep is not None:
        x = torch.where(keep.to(torch.bool), x, torch.full_like(x, -EXP_CLAMP))
    e = int_exp(x - x.amax(dim=dim, keepdim=True), c)
    total = e.sum(dim=dim, keepdim=True)  # >= the maximum's exp(0) > 0
    return round_div(e * out_max, total)


class LayerNormConstants:
    """Integer constants of i-LayerNorm over the last dim (``n`` features) for input scale ``scale``.

    The output keeps LayerNorm's gain in its per-feature scale (I-BERT): ``v = sgn(g) z + b``, scale
    ``|g| 2^-F``, with ``z = floor(2^F (x - mean) / std)`` and ``b = round(beta / (|g| 2^-F))``; ``F``
    is as large as keeps ``|v| < 2^30`` (at most ``max_fraction_bits``).
    """

    def __init__(self, scale: float, weight: Tensor, bias: Tensor, eps: float, name: str,
                 max_fraction_bits: int = 16) -> None:
        g = weight.detach().to(torch.float64)
        beta = bias.detach().to(torch.float64)
        if bool((g == 0).any()):
            raise HawqError(f"to_integer: LayerNorm '{name}' has a zero gain; integer LayerNorm needs g != 0")
        self.n = g.numel()
        ratio = float((beta / g).abs().max())
        z_max = math.sqrt(self.n) + 1.0  # |x - mean| / std <= sqrt(n - 1); +1 covers floors
        f = math.floor(math.log2(2.0**30 / (z_max + ratio)))
        if f < 4:
            raise HawqError(f"to_integer: LayerNorm '{name}' has |beta / gain| too large for int32")
        self.f = min(f, max_fraction_bits)
        self.sign = torch.sign(g).to(torch.int64)
        self.out_scale = g.abs() * 2.0**-self.f
        self.bias_int = torch.round(beta / self.out_scale).to(torch.int64)
        self.eps_int = max(0, round(eps / scale**2))
        self.bound = z_max * 2.0**self.f + self.bias_int.abs().to(torch.float64)


def int_layernorm(q: Tensor, n: int, eps_int: int, fraction_bits: int, sign: Tensor, bias_int: Tensor) -> Tensor:
    """i-LayerNorm over the last dim of integer codes ``q`` (see :class:`LayerNormConstants`)."""
    q = q.to(torch.int64)
    y = q - round_div(q.sum(-1, keepdim=True), torch.tensor(n))
    var = torch.div((y * y).sum(-1, keepdim=True), n, rounding_mode="floor") + eps_int
    std = isqrt(check_overflow(var, "LayerNorm variance", INT64_SAFE)).clamp_min(1)
    z = torch.div(torch.bitwise_left_shift(y, fraction_bits), std, rounding_mode="floor")
    return sign * z + bias_int


# --- thin modules ------------------------------------------------------------------------------
class IntGELU(nn.Module):
    """i-GELU on integer codes (constants fixed for the input grid at conversion)."""

    def __init__(self, consts: GeluConstants) -> None:
        super().__init__()
        self.consts = consts

    def forward(self, q: Tensor) -> Tensor:
        return check_overflow(int_gelu(q, self.consts), "GELU")

    def to_onnx(self, g: Any, args: list[str], name: str) -> str:
        c, q = self.consts, args[0]
        t = g.op("Min", [g.op("Abs", [q], f"{name}_abs"), g.const(f"{name}_lim", -c.q_b, torch.int64)], f"{name}_t")
        u = g.op("Add", [t, g.const(f"{name}_qb", c.q_b, torch.int64)], f"{name}_u")
        mag = g.op("Neg", [g.op("Add", [g.op("Mul", [u, u], f"{name}_sq"), g.const(f"{name}_qc", c.q_c, torch.int64)],
                                f"{name}_poly")], f"{name}_mag")
        mag = g.op("Div", [mag, g.const(f"{name}_shift", 1 << c.shift, torch.int64)], f"{name}_shifted")  # >= 0
        erf = g.op("Mul", [g.op("Sign", [q], f"{name}_sign"), mag], f"{name}_erf")
        return g.op("Mul", [q, g.op("Add", [erf, g.const(f"{name}_one", c.q_one, torch.int64)], f"{name}_1erf")],
                    f"{name}_out")


class IntSoftmax(nn.Module):
    """:func:`int_softmax` over the last dim of integers already on the ``ln2 / 2^K`` grid."""

    def __init__(self, consts: ExpConstants, out_max: int) -> None:
        super().__init__()
        self.consts, self.out_max = consts, out_max

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        return int_softmax(x, self.consts, self.out_max, keep=keep)

    def to_onnx(self, g: Any, args: list[str], name: str) -> str:
        x = args[0]
        if len(args) > 1:
            flags = g.cast(args[1], torch.bool, f"{name}_keepb")
            x = g.op("Where", [flags, x, g.const(f"{name}_masked", -EXP_CLAMP, torch.int64)], f"{name}_masked_x")
        axes = g.const(f"{name}_axes", [-1], torch.int64)
        top = g.op("ReduceMax", [x, axes], f"{name}_max", keepdims=1)
        e = onnx_int_exp(g, g.op("Sub", [x, top], f"{name}_shifted"), self.consts, f"{name}_exp")
        total = g.op("ReduceSum", [e, axes], f"{name}_total", keepdims=1)
        num = g.op("Mul", [e, g.const(f"{name}_outmax", self.out_max, torch.int64)], f"{name}_num")
        return onnx_round_div_pos(g, num, total, f"{name}_norm")


def attention_keep(mask: Tensor) -> Tensor:
    """An additive attention mask (0 = attend, <= ``MASK_MAX`` = masked) as int64 0/1 (1 = keep)."""
    keep = mask == 0
    if not bool((keep | (mask <= MASK_MAX)).all()):
        raise HawqError(f"attention mask: entries must be 0 (attend) or <= {MASK_MAX:g} (masked); "
                        "other additive biases are not supported by integer softmax")
    return keep.to(torch.int64)


class MaskInput(nn.Module):
    """The float additive attention mask (a model input) -> integer keep flags, like an input quantization."""

    from_float = True

    def forward(self, mask: Tensor) -> Tensor:
        return attention_keep(mask)

    def to_onnx(self, g: Any, args: list[str], name: str) -> str:
        # The check that every entry is 0 or <= MASK_MAX is PyTorch's; ONNX keeps the zeros.
        zero = g.const(f"{name}_zero", 0.0, torch.float64)
        return g.cast(g.op("Equal", [g.cast(args[0], torch.float64, f"{name}_f64"), zero], f"{name}_eq"),
                      torch.int64, f"{name}_keep")


class IntLayerNorm(nn.Module):
    def __init__(self, consts: LayerNormConstants) -> None:
        super().__init__()
        self.n, self.eps_int, self.f = consts.n, consts.eps_int, consts.f
        self.register_buffer("sign", consts.sign)
        self.register_buffer("bias_int", consts.bias_int)

    def forward(self, q: Tensor) -> Tensor:
        out = int_layernorm(q, self.n, self.eps_int, self.f, self.sign, self.bias_int)
        return check_overflow(out, "LayerNorm")

    def to_onnx(self, g: Any, args: list[str], name: str) -> str:
        q, axes = args[0], g.const(f"{name}_axes", [-1], torch.int64)
        n = g.const(f"{name}_n", self.n, torch.int64)
        total = g.op("ReduceSum", [q, axes], f"{name}_sum", keepdims=1)
        # round_div(total, n) = floor((2 total + n) / 2n): the sum may be negative, so a floor division
        two = g.const(f"{name}_two", 2, torch.int64)
        mean = g.floor_div(g.op("Add", [g.op("Mul", [total, two], f"{name}_2s"), n], f"{name}_top"),
                           g.const(f"{name}_2n", 2 * self.n, torch.int64), f"{name}_mean")
        y = g.op("Sub", [q, mean], f"{name}_y")
        ss = g.op("ReduceSum", [g.op("Mul", [y, y], f"{name}_y2"), axes], f"{name}_ss", keepdims=1)
        var = g.op("Add", [g.op("Div", [ss, n], f"{name}_var0"), g.const(f"{name}_eps", self.eps_int, torch.int64)],
                   f"{name}_var")
        std = g.op("Max", [onnx_isqrt(g, var, f"{name}_sqrt"), g.const(f"{name}_one", 1, torch.int64)], f"{name}_std")
        z = g.floor_div(g.op("Mul", [y, g.const(f"{name}_frac", 1 << self.f, torch.int64)], f"{name}_yf"), std,
                        f"{name}_z")
        signed = g.op("Mul", [z, g.const(f"{name}_sign", self.sign, torch.int64)], f"{name}_signed")
        return g.op("Add", [signed, g.const(f"{name}_bias_int", self.bias_int, torch.int64)], f"{name}_out")


class IntMatmul(nn.Module):
    """Integer matmul of two quantized activations (codes x codes -> exact integer accumulator)."""

    def __init__(self, name: str, grids: tuple[tuple[int, int] | None, ...] = (None, None)) -> None:
        super().__init__()
        self.name = name
        self.grids = grids  # (qmin, qmax) of each operand's codes: 8-bit ones export as MatMulInteger

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return check_overflow(torch.matmul(a.to(torch.int64), b.to(torch.int64)), f"matmul '{self.name}'")

    def to_onnx(self, g: Any, args: list[str], name: str) -> str:
        types = [None if grid is None else torch.int8 if grid[0] >= -128 and grid[1] <= 127 else
                 torch.uint8 if grid[0] >= 0 and grid[1] <= 255 else None for grid in self.grids]
        if None in types:  # wider codes: an exact float64 product (|acc| < 2^31 was proven at conversion)
            a, b = (g.cast(v, torch.float64, f"{name}_f64_{i}") for i, v in enumerate(args))
            return g.cast(g.op("MatMul", [a, b], f"{name}_acc"), torch.int64, f"{name}_out")
        a, b = (g.cast(v, t, f"{name}_codes_{i}") for i, (v, t) in enumerate(zip(args, types, strict=True)))
        return g.cast(g.op("MatMulInteger", [a, b], f"{name}_acc"), torch.int64, f"{name}_out")


class IntMean(nn.Module):
    """Mean over non-feature dims: integer sum and a rounded integer division (scale unchanged)."""

    def __init__(self, dim: int | tuple[int, ...], keepdim: bool) -> None:
        super().__init__()
        self.dim, self.keepdim = dim, keepdim

    def forward(self, v: Tensor) -> Tensor:
        dims = (self.dim,) if isinstance(self.dim, int) else tuple(self.dim)
        n = math.prod(v.shape[d] for d in dims)
        return torch.div(v.sum(dim=dims, keepdim=self.keepdim) + n // 2, n, rounding_mode="floor")

    def to_onnx(self, g: Any, args: list[str], name: str) -> str:
        dims = [self.dim] if isinstance(self.dim, int) else list(self.dim)
        total = g.op("ReduceSum", [args[0], g.const(f"{name}_axes", dims, torch.int64)], f"{name}_sum",
                     keepdims=int(self.keepdim))
        sizes = g.op("Gather", [g.op("Shape", [args[0]], f"{name}_shape"), g.const(f"{name}_dims", dims, torch.int64)],
                     f"{name}_sizes", axis=0)
        n = g.op("ReduceProd", [sizes], f"{name}_n", keepdims=0)
        half = g.op("Div", [n, g.const(f"{name}_two", 2, torch.int64)], f"{name}_half")
        return g.floor_div(g.op("Add", [total, half], f"{name}_biased"), n, name)


class IntScale(nn.Module):
    """Multiplying by a negative constant: negate (the magnitude goes into the scale)."""

    def forward(self, v: Tensor) -> Tensor:
        return -v

    def to_onnx(self, g: Any, args: list[str], name: str) -> str:
        return g.op("Neg", [args[0]], f"{name}_out")


class TanhConstants:
    """i-tanh on the i-exp grid: ``tanh(|x|) = (1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` from :func:`int_exp`.

    ``one`` is 1 at i-exp's output scale; the result is codes in ``[-out_max, out_max]`` at scale ``1 / out_max``.
    """

    def __init__(self, out_max: int = 2 ** (INNER_BITS - 1) - 1) -> None:
        self.exp = ExpConstants()
        self.one = round(1.0 / self.exp.out_scale)
        self.out_max = out_max


def int_tanh(q: Tensor, c: TanhConstants) -> Tensor:
    """i-tanh of integers ``q`` on the grid ``c.exp.scale`` (ln2 / 2^K): codes at scale ``1 / c.out_max``."""
    q = q.to(torch.int64)
    e = int_exp(-2 * q.abs(), c.exp)
    mag = round_div((c.one - e).clamp_min(0) * c.out_max, c.one + e)
    return torch.sign(q) * mag


class IntTanh(nn.Module):
    """:func:`int_tanh` on integers already on the ``ln2 / 2^K`` grid (the BERT pooler's activation)."""

    def __init__(self, consts: TanhConstants) -> None:
        super().__init__()
        self.consts = consts

    def forward(self, q: Tensor) -> Tensor:
        return int_tanh(q, self.consts)

    def to_onnx(self, g: Any, args: list[str], name: str) -> str:
        c, q = self.consts, args[0]
        neg2 = g.op("Mul", [g.op("Abs", [q], f"{name}_abs"), g.const(f"{name}_m2", -2, torch.int64)], f"{name}_x")
        e = onnx_int_exp(g, neg2, c.exp, f"{name}_exp")
        one = g.const(f"{name}_one", c.one, torch.int64)
        top = g.op("Max", [g.op("Sub", [one, e], f"{name}_1me"), g.const(f"{name}_zero", 0, torch.int64)],
                   f"{name}_top")
        mag = onnx_round_div_pos(g, g.op("Mul", [top, g.const(f"{name}_outmax", c.out_max, torch.int64)],
                                         f"{name}_num"), g.op("Add", [one, e], f"{name}_1pe"), f"{name}_div")
        return g.op("Mul", [g.op("Sign", [q], f"{name}_sign"), mag], f"{name}_out")


# --- I-BERT-aware fake-quant modules (training graph) --------------------------------------------
class _ValueOf(torch.autograd.Function):
    """Forward: ``exact`` (the integer kernel's result); backward: the gradient of ``approx`` (the float op)."""

    @staticmethod
    def forward(ctx, approx: Tensor, exact: Tensor) -> Tensor:  # noqa: D102
        return exact.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad, None


def straight_through(approx: Tensor, exact: Tensor) -> Tensor:
    """``exact``'s value (bit for bit) with ``approx``'s gradient: I-BERT kernels train through float ops."""
    return _ValueOf.apply(approx, exact.detach())


def grid_codes(x_q: Tensor, act: QuantAct) -> Tensor:
    """The int64 codes of a tensor ``x_q`` that ``act`` has just fake-quantized (``x_q = codes * scale``)."""
    return torch.round(x_q.detach().to(torch.float64) / act.scale.to(torch.float64)).to(torch.int64)


class StaticGrid(QuantAct):
    """A standalone signed per-tensor grid, calibrated like any :class:`QuantAct`, spanning ``margin`` x the range.

    I-BERT quantizes where a fake-quant model has no layer input: matmul operands of two activations
    (``attention_bits``, margin 1), the inputs of GELU and LayerNorm and a float model input used by
    a residual add (16 bits, margin 2: one bit of headroom over the calibration set).
    ``to_integer`` (``QuantConfig.transformer == "ibert"``) requantizes to exactly this grid.
    """

    def __init__(self, bits: int, margin: float = 1.0, cfg: QuantConfig | None = None) -> None:
        super().__init__(bits, signed=True, cfg=cfg)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 1.0:
            raise HawqError(f"StaticGrid: margin must be a number >= 1, got {margin!r}")
        self.margin = float(margin)

    def _update_scale(self) -> None:
        super()._update_scale()
        self.scale.mul_(self.margin)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", margin={self.margin:g}"


def _checked_mode(owner: str, mode: str) -> str:
    """``mode`` if it is one of ``ACT_MODES`` (the modes of QuantAct), else a HawqError naming ``owner``."""
    if mode not in ACT_MODES:
        raise HawqError(f"{owner}: mode must be one of {', '.join(ACT_MODES)}, got '{mode}'")
    return mode


class QuantGELU(nn.Module):
    """GELU as integer-only inference computes it: 16-bit input grid, i-GELU on the codes, dequantized.

    Calibrating (or ``"off"``): float GELU on the float input. Frozen / tracking: the value is
    ``int_gelu(codes) * out_scale`` exactly; the gradient is float GELU's at the fake-quantized input.
    """

    def __init__(self, cfg: QuantConfig | None = None, bits: int = INNER_BITS, margin: float = INNER_MARGIN) -> None:
        super().__init__()
        self.input_quant = StaticGrid(bits, margin, cfg)

    def forward(self, x: Tensor) -> Tensor:
        x_q = self.input_quant(x)
        y = F.gelu(x_q)
        if self.input_quant.mode not in QUANTIZING_MODES:
            return y
        c = GeluConstants(float(self.input_quant.scale))
        exact = int_gelu(grid_codes(x_q, self.input_quant), c).to(torch.float64) * c.out_scale
        return straight_through(y, exact.to(y.dtype))


class QuantSoftmax(nn.Module):
    """Softmax over the last dim as I-BERT computes it: input on the ``ln2 / 2^10`` grid, i-softmax, codes / out_max.

    An optional second input is an additive attention mask: masked entries get probability code 0.
    The input grid is fixed (nothing to calibrate); the output is unsigned ``out_bits`` codes at scale
    ``1 / (2^out_bits - 1)``. Modes as :class:`QuantAct` (set by ``calibrate`` / ``set_act_quant``):
    ``"calibrating"`` and ``"off"`` run float softmax; the value otherwise is the integer kernel's,
    the gradient float softmax's.
    """

    def __init__(self, out_bits: int = 8) -> None:
        super().__init__()
        if isinstance(out_bits, bool) or not isinstance(out_bits, int) or not 2 <= out_bits <= 8:
            raise HawqError(f"QuantSoftmax: out_bits must be an integer in 2..8, got {out_bits!r}")
        self.out_bits, self.out_max = out_bits, 2**out_bits - 1
        self.consts = ExpConstants()
        self.mode = "frozen"

    def set_mode(self, mode: str) -> None:
        self.mode = _checked_mode("QuantSoftmax", mode)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``softmax(x + mask)``; ``mask``: an additive attention mask (0 or <= ``MASK_MAX``: masked)."""
        y = torch.softmax(x if mask is None else x + mask, dim=-1)
        if self.mode not in QUANTIZING_MODES:
            return y
        q = torch.round(x.detach().to(torch.float64) / self.consts.scale).clamp(-EXP_CLAMP, EXP_CLAMP)
        keep = None if mask is None else attention_keep(mask.detach())
        codes = int_softmax(q.to(torch.int64), self.consts, self.out_max, keep=keep)
        return straight_through(y, codes.to(y.dtype) / self.out_max)

    def extra_repr(self) -> str:
        return f"out_bits={self.out_bits}, mode={self.mode}"


class QuantLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and names) computed as i-LayerNorm on a 16-bit input grid.

    The value is ``int_layernorm(codes) * |gain| 2^-F`` (see :class:`LayerNormConstants`, rebuilt
    from the current gain and bias each forward, so QAT trains them); the gradient is float
    LayerNorm's at the fake-quantized input. Calibrating / ``"off"``: float LayerNorm.
    """

    input_quant: StaticGrid

    @classmethod
    def from_float(cls, ln: nn.LayerNorm, cfg: QuantConfig | None = None, bits: int = INNER_BITS,
                   margin: float = INNER_MARGIN) -> QuantLayerNorm:
        if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
            raise HawqError("QuantLayerNorm: expected an nn.LayerNorm over the last dim only")
        q = cls(ln.normalized_shape, ln.eps, ln.elementwise_affine, bias=ln.bias is not None, device="meta")
        _share_params(q, ln)
        device = ln.weight.device if ln.weight is not None else None
        q.input_quant = StaticGrid(bits, margin, cfg).to(device)
        return q

    def forward(self, x: Tensor) -> Tensor:
        x_q = self.input_quant(x)
        y = F.layer_norm(x_q, self.normalized_shape, self.weight, self.bias, self.eps)
        if self.input_quant.mode not in QUANTIZING_MODES:
            return y
        d = self.normalized_shape[0]
        ones = torch.ones(d, dtype=torch.float64, device=x.device)
        weight = self.weight if self.weight is not None else ones
        bias = self.bias if self.bias is not None else torch.zeros_like(ones)
        c = LayerNormConstants(float(self.input_quant.scale), weight, bias, self.eps, "QuantLayerNorm")
        v = int_layernorm(grid_codes(x_q, self.input_quant), c.n, c.eps_int, c.f, c.sign, c.bias_int)
        return straight_through(y, (v.to(torch.float64) * c.out_scale).to(y.dtype))


class QuantTanh(nn.Module):
    """tanh as integer inference computes it (:func:`int_tanh`): input on the ``ln2 / 2^10`` grid, codes / out_max.

    Nothing to calibrate (the grids are fixed); modes as :class:`QuantSoftmax`: the value is the integer
    kernel's when quantizing, float tanh otherwise; the gradient is float tanh's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.consts = TanhConstants()
        self.mode = "frozen"

    def set_mode(self, mode: str) -> None:
        self.mode = _checked_mode("QuantTanh", mode)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        if self.mode not in QUANTIZING_MODES:
            return y
        q = torch.round(x.detach().to(torch.float64) / self.consts.exp.scale).clamp(-EXP_CLAMP, EXP_CLAMP)
        codes = int_tanh(q.to(torch.int64), self.consts)
        return straight_through(y, (codes.to(torch.float64) / self.consts.out_max).to(y.dtype))

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


# --- whole-model pieces of a Hugging Face BERT (leaves of the traced graph) -----------------------
class PaddingMask(nn.Module):
    """A tokenizer's ``(batch, key)`` 1/0 attention mask -> HF's additive ``(batch, 1, 1, key)`` mask (float32).

    A leaf of the traced model: ``quantize_transformer_ops`` folds ``scores + mask`` into the softmax, and
    ``to_integer`` turns it into integer keep flags (:class:`IntPaddingKeep`)."""

    def forward(self, attention_mask: Tensor) -> Tensor:
        return additive_attention_mask(attention_mask)


class IntPaddingKeep(nn.Module):
    """Integer inference's :class:`PaddingMask`: ``(batch, key)`` mask -> int64 keep flags ``(batch, 1, 1, key)``."""

    def forward(self, attention_mask: Tensor) -> Tensor:
        return (attention_mask != 0).to(torch.int64)[:, None, None, :]

    def to_onnx(self, g: Any, args: list[str], name: str) -> str:
        zero = g.const(f"{name}_zero", 0, torch.int64)
        flags = g.op("Not", [g.op("Equal", [g.cast(args[0], torch.int64, f"{name}_i64"), zero], f"{name}_eq")],
                     f"{name}_ne")
        return g.op("Unsqueeze", [g.cast(flags, torch.int64, f"{name}_keep"),
                                  g.const(f"{name}_axes", [1, 2], torch.int64)], f"{name}_out")


class PositionIds(nn.Module):
    """``input_ids`` -> the absolute positions ``0 .. seq-1`` per row (HF's ``position_ids`` buffer, sliced).

    A leaf of the traced model; integer inference uses it as it is (index arithmetic, no values)."""

    def forward(self, input_ids: Tensor) -> Tensor:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)

    def to_onnx(self, g: Any, args: list[str], name: str) -> str:
        shape = g.op("Shape", [args[0]], f"{name}_shape")
        seq = g.op("Gather", [shape, g.const(f"{name}_one", 1, torch.int64)], f"{name}_seq", axis=0)
        row = g.op("Range", [g.const(f"{name}_start", 0, torch.int64), seq, g.const(f"{name}_step", 1, torch.int64)],
                   f"{name}_row")
        return g.op("Expand", [row, shape], f"{name}_out")


POOL_FRACTION_BITS = 8  # fractional bits of the integer token mean (its rounding stays far below the 16-bit grid)
NORMALIZE_FRACTION_BITS = 16  # the unit-norm embedding as codes at scale 2^-16


class MaskedMeanNormalize(nn.Module):
    """Sentence-transformers pooling: mean of the token vectors where ``attention_mask`` is 1, L2-normalised.

    A leaf of the traced model (float in the fake-quant model); integer inference computes it as
    :class:`IntMaskedMeanNormalize`."""

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1)


class IntMaskedMeanNormalize(nn.Module):
    """:class:`MaskedMeanNormalize` on integer codes of one per-tensor grid.

    ``mean = round(2^P sum(v * keep) / count)`` over tokens (count >= 1), then ``out = floor(2^F mean /
    isqrt(sum(mean^2)))`` (0 for an all-zero row, as ``F.normalize``): codes at scale ``2^-F``.
    """

    def __init__(self, pool_bits: int = POOL_FRACTION_BITS, out_bits: int = NORMALIZE_FRACTION_BITS) -> None:
        super().__init__()
        self.pool_bits, self.out_bits = pool_bits, out_bits

    def forward(self, v: Tensor, attention_mask: Tensor) -> Tensor:
        keep = (attention_mask != 0).to(torch.int64)
        total = (v.to(torch.int64) * keep.unsqueeze(-1)).sum(1) * 2**self.pool_bits
        n = keep.sum(1, keepdim=True).clamp_min(1)
        mean = torch.div(total + n // 2, n, rounding_mode="floor")
        norm = isqrt(check_overflow((mean * mean).sum(-1, keepdim=True), "pooled norm", INT64_SAFE)).clamp_min(1)
        return torch.div(mean * 2**self.out_bits, norm, rounding_mode="floor")

    def to_onnx(self, g: Any, args: list[str], name: str) -> str:
        v, mask = args
        zero, one = g.const(f"{name}_zero", 0, torch.int64), g.const(f"{name}_one", 1, torch.int64)
        keep = g.cast(g.op("Not", [g.op("Equal", [g.cast(mask, torch.int64, f"{name}_m64"), zero], f"{name}_eq")],
                           f"{name}_ne"), torch.int64, f"{name}_keep")
        kept = g.op("Mul", [v, g.op("Unsqueeze", [keep, g.const(f"{name}_ax", [-1], torch.int64)], f"{name}_k3")],
                    f"{name}_kept")
        tokens = g.const(f"{name}_tok", [1], torch.int64)
        total = g.op("Mul", [g.op("ReduceSum", [kept, tokens], f"{name}_sum", keepdims=0),
                             g.const(f"{name}_pool", 1 << self.pool_bits, torch.int64)], f"{name}_total")
        n = g.op("Max", [g.op("ReduceSum", [keep, tokens], f"{name}_count", keepdims=1), one], f"{name}_n")
        half = g.op("Div", [n, g.const(f"{name}_two", 2, torch.int64)], f"{name}_half")
        mean = g.floor_div(g.op("Add", [total, half], f"{name}_biased"), n, f"{name}_mean")
        ss = g.op("ReduceSum", [g.op("Mul", [mean, mean], f"{name}_sq"), g.const(f"{name}_last", [-1], torch.int64)],
                  f"{name}_ss", keepdims=1)
        norm = g.op("Max", [onnx_isqrt(g, ss, f"{name}_sqrt"), one], f"{name}_norm")
        top = g.op("Mul", [mean, g.const(f"{name}_frac", 1 << self.out_bits, torch.int64)], f"{name}_top")
        return g.floor_div(top, norm, f"{name}_out")


IBERT_MODULES: tuple[type[nn.Module], ...] = (StaticGrid, QuantGELU, QuantSoftmax, QuantLayerNorm, QuantTanh)
# leaves of a traced whole BERT (TraceableBert): they mark no quantization, so not in IBERT_MODULES
BERT_LEAVES: tuple[type[nn.Module], ...] = (PaddingMask, PositionIds, MaskedMeanNormalize)


# --- Hugging Face BertLayer, made fx-traceable ---------------------------------------------------
class TraceableBertLayer(nn.Module):
    """A Hugging Face ``BertLayer`` (encoder, eval, no attention mask) rewritten in fx-traceable form.

    HF's forward builds shapes from ``hidden_states.shape`` (``(*input_shape, -1, head_dim)``),
    which fx cannot iterate, and dispatches attention through a registry. This module runs the
    same eager math -- the HF submodules themselves, shared, under the same qualified names
    (``attention.self.query``, ``intermediate.dense``, ...) -- with shape-free head splits
    (``unflatten`` / ``flatten``), so ``to_integer`` can trace it.

    ``masked=True``: ``forward(hidden, attention_mask)`` takes HF's additive attention mask
    (broadcastable to ``(batch, heads, query, key)``, e.g. ``(batch, 1, 1, key)`` from
    :func:`additive_attention_mask`), added to the scaled scores before the softmax as HF does.
    For integer inference its entries must be 0 or <= -1e4 (a padding mask).
    """

    def __init__(self, layer: nn.Module, masked: bool = False) -> None:
        super().__init__()
        for attr in ("attention", "intermediate", "output"):
            if not hasattr(layer, attr):
                raise HawqError(f"TraceableBertLayer: expected a transformers BertLayer, got {type(layer).__name__}")
        sa = layer.attention.self
        if getattr(layer, "add_cross_attention", False) or getattr(layer, "is_decoder", False):
            raise HawqError("TraceableBertLayer: decoder / cross-attention layers are not supported")
        if getattr(sa, "position_embedding_type", "absolute") != "absolute":
            raise HawqError("TraceableBertLayer: only absolute position embeddings are supported")
        if getattr(layer, "chunk_size_feed_forward", 0):
            raise HawqError("TraceableBertLayer: chunked feed-forward is not supported")
        self.attention, self.intermediate, self.output = layer.attention, layer.intermediate, layer.output
        self.heads, self.head_dim = int(sa.num_attention_heads), int(sa.attention_head_size)
        self.scaling = float(getattr(sa, "scaling", self.head_dim**-0.5))
        self.masked = bool(masked)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        # fx gives every argument a proxy, so an unmasked layer never reads attention_mask (and a
        # masked one always does): which graph is traced depends on ``masked`` only.
        if self.masked and attention_mask is None:
            raise HawqError("TraceableBertLayer(masked=True) needs an attention_mask")
        if not self.masked and attention_mask is not None and not isinstance(attention_mask, fx.Proxy):
            raise HawqError("TraceableBertLayer: got an attention_mask; build it with masked=True")
        sa, so = self.attention.self, self.attention.output
        split = (self.heads, self.head_dim)
        q = sa.query(hidden).unflatten(-1, split).transpose(1, 2)
        k = sa.key(hidden).unflatten(-1, split).transpose(1, 2)
        v = sa.value(hidden).unflatten(-1, split).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if self.masked:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1)
        context = sa.dropout(probs).matmul(v).transpose(1, 2).flatten(2)
        attended = so.LayerNorm(so.dropout(so.dense(context)) + hidden)
        out = self.output
        return out.LayerNorm(out.dropout(out.dense(self.intermediate(attended))) + attended)


def additive_attention_mask(padding_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A ``(batch, key)`` 1/0 padding mask (tokenizer ``attention_mask``) -> HF's additive ``(batch, 1, 1, key)`` mask.

    Kept positions are 0, padded ones ``finfo(dtype).min`` (as ``BertModel.get_extended_attention_mask``).
    """
    if padding_mask.dim() != 2:
        raise HawqError(f"additive_attention_mask: expected a (batch, key) padding mask, got shape "
                        f"{tuple(padding_mask.shape)}")
    keep = padding_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


# --- a whole Hugging Face BERT, made fx-traceable ------------------------------------------------
class TraceableBert(nn.Module):
    """A Hugging Face BERT classifier or sentence encoder as one fx-traceable module (same math, same names).

    ``BertForSequenceClassification`` (``kind="classifier"``: embeddings, encoder, pooler
    ``tanh(dense(h[:, 0]))``, classifier logits) or :class:`hawq.models.bert.SentenceEncoder`
    around a ``BertModel`` (``kind="encoder"``: embeddings, encoder, masked mean pooling and L2
    normalisation). The HF submodules are shared under their qualified names
    (``bert.embeddings.word_embeddings``, ``bert.encoder.layer.0.attention.self.query``,
    ``bert.pooler.dense``, ``classifier``), so bit maps and state dicts carry over; each encoder
    layer is a :class:`TraceableBertLayer` with the padding mask. ``forward(input_ids,
    attention_mask, token_type_ids)`` returns a tensor (the logits or the embedding).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        bert = getattr(model, "bert", None)
        if bert is None or not all(hasattr(bert, a) for a in ("embeddings", "encoder")):
            raise HawqError(f"TraceableBert: expected a BertForSequenceClassification or a SentenceEncoder "
                            f"around a BertModel, got {type(model).__name__}")
        emb = bert.embeddings
        if getattr(emb, "position_embedding_type", "absolute") != "absolute":
            raise HawqError("TraceableBert: only absolute position embeddings are supported")
        self.kind = "classifier" if hasattr(model, "classifier") else "encoder"
        self.bert = nn.Module()
        self.bert.embeddings = emb
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(TraceableBertLayer(layer, masked=True) for layer in bert.encoder.layer)
        if self.kind == "classifier":
            if getattr(bert, "pooler", None) is None:
                raise HawqError("TraceableBert: the classifier's BertModel has no pooler")
            problem = getattr(model.config, "problem_type", None)
            if problem not in (None, "single_label_classification"):
                raise HawqError(f"TraceableBert: problem_type '{problem}' is not supported")
            self.bert.pooler = bert.pooler
            self.dropout, self.classifier = model.dropout, model.classifier
        self.padding_mask, self.position_ids = PaddingMask(), PositionIds()
        if self.kind == "encoder":
            self.pooling = MaskedMeanNormalize()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        emb = self.bert.embeddings
        hidden = emb.word_embeddings(input_ids) + emb.token_type_embeddings(token_type_ids)
        hidden = hidden + emb.position_embeddings(self.position_ids(input_ids))
        hidden = emb.dropout(emb.LayerNorm(hidden))
        mask = self.padding_mask(attention_mask)
        for layer in self.bert.encoder.layer:
            hidden = layer(hidden, mask)
        if self.kind == "encoder":
            return self.pooling(hidden, attention_mask)
        pooler = self.bert.pooler
        pooled = pooler.activation(pooler.dense(hidden[:, 0]))
        return self.classifier(self.dropout(pooled))


def is_hf_bert(model: nn.Module) -> bool:
    """A model :class:`TraceableBert` rewrites: a transformers BERT classifier or a SentenceEncoder around one."""
    bert = getattr(model, "bert", None)
    return (bert is not None and type(bert).__name__ == "BertModel"
            and (type(model).__name__ == "BertForSequenceClassification" or type(model).__name__ == "SentenceEncoder"))
