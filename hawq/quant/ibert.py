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


class IntSoftmax(nn.Module):
    """:func:`int_softmax` over the last dim of integers already on the ``ln2 / 2^K`` grid."""

    def __init__(self, consts: ExpConstants, out_max: int) -> None:
        super().__init__()
        self.consts, self.out_max = consts, out_max

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        return int_softmax(x, self.consts, self.out_max, keep=keep)


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


class IntLayerNorm(nn.Module):
    def __init__(self, consts: LayerNormConstants) -> None:
        super().__init__()
        self.n, self.eps_int, self.f = consts.n, consts.eps_int, consts.f
        self.register_buffer("sign", consts.sign)
        self.register_buffer("bias_int", consts.bias_int)

    def forward(self, q: Tensor) -> Tensor:
        out = int_layernorm(q, self.n, self.eps_int, self.f, self.sign, self.bias_int)
        return check_overflow(out, "LayerNorm")


class IntMatmul(nn.Module):
    """Integer matmul of two quantized activations (codes x codes -> exact integer accumulator)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return check_overflow(torch.matmul(a.to(torch.int64), b.to(torch.int64)), f"matmul '{self.name}'")


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
        if mode not in ACT_MODES:
            raise HawqError(f"QuantSoftmax: mode must be one of {', '.join(ACT_MODES)}, got '{mode}'")
        self.mode = mode

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


IBERT_MODULES: tuple[type[nn.Module], ...] = (StaticGrid, QuantGELU, QuantSoftmax, QuantLayerNorm)


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
