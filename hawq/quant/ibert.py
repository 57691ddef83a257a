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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hawq import HawqError

ERF_A, ERF_B = -0.2888, -1.769  # I-BERT's erf polynomial (fit on [0, -b])
EXP_A, EXP_B, EXP_C = 0.3585, 1.353, 0.344  # I-BERT's exp polynomial on (-ln2, 0]
GELU_ERF_BITS = 14  # the erf term (and "1") are kept at this many bits: |q| * 2^15 < 2^31
EXP_FRACTION_BITS = 10  # softmax input grid S = ln2 / 2^10: exact range reduction by shift and mask
EXP_MAX_SHIFT = 30  # exp(x) for x < -30 ln2 is below 2^-30 of the row maximum: it is 0
INT32_MAX = 2**31 - 1
INT64_SAFE = 2**62


def _check(v: Tensor, limit: int, where: str) -> Tensor:
    if v.numel() and int(v.abs().max()) > limit:
        raise HawqError(f"integer transformer kernel: overflow in {where}")
    return v


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


def int_softmax(x: Tensor, c: ExpConstants, out_max: int, dim: int = -1) -> Tensor:
    """i-softmax of integers ``x`` on the grid ``c.scale``: codes in ``[0, out_max]``, scale ``1/out_max``.

    The row maximum is subtracted (integer), i-exp applied, and each entry normalised by an
    integer rounded division by the row sum, so a row's codes sum to ``out_max`` up to rounding
    (at most half a code per entry).
    """
    x = x.to(torch.int64)
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
    std = isqrt(_check(var, INT64_SAFE, "LayerNorm variance")).clamp_min(1)
    z = torch.div(torch.bitwise_left_shift(y, fraction_bits), std, rounding_mode="floor")
    return sign * z + bias_int


# --- thin modules ------------------------------------------------------------------------------
class IntGELU(nn.Module):
    """i-GELU on integer codes (constants fixed for the input grid at conversion)."""

    def __init__(self, consts: GeluConstants) -> None:
        super().__init__()
        self.consts = consts

    def forward(self, q: Tensor) -> Tensor:
        return _check(int_gelu(q, self.consts), INT32_MAX, "GELU")


class IntSoftmax(nn.Module):
    """:func:`int_softmax` over the last dim of integers already on the ``ln2 / 2^K`` grid."""

    def __init__(self, consts: ExpConstants, out_max: int) -> None:
        super().__init__()
        self.consts, self.out_max = consts, out_max

    def forward(self, x: Tensor) -> Tensor:
        return int_softmax(x, self.consts, self.out_max)


class IntLayerNorm(nn.Module):
    def __init__(self, consts: LayerNormConstants) -> None:
        super().__init__()
        self.n, self.eps_int, self.f = consts.n, consts.eps_int, consts.f
        self.register_buffer("sign", consts.sign)
        self.register_buffer("bias_int", consts.bias_int)

    def forward(self, q: Tensor) -> Tensor:
        out = int_layernorm(q, self.n, self.eps_int, self.f, self.sign, self.bias_int)
        return _check(out, INT32_MAX, "LayerNorm")


class IntMatmul(nn.Module):
    """Integer matmul of two quantized activations (codes x codes -> exact integer accumulator)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return _check(torch.matmul(a.to(torch.int64), b.to(torch.int64)), INT32_MAX, f"matmul '{self.name}'")


class IntMean(nn.Module):
    """Mean over non-feature dims: integer sum and a rounded integer division (scale unchanged)."""

    def __init__(self, dim: int | tuple[int, ...], keepdim: bool) -> None:
        super().__init__()
        self.dim, self.keepdim = dim, keepdim

    def forward(self, v: Tensor) -> Tensor:
        dims = (self.dim,) if isinstance(self.dim, int) else tuple(self.dim)
        n = math.prod(v.shape[d] for d in dims)
        return torch.div(v.sum(dim=dims, keepdim=self.keepdim) + n // 2, n, rounding_mode="floor")


class IntScale(nn.Module):
    """Multiplying by a negative constant: negate (the magnitude goes into the scale)."""

    def forward(self, v: Tensor) -> Tensor:
        return -v


# --- Hugging Face BertLayer, made fx-traceable ---------------------------------------------------
class TraceableBertLayer(nn.Module):
    """A Hugging Face ``BertLayer`` (encoder, eval, no attention mask) rewritten in fx-traceable form.

    HF's forward builds shapes from ``hidden_states.shape`` (``(*input_shape, -1, head_dim)``),
    which fx cannot iterate, and dispatches attention through a registry. This module runs the
    same eager math -- the HF submodules themselves, shared, under the same qualified names
    (``attention.self.query``, ``intermediate.dense``, ...) -- with shape-free head splits
    (``unflatten`` / ``flatten``), so ``to_integer`` can trace it. Padding masks are not supported:
    feed sequences of equal length.
    """

    def __init__(self, layer: nn.Module) -> None:
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

    def forward(self, hidden: Tensor) -> Tensor:
        sa, so = self.attention.self, self.attention.output
        split = (self.heads, self.head_dim)
        q = sa.query(hidden).unflatten(-1, split).transpose(1, 2)
        k = sa.key(hidden).unflatten(-1, split).transpose(1, 2)
        v = sa.value(hidden).unflatten(-1, split).transpose(1, 2)
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.scaling, dim=-1)
        context = sa.dropout(probs).matmul(v).transpose(1, 2).flatten(2)
        attended = so.LayerNorm(so.dropout(so.dense(context)) + hidden)
        out = self.output
        return out.LayerNorm(out.dropout(out.dense(self.intermediate(attended))) + attended)
