"""Integer-only inference (HAWQ-V3 style): convert a calibrated fake-quant model to integer ops.

Representation. Between operators a tensor travels as an integer tensor ``v`` (int32 range,
computed in int64) with a static, positive real scale ``s`` known at conversion time (a scalar
or one per channel): the real value is ``v * s``. Conv/Linear outputs are their int32
accumulators (``s = s_in * s_w``), so the fake-quant graph's float tensors between layers are
represented without loss. Each quantized layer requantizes its input to its own int8/int4
grid on entry -- exactly where the fake-quant model has its ``QuantAct`` -- with a dyadic
multiplier ``m / 2^c`` (integer multiply, add half, arithmetic shift). The only float
operations are quantizing the model input (``round(x / s)``) and the final dequantization
``v * s`` of the outputs.

Operators (the ``"integer"`` handlers of :data:`hawq.quant.ops.RULES`; each integer module lowers
itself to ONNX with ``to_onnx``): QuantConv2d / QuantBnConv2d / QuantLinear (the layer's own
``int_weight()`` codes x int8 input codes -> int32, bias in int32 at ``s_in * s_w``); BatchNorm2d
on an integer tensor (eval statistics; folded into the per-channel scale, a sign flip and an int32
bias); ReLU; residual add and concatenation (every operand rescaled to one common scale with dyadic
multipliers); max pool; global and windowed average pooling (integer window sum, then the exact
quotient by each position's divisor rounded half up: padding, ``count_include_pad``); flatten;
dropout and identity; a float transform of the model input before its quantization (Inception-V3's
``transform_input``), in float64. For detectors (RetinaNet: frozen-BN backbone, FPN, heads): torchvision's
``FrozenBatchNorm2d`` as BatchNorm; nearest upsampling (entries copied, scale kept); ``x.shape`` and its
entries (read at run time); view / reshape / permute / transpose, after a dyadic rescale of per-channel
scales to one per-tensor grid.

With ``QuantConfig.transformer == "ibert"``, transformer operators run in integer too (I-BERT
kernels of :mod:`hawq.quant.ibert`): i-GELU, i-softmax, i-LayerNorm (integer Newton sqrt), matmuls of two
requantized activations, constant rescales (``/ sqrt(d)``), mean over tokens and shape ops; for a whole
BERT (``TraceableBert``) also embedding lookups (:class:`IntEmbedding`), the padding mask as keep
flags, first-token selection, the pooler's i-tanh and masked mean pooling with L2 normalisation.
Linear layers with per-group weight scales are :class:`IntGroupLinear` (one accumulator per group).
Their input grids are static, calibrated on ``example_input`` (see :func:`to_integer`).

With ``float_ops=True``, operators without an integer rule (GELU, softmax, LayerNorm, attention
matmuls, embedding lookups) run as float64 islands on dequantized values (transformer blocks).

Two engines compute the int32 accumulations: ``"reference"`` (float64 conv/matmul on integer
values, exact below 2^53, checked against int32 overflow) and ``"int_mm"`` (``torch._int_mm``, a
real int8 x int8 -> int32 GEMM, with im2col for convs). Both feed the same integer rescaling,
so their outputs are bit-identical. On a CPU without VNNI, oneDNN's int8 GEMM behind
``torch._int_mm`` shifts the input by +128 and adds u8 x s8 pairs in a saturating int16 (wrong
sums for 8-bit weights); there (found by :func:`int_mm_saturates`) the int_mm engine multiplies the
duplicated input by the weight codes split into 7-bit halves (:func:`pair_safe_codes`), which
gives the exact sums.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import operator
from typing import Any, Protocol

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from hawq import HawqError
from hawq.quant.config import QuantConfig, check_quant_config
from hawq.quant.fx_rewrite import (
    REFERENCE_ACT_MAX_BITS,
    GraphRewriter,
    check_input_quant,
    check_weights,
    get_attr,
    source_weight_bias,
    working_copy,
)
from hawq.quant.ibert import (
    EXP_CLAMP,
    INNER_BITS,
    INNER_MARGIN,
    ExpConstants,
    GeluConstants,
    IntGELU,
    IntLayerNorm,
    IntMaskedMeanNormalize,
    IntMatmul,
    IntMean,
    IntPaddingKeep,
    IntScale,
    IntSoftmax,
    IntTanh,
    LayerNormConstants,
    MaskInput,
    PositionIds,
    QuantGELU,
    QuantLayerNorm,
    QuantSoftmax,
    StaticGrid,
    TanhConstants,
)
from hawq.quant.model import infer_quant_config
from hawq.quant.modules import QuantAct, QuantConv2d, QuantLinear
from hawq.quant.ops import QUANT_LAYERS, handles
from hawq.quant.quantizers import INT32_MAX, check_overflow

FRACTION_BITS = 16  # extra precision kept by BN and residual adds on integer tensors
EMBEDDING_BITS = 28  # an integer embedding's grid: 2^28 steps over its table's largest value
BACKENDS = ("reference", "int_mm")


# --- dyadic arithmetic (pure functions) ----------------------------------------------------------
def dyadic(ratio: Tensor) -> tuple[Tensor, Tensor]:
    """Approximate positive reals ``ratio`` by ``m / 2^c`` with ``m`` in ``[2^30, 2^31]`` (int64).

    31 significant bits: relative error <= 2^-31. Ratios below ``2^-32`` get the largest
    allowed shift (62), where ``m`` may become small or zero (their products round to 0 anyway).
    """
    r = ratio.to(torch.float64)
    if not bool((r > 0).all()) or not bool(torch.isfinite(r).all()):
        raise HawqError("dyadic: rescale ratios must be positive and finite (a zero or NaN scale?)")
    mant, exp = torch.frexp(r)  # r = mant * 2^exp, mant in [0.5, 1)
    shift = 31 - exp.to(torch.int64)
    if bool((shift < 0).any()):
        raise HawqError("dyadic: a rescale ratio >= 2^31 cannot be represented")
    m = torch.round(mant * 2.0**31).to(torch.int64)
    big = shift > 62
    if bool(big.any()):
        m = torch.where(big, torch.round(r * 2.0**62).to(torch.int64), m)
        shift = shift.clamp(max=62)
    return m, shift


def rescale(v: Tensor, m: Tensor, c: Tensor) -> Tensor:
    """``round(v * m / 2^c)`` in integers (round half up): multiply, add ``2^(c-1)``, arithmetic shift."""
    half = torch.where(c > 0, torch.bitwise_left_shift(torch.ones_like(c), (c - 1).clamp(min=0)),
                       torch.zeros_like(c))
    return torch.bitwise_right_shift(v.to(torch.int64) * m + half, c)


def pair_safe_codes(codes: Tensor) -> Tensor:
    """Split ``(out, in, ...)`` weight codes into ``cat([w_hi, w_lo], dim=1)`` with ``w_hi + w_lo = w``.

    ``w_hi = trunc(w / 2)``, so both halves lie in [-64, 64] for 8-bit codes and a u8 pair sum is at
    most ``255 * 128 = 32640`` (no int16 saturation). Fed with the input twice (``[x, x]`` per group),
    the layer accumulates exactly ``sum(x * w_hi) + sum(x * w_lo) = sum(x * w)``.
    """
    wide = codes.to(torch.int16)
    hi = torch.div(wide, 2, rounding_mode="trunc")
    return torch.cat([hi, wide - hi], dim=1).to(codes.dtype)


@functools.cache
def int_mm_saturates(weight_max: int = 127) -> bool:
    """Whether ``torch._int_mm`` on this CPU loses exactness for int8 weights up to ``weight_max``.

    Compared with the exact int64 product on all-extreme and random int8 operands: oneDNN without
    VNNI (``ONEDNN_MAX_CPU_ISA`` below ``AVX2_VNNI``/``AVX512_CORE_VNNI``) saturates int16 pair sums.
    """
    gen = torch.Generator().manual_seed(0)
    w = (torch.randint(0, 2, (64, 32), generator=gen) * 2 - 1) * weight_max
    w[:, 0] = weight_max  # one column with every product at its extreme
    x = torch.randint(-128, 128, (32, 64), generator=gen)
    x[0] = 127
    exact = x @ w
    return not torch.equal(torch._int_mm(x.to(torch.int8), w.to(torch.int8)).to(torch.int64), exact)


def int_mm_exact(x8: Tensor, weight_mat_t: Tensor, owner: nn.Module) -> Tensor:
    """``torch._int_mm(x8, weight_mat_t)`` with exact int32 sums on every CPU (see the module doc).

    The split weight matrix is built once per layer, on first use, and kept on ``owner``.
    """
    if x8.device.type != "cpu" or not int_mm_saturates():
        return torch._int_mm(x8, weight_mat_t)
    split = getattr(owner, "_weight_split_t", None)
    if split is None or split.device != weight_mat_t.device:
        if int_mm_saturates(64):
            raise HawqError("integer inference: torch._int_mm saturates even with 7-bit weights on this CPU; "
                            "use set_integer_backend(model, 'reference')")
        split = pair_safe_codes(weight_mat_t.t()).t().contiguous()
        owner._weight_split_t = split
    return torch._int_mm(torch.cat([x8, x8], dim=1), split)


# --- ONNX lowering contract ----------------------------------------------------------------------
class OnnxBuilder(Protocol):
    """What an integer module's ``to_onnx(g, args, name)`` writes with (``hawq.export`` implements it).

    Tensors are value names; integer tensors travel as INT64. ``const`` stores ``value`` as an
    initializer of the torch ``dtype``; ``cast`` converts to a torch dtype; ``rescale`` is
    :func:`rescale` (``floor((v * m + 2^(c-1)) / 2^c)``) and ``floor_div`` is ``floor(a / d)``, d > 0.
    Each integer module lowers itself, so adding an integer op never touches the exporter.
    """

    def op(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str: ...
    def const(self, base: str, value: Tensor | int | float | list, dtype: torch.dtype) -> str: ...
    def cast(self, v: str, dtype: torch.dtype, base: str) -> str: ...
    def rescale(self, v: str, mult: Tensor, shift: Tensor, base: str) -> str: ...
    def floor_div(self, a: str, d: str, base: str) -> str: ...


# --- integer operators (thin modules) ------------------------------------------------------------
class _InputRequant(nn.Module):
    """Entry of a quantized layer: int tensor (or the float model input) -> codes on its grid."""

    def _setup_input(self, src_scale: Tensor | None, act_scale: float, qmin: int, qmax: int) -> None:
        self.qmin, self.qmax = qmin, qmax
        self.from_float = src_scale is None
        self.register_buffer("act_scale", torch.tensor(float(act_scale), dtype=torch.float64))
        if src_scale is None:
            self.register_buffer("in_mult", torch.zeros((), dtype=torch.int64))
            self.register_buffer("in_shift", torch.zeros((), dtype=torch.int64))
        else:
            m, c = dyadic(src_scale / act_scale)
            self.register_buffer("in_mult", m)
            self.register_buffer("in_shift", c)

    def input_codes(self, x: Tensor) -> Tensor:
        if self.from_float:  # the one float -> int step: quantize the model input
            q = torch.round(x.to(torch.float64) / self.act_scale)
            return q.clamp(self.qmin, self.qmax).to(torch.int64)
        return rescale(x, self.in_mult, self.in_shift).clamp(self.qmin, self.qmax)

    def onnx_input_codes(self, g: OnnxBuilder, v: str, name: str) -> str:
        """:meth:`input_codes` in ONNX, as INT8 codes (UINT8 for an unsigned 8-bit grid)."""
        if self.qmin < -128 or self.qmax > 255:  # MatMulInteger / ConvInteger take 8-bit inputs only
            raise HawqError(f"export_onnx_integer: layer '{name}' has input codes wider than 8 bits "
                            f"({self.qmin}..{self.qmax}); only the reference integer engine runs them")
        if self.from_float:  # round(x / s) in float64, as the PyTorch integer model does
            x = g.cast(v, torch.float64, f"{name}_in_f64")
            q = g.op("Round", [g.op("Div", [x, g.const(f"{name}_act_scale", self.act_scale, torch.float64)],
                                    f"{name}_in_scaled")], f"{name}_in_round")
            q = g.op("Clip", [q, g.const(f"{name}_qmin_f", self.qmin, torch.float64),
                              g.const(f"{name}_qmax_f", self.qmax, torch.float64)], f"{name}_in_clip")
        else:
            q = g.rescale(v, self.in_mult, self.in_shift, f"{name}_requant")
            q = g.op("Clip", [q, g.const(f"{name}_qmin", self.qmin, torch.int64),
                              g.const(f"{name}_qmax", self.qmax, torch.int64)], f"{name}_in_clip")
        return g.cast(q, torch.uint8 if self.qmax > 127 else torch.int8, f"{name}_codes")

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        """``ConvInteger`` / ``MatMulInteger`` on the input codes, widened to INT64, plus the int32 bias."""
        x = self.onnx_input_codes(g, args[0], name)
        codes = self.weight_codes
        if codes.dtype != torch.int8:
            raise HawqError(f"export_onnx_integer: layer '{name}' has weight codes wider than 8 bits")
        acc, bias_shape = self.onnx_accumulate(g, x, name)
        out = g.cast(acc, torch.int64, f"{name}_acc64")
        if self.bias_int is not None:
            out = g.op("Add", [out, g.const(f"{name}_bias_int", self.bias_int.reshape(bias_shape), torch.int64)],
                       f"{name}_out")
        return out

    def onnx_accumulate(self, g: OnnxBuilder, x: str, name: str) -> tuple[str, tuple[int, ...]]:
        raise NotImplementedError


class IntConv2d(_InputRequant):
    """Integer conv: requantize input -> int8 codes (*) int8 weight codes -> int32 + int32 bias."""

    def __init__(self, codes: Tensor, bias: Tensor | None, conv: nn.Conv2d, src_scale: Tensor | None,
                 act: QuantAct, name: str) -> None:
        super().__init__()
        self.layer_name = name
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, \
            conv.groups
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise HawqError(f"to_integer: conv '{name}' needs numeric zero padding")
        self._setup_input(src_scale, float(act.scale), act.qmin, act.qmax)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("bias_int", bias)
        self.backend = "reference"
        self.int_mm_ok = codes.dtype == torch.int8 and act.bits <= 8 and conv.groups == 1
        self.unsigned_shift = 128 if self.qmax > 127 else 0  # uint8 codes ride as int8 (q - 128)
        wmat = codes.reshape(codes.shape[0], -1)
        self.register_buffer("weight_mat_t", wmat.t().contiguous() if self.int_mm_ok else None)
        self.register_buffer("weight_rowsum", wmat.to(torch.int64).sum(1).to(torch.int32))

    def accumulate(self, q: Tensor) -> Tensor:
        if self.backend == "int_mm" and self.int_mm_ok:
            return self._accumulate_int_mm(q)
        acc = F.conv2d(q.to(torch.float64), self.weight_codes.to(torch.float64), None, self.stride,
                       self.padding, self.dilation, self.groups)
        return check_overflow(acc.to(torch.int64), f"conv '{self.layer_name}'")

    def _accumulate_int_mm(self, q: Tensor) -> Tensor:
        kh, kw = self.weight_codes.shape[2:]
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        x8 = (q - self.unsigned_shift).to(torch.int8)
        # Padding holds real zeros, i.e. code 0, which is -shift after the uint8 -> int8 move.
        x8 = F.pad(x8, (pw, pw, ph, ph), value=-self.unsigned_shift)
        n, c = x8.shape[:2]
        cols = x8.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
        ho, wo = cols.shape[2:4]
        cols = cols.permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
        acc = int_mm_exact(cols, self.weight_mat_t, self)
        if self.unsigned_shift:
            acc = acc + self.unsigned_shift * self.weight_rowsum
        return acc.reshape(n, ho, wo, -1).permute(0, 3, 1, 2).to(torch.int64)

    def forward(self, x: Tensor) -> Tensor:
        acc = self.accumulate(self.input_codes(x))
        if self.bias_int is not None:
            acc = acc + self.bias_int.to(torch.int64).reshape(1, -1, 1, 1)
        return acc

    def onnx_accumulate(self, g: OnnxBuilder, x: str, name: str) -> tuple[str, tuple[int, ...]]:
        codes = self.weight_codes
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        acc = g.op("ConvInteger", [x, g.const(f"{name}_weight_codes", codes, torch.int8)], f"{name}_acc",
                   pads=[ph, pw, ph, pw], strides=[sh, sw], dilations=[dh, dw], group=self.groups,
                   kernel_shape=list(codes.shape[2:]))
        return acc, (1, -1, 1, 1)


class IntLinear(_InputRequant):
    """Integer linear layer (same contract as :class:`IntConv2d`), over the last dim."""

    def __init__(self, codes: Tensor, bias: Tensor | None, src_scale: Tensor | None, act: QuantAct,
                 name: str) -> None:
        super().__init__()
        self.layer_name = name
        self._setup_input(src_scale, float(act.scale), act.qmin, act.qmax)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("bias_int", bias)
        self.backend = "reference"
        self.int_mm_ok = codes.dtype == torch.int8 and act.bits <= 8
        self.unsigned_shift = 128 if self.qmax > 127 else 0
        self.register_buffer("weight_mat_t", codes.t().contiguous() if self.int_mm_ok else None)
        self.register_buffer("weight_rowsum", codes.to(torch.int64).sum(1).to(torch.int32))

    def accumulate(self, q: Tensor) -> Tensor:
        if self.backend == "int_mm" and self.int_mm_ok:
            lead = q.shape[:-1]
            x8 = (q - self.unsigned_shift).to(torch.int8).reshape(-1, q.shape[-1])
            acc = int_mm_exact(x8, self.weight_mat_t, self)
            if self.unsigned_shift:
                acc = acc + self.unsigned_shift * self.weight_rowsum
            return acc.reshape(*lead, -1).to(torch.int64)
        acc = q.to(torch.float64) @ self.weight_codes.to(torch.float64).t()
        return check_overflow(acc.to(torch.int64), f"linear '{self.layer_name}'")

    def forward(self, x: Tensor) -> Tensor:
        acc = self.accumulate(self.input_codes(x))
        if self.bias_int is not None:
            acc = acc + self.bias_int.to(torch.int64)
        return acc

    def onnx_accumulate(self, g: OnnxBuilder, x: str, name: str) -> tuple[str, tuple[int, ...]]:
        w = g.const(f"{name}_weight_codes_t", self.weight_codes.t(), torch.int8)
        return g.op("MatMulInteger", [x, w], f"{name}_acc"), (-1,)


class IntGroupLinear(_InputRequant):
    """Integer linear layer with per-group weight scales (Q-BERT style ``group_size``), over the last dim.

    Each group of ``in / groups`` inputs gives its own int32 accumulator ``acc_g`` (codes x codes); each
    is rescaled (dyadic ``mult[g, o] / 2^shift[g, o]``) from its scale ``s_in * s_w[o, g]`` to the output
    feature's grid and the groups are summed, plus the int32 bias on that grid.
    """

    def __init__(self, codes: Tensor, bias: Tensor | None, src_scale: Tensor | None, act: QuantAct, name: str,
                 mult: Tensor, shift: Tensor, in_rank: int) -> None:
        super().__init__()
        self.layer_name = name
        self._setup_input(src_scale, float(act.scale), act.qmin, act.qmax)
        self.groups, self.in_rank = int(mult.shape[0]), in_rank
        self.register_buffer("weight_codes", codes)
        self.register_buffer("bias_int", bias)
        self.register_buffer("mult", mult)  # (groups, out)
        self.register_buffer("shift", shift)

    def forward(self, x: Tensor) -> Tensor:
        q = self.input_codes(x).unflatten(-1, (self.groups, -1)).to(torch.float64)
        w = self.weight_codes.to(torch.float64).unflatten(1, (self.groups, -1))
        acc = check_overflow(torch.einsum("...gi,ogi->...go", q, w).to(torch.int64), f"linear '{self.layer_name}'")
        out = rescale(acc, self.mult, self.shift).sum(-2)
        return out if self.bias_int is None else out + self.bias_int.to(torch.int64)

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        x = self.onnx_input_codes(g, args[0], name)
        codes = self.weight_codes
        if codes.dtype != torch.int8:
            raise HawqError(f"export_onnx_integer: layer '{name}' has weight codes wider than 8 bits")
        r, out_features = self.in_rank, codes.shape[0]
        parts = g.op("Reshape", [x, g.const(f"{name}_split", [0] * (r - 1) + [self.groups, -1], torch.int64)],
                     f"{name}_parts")
        # groups first: (groups, ..., group_size) x (groups, 1.., group_size, out) -> (groups, ..., out)
        front = g.op("Transpose", [parts], f"{name}_front", perm=[r - 1, *range(r - 1), r])
        w = codes.unflatten(1, (self.groups, -1)).permute(1, 2, 0).reshape(self.groups, *[1] * (r - 2), -1,
                                                                            out_features)
        acc = g.cast(g.op("MatMulInteger", [front, g.const(f"{name}_weight_codes", w, torch.int8)], f"{name}_acc"),
                     torch.int64, f"{name}_acc64")
        lead = (self.groups, *[1] * (r - 1), out_features)
        scaled = g.rescale(acc, self.mult.reshape(lead), self.shift.reshape(lead), f"{name}_group")
        out = g.op("ReduceSum", [scaled, g.const(f"{name}_axes", [0], torch.int64)], f"{name}_sum", keepdims=0)
        if self.bias_int is not None:
            out = g.op("Add", [out, g.const(f"{name}_bias_int", self.bias_int, torch.int64)], f"{name}_out")
        return out


class IntChannelAffine(nn.Module):
    """Eval BatchNorm on an integer tensor: ``v' = (+-2^k) * v + b``.

    The BN gain's magnitude goes into the (per-channel) scale; ``2^k`` adds fractional bits
    (as many as int32 headroom allows) so that rounding the BN shift to the grid costs almost
    nothing.
    """

    def __init__(self, mult: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.register_buffer("mult", mult.to(torch.int64).reshape(1, -1, 1, 1))
        self.register_buffer("bias_int", bias.to(torch.int64).reshape(1, -1, 1, 1))

    def forward(self, v: Tensor) -> Tensor:
        return v * self.mult + self.bias_int

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        scaled = g.op("Mul", [args[0], g.const(f"{name}_mult", self.mult, torch.int64)], f"{name}_scaled")
        return g.op("Add", [scaled, g.const(f"{name}_bias_int", self.bias_int, torch.int64)], f"{name}_out")


def _register_rescales(module: nn.Module, scales: dict[Any, Tensor], scale_out: Tensor) -> None:
    """Buffers ``mult_<tag>`` / ``shift_<tag>``: the dyadic rescale of each input's grid to ``scale_out``
    (the operands of an add or a concatenation on one shared grid)."""
    for tag, scale in scales.items():
        m, c = dyadic(scale / scale_out)
        module.register_buffer(f"mult_{tag}", m)
        module.register_buffer(f"shift_{tag}", c)


class IntAdd(nn.Module):
    """Residual add: both operands rescaled (dyadic) to the common, coarser scale, then added."""

    def __init__(self, scale_a: Tensor, scale_b: Tensor, scale_out: Tensor, name: str) -> None:
        super().__init__()
        self.name = name
        _register_rescales(self, {"a": scale_a, "b": scale_b}, scale_out)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        out = rescale(a, self.mult_a, self.shift_a) + rescale(b, self.mult_b, self.shift_b)
        return check_overflow(out, f"add '{self.name}'")

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        lhs = g.rescale(args[0], self.mult_a, self.shift_a, f"{name}_a")
        rhs = g.rescale(args[1], self.mult_b, self.shift_b, f"{name}_b")
        return g.op("Add", [lhs, rhs], f"{name}_out")


class IntReLU(nn.Module):
    def forward(self, v: Tensor) -> Tensor:
        return v.clamp_min(0)

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        return g.op("Max", [args[0], g.const(f"{name}_zero", 0, torch.int64)], f"{name}_out")


class IntMaxPool2d(nn.Module):
    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.pool = copy.deepcopy(pool)

    def forward(self, v: Tensor) -> Tensor:
        return self.pool(v)

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        pool = self.pool
        if pool.return_indices:
            raise HawqError(f"export_onnx_integer: max pool '{name}' returns indices")
        pair = nn.modules.utils._pair
        k, s = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size)
        p, d = pair(pool.padding), pair(pool.dilation)
        # DOUBLE holds every int32 value exactly; onnxruntime has no INT64 MaxPool.
        x = g.cast(args[0], torch.float64, f"{name}_f64")
        y = g.op("MaxPool", [x], f"{name}_pool", kernel_shape=list(k), strides=list(s),
                 pads=[p[0], p[1], p[0], p[1]], dilations=list(d), ceil_mode=int(pool.ceil_mode))
        return g.cast(y, torch.int64, f"{name}_out")


class IntSumPool2d(nn.Module):
    """Global average pooling as an integer sum and a rounded integer division (scale unchanged)."""

    def forward(self, v: Tensor) -> Tensor:
        n = v.shape[-1] * v.shape[-2]
        s = v.sum(dim=(-2, -1), keepdim=True)
        return torch.div(s + n // 2, n, rounding_mode="floor")

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        total = g.op("ReduceSum", [args[0], g.const(f"{name}_axes", [2, 3], torch.int64)], f"{name}_sum",
                     keepdims=1)
        hw = g.op("Slice", [g.op("Shape", [args[0]], f"{name}_shape"), g.const(f"{name}_start", [2], torch.int64),
                            g.const(f"{name}_end", [4], torch.int64)], f"{name}_hw")
        n = g.op("ReduceProd", [hw], f"{name}_n", keepdims=0)
        half = g.op("Div", [n, g.const(f"{name}_two", 2, torch.int64)], f"{name}_half")
        return g.floor_div(g.op("Add", [total, half], f"{name}_biased"), n, name)


class IntAvgPool2d(nn.Module):
    """Windowed average pooling (``avg_pool2d``, ``ceil_mode=False``) on an integer tensor.

    ``out = floor((S * 2^k + n // 2) / n)``: ``S`` is the exact integer sum of the window over the
    zero-padded input, ``n`` the divisor of that output position (``kh * kw`` with
    ``count_include_pad``, the number of in-bounds elements without it, or ``divisor_override``) and
    ``2^k`` the fractional bits the output gains (its scale is the input's ``/ 2^k``). That is the
    exact quotient ``S * 2^k / n`` rounded half up -- the one rounding of the op.
    """

    def __init__(self, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 count_include_pad: bool, divisor_override: int | None, frac_bits: int) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override
        self.frac_bits = frac_bits

    def _window_sum(self, v: Tensor) -> Tensor:
        # float64 holds every sum of kh*kw int32 values exactly; the pads add zeros.
        s = F.avg_pool2d(v.to(torch.float64), self.kernel, self.stride, self.padding, divisor_override=1)
        return s.to(torch.int64)

    def _const_divisor(self) -> int | None:
        if self.divisor_override is not None:
            return int(self.divisor_override)
        if self.count_include_pad or self.padding == (0, 0):  # ceil_mode=False: every window is whole
            return self.kernel[0] * self.kernel[1]
        return None

    def forward(self, v: Tensor) -> Tensor:
        total = self._window_sum(v) * 2**self.frac_bits
        n: Tensor | int | None = self._const_divisor()
        if n is None:  # in-bounds elements per output position
            n = self._window_sum(torch.ones((1, 1, *v.shape[-2:]), dtype=torch.int64, device=v.device))
        return torch.div(total + n // 2, n, rounding_mode="floor")

    def _onnx_window_sum(self, g: OnnxBuilder, x: str, name: str) -> str:
        """The window sum as ``kh * kw`` strided slices of the zero-padded input, added in INT64."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        if ph or pw:
            x = g.op("Pad", [x, g.const(f"{name}_pads", [0, 0, ph, pw, 0, 0, ph, pw], torch.int64)], f"{name}_pad")
        steps = g.const(f"{name}_steps", [sh, sw], torch.int64)
        axes = g.const(f"{name}_axes", [2, 3], torch.int64)
        total = None
        big = 2**62
        for i in range(kh):
            for j in range(kw):
                # From offset (i, j) to (kh-1-i, kw-1-j) before the end: exactly the output size per axis.
                ends = [-(kh - 1 - i) or big, -(kw - 1 - j) or big]
                part = g.op("Slice", [x, g.const(f"{name}_start_{i}_{j}", [i, j], torch.int64),
                                      g.const(f"{name}_end_{i}_{j}", ends, torch.int64), axes, steps],
                            f"{name}_win_{i}_{j}")
                total = part if total is None else g.op("Add", [total, part], f"{name}_sum_{i}_{j}")
        return total

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        total = self._onnx_window_sum(g, args[0], name)
        if self.frac_bits:
            total = g.op("Mul", [total, g.const(f"{name}_frac", 2**self.frac_bits, torch.int64)], f"{name}_scaled")
        const_n = self._const_divisor()
        if const_n is not None:
            n, half = g.const(f"{name}_n", const_n, torch.int64), g.const(f"{name}_half", const_n // 2, torch.int64)
        else:
            corner = g.op("Slice", [args[0], g.const(f"{name}_c0", [0, 0], torch.int64),
                                    g.const(f"{name}_c1", [1, 1], torch.int64),
                                    g.const(f"{name}_caxes", [0, 1], torch.int64)], f"{name}_corner")
            zero = g.op("Mul", [corner, g.const(f"{name}_zero", 0, torch.int64)], f"{name}_zeros")
            ones = g.op("Add", [zero, g.const(f"{name}_one", 1, torch.int64)], f"{name}_ones")
            n = self._onnx_window_sum(g, ones, f"{name}_count")
            half = g.op("Div", [n, g.const(f"{name}_two", 2, torch.int64)], f"{name}_half")  # n > 0: floor
        return g.floor_div(g.op("Add", [total, half], f"{name}_biased"), n, name)


class IntCat(nn.Module):
    """Concatenation on one shared grid: each input rescaled (dyadic) to the common scale, then joined."""

    def __init__(self, scales: list[Tensor], scale_out: Tensor, dim: int) -> None:
        super().__init__()
        self.dim, self.n = dim, len(scales)
        _register_rescales(self, dict(enumerate(scales)), scale_out)

    def forward(self, *vs: Tensor) -> Tensor:
        return torch.cat([rescale(v, getattr(self, f"mult_{i}"), getattr(self, f"shift_{i}"))
                          for i, v in enumerate(vs)], self.dim)

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        parts = [g.rescale(a, getattr(self, f"mult_{i}"), getattr(self, f"shift_{i}"), f"{name}_{i}")
                 for i, a in enumerate(args)]
        return g.op("Concat", parts, f"{name}_out", axis=self.dim)


class IntRegrid(nn.Module):
    """Per-channel scales -> one per-tensor grid (a dyadic rescale per channel, no clamp): what a
    layout op that moves channels (view / permute) needs first."""

    def __init__(self, scale: Tensor, scale_out: Tensor) -> None:
        super().__init__()
        _register_rescales(self, {"in": scale}, scale_out)

    def forward(self, v: Tensor) -> Tensor:
        return rescale(v, self.mult_in, self.shift_in)

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        return g.rescale(args[0], self.mult_in, self.shift_in, f"{name}_out")


class SizeOf(nn.Module):
    """``x.shape`` (an integer tensor has its real tensor's size); ONNX ``Shape`` (1-D INT64)."""

    def forward(self, v: Tensor) -> torch.Size:
        return v.shape

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        return g.op("Shape", [args[0]], f"{name}_out")


class SizeItem(nn.Module):
    """``size[i]`` (an int) or ``size[a:b]`` (a size); in ONNX always a 1-D INT64 tensor (an entry: one element)."""

    def __init__(self, index: int | slice) -> None:
        super().__init__()
        self.index = index

    def forward(self, size: torch.Size) -> int | torch.Size:
        return size[self.index]

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        if isinstance(self.index, int):
            return g.op("Gather", [args[0], g.const(f"{name}_index", [self.index], torch.int64)], f"{name}_out",
                        axis=0)
        sl = self.index
        return g.op("Slice", [args[0], g.const(f"{name}_start", [sl.start or 0], torch.int64),
                              g.const(f"{name}_end", [2**62 if sl.stop is None else sl.stop], torch.int64)],
                    f"{name}_out")


def _size_entries(spec: list[int | None], sizes: tuple[Any, ...]) -> list[int]:
    """``spec`` with each None replaced by the next of ``sizes`` (an int, or a size whose entries it spreads)."""
    out: list[int] = []
    it = iter(sizes)
    for entry in spec:
        if entry is not None:
            out.append(entry)
            continue
        s = next(it)
        out.extend([int(s)] if isinstance(s, (int, Tensor)) else [int(d) for d in s])
    return out


class IntLayout(nn.Module):
    """view / reshape / permute of an integer tensor on a per-tensor grid: entries move, the grid is kept.

    ``spec``: the target size for ``"reshape"`` (ints; None for each size value passed after the
    tensor, e.g. ``x.shape[0]``), the permutation for ``"permute"``.
    """

    def __init__(self, kind: str, spec: list[int | None]) -> None:
        super().__init__()
        self.kind, self.spec = kind, list(spec)

    def forward(self, v: Tensor, *sizes: Any) -> Tensor:
        if self.kind == "permute":
            return v.permute(*self.spec)
        return v.reshape(_size_entries(self.spec, sizes))

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        if self.kind == "permute":
            return g.op("Transpose", [args[0]], f"{name}_out", perm=list(self.spec))
        sizes = iter(args[1:])
        parts = [g.const(f"{name}_dim{i}", [e], torch.int64) if e is not None else next(sizes)
                 for i, e in enumerate(self.spec)]
        shape = parts[0] if len(parts) == 1 else g.op("Concat", parts, f"{name}_shape", axis=0)
        return g.op("Reshape", [args[0], shape], f"{name}_out")


class IntUpsampleNearest(nn.Module):
    """Nearest upsampling of an integer tensor (``F.interpolate(mode="nearest")``): entries copied.

    The size comes as an argument (``x.shape[-2:]`` of another tensor, as torchvision's FPN passes it)
    or fixed (``size`` / ``scale_factor``). PyTorch picks the source entries in its own kernel (float64
    holds every int32 exactly); ONNX ``Resize`` (nearest, asymmetric, floor) picks the same ones.
    """

    def __init__(self, size: list[int] | None, scale_factor: list[float] | None) -> None:
        super().__init__()
        self.size, self.scale_factor = size, scale_factor

    def forward(self, v: Tensor, size: Any = None) -> Tensor:
        size = self.size if size is None else [int(s) for s in size]
        out = F.interpolate(v.to(torch.float64), size=size, scale_factor=None if size else self.scale_factor,
                            mode="nearest")
        return out.to(torch.int64)

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        x = args[0]
        if len(args) > 1 or self.size is not None:
            nc = g.op("Slice", [g.op("Shape", [x], f"{name}_shape"), g.const(f"{name}_s0", [0], torch.int64),
                                g.const(f"{name}_s1", [2], torch.int64)], f"{name}_nc")
            hw = args[1] if len(args) > 1 else g.const(f"{name}_hw", self.size, torch.int64)
            sizes = g.op("Concat", [nc, hw], f"{name}_sizes", axis=0)
            inputs = [x, "", "", sizes]
        else:
            inputs = [x, "", g.const(f"{name}_scales", [1.0, 1.0, *self.scale_factor], torch.float32)]
        # onnxruntime's Resize takes no INT64 (nor DOUBLE); the values fit int32 (bound checked at conversion).
        y = g.op("Resize", [g.cast(x, torch.int32, f"{name}_i32"), *inputs[1:]], f"{name}_resize",
                 mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        return g.cast(y, torch.int64, f"{name}_out")


class IntFlatten(nn.Module):
    def __init__(self, start_dim: int, end_dim: int) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, v: Tensor) -> Tensor:
        return torch.flatten(v, self.start_dim, self.end_dim)

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        return g.op("Flatten", [args[0]], f"{name}_out", axis=self.start_dim)


class IntRequant(nn.Module):
    """Integer tensor (scale scalar or per last-dim feature) -> codes on a per-tensor grid (dyadic)."""

    def __init__(self, src_scale: Tensor, scale: Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        m, c = dyadic(src_scale / scale)
        self.register_buffer("mult", m)
        self.register_buffer("shift", c)
        self.qmin, self.qmax = qmin, qmax

    def forward(self, v: Tensor) -> Tensor:
        return rescale(v, self.mult, self.shift).clamp(self.qmin, self.qmax)

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        q = g.rescale(args[0], self.mult, self.shift, f"{name}_rescale")
        return g.op("Clip", [q, g.const(f"{name}_qmin", self.qmin, torch.int64),
                             g.const(f"{name}_qmax", self.qmax, torch.int64)], f"{name}_out")


class QuantizeInput(nn.Module):
    """The float model input -> codes on a calibrated grid (an input quantization, like a layer entry)."""

    from_float = True

    def __init__(self, scale: Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        self.register_buffer("act_scale", scale.to(torch.float64))
        self.qmin, self.qmax = qmin, qmax

    def forward(self, x: Tensor) -> Tensor:
        return torch.round(x.to(torch.float64) / self.act_scale).clamp(self.qmin, self.qmax).to(torch.int64)

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        x = g.cast(args[0], torch.float64, f"{name}_f64")
        q = g.op("Round", [g.op("Div", [x, g.const(f"{name}_scale", self.act_scale, torch.float64)], f"{name}_div")],
                 f"{name}_round")
        q = g.op("Clip", [q, g.const(f"{name}_qmin", self.qmin, torch.float64),
                          g.const(f"{name}_qmax", self.qmax, torch.float64)], f"{name}_clip")
        return g.cast(q, torch.int64, f"{name}_out")


class IntEmbedding(nn.Module):
    """Integer embedding lookup: the code table's rows, each row's (or group's) scale rescaled to one grid.

    ``codes``: ``(rows, dim)`` integer codes; ``mult`` / ``shift``: ``(rows, groups)`` dyadic factors from
    each row's (group's) weight scale to the output grid. Out: ``round(code * m / 2^c)`` per entry.
    """

    def __init__(self, codes: Tensor, mult: Tensor, shift: Tensor, index_rank: int) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("mult", mult)
        self.register_buffer("shift", shift)
        self.groups, self.index_rank = int(mult.shape[1]), index_rank

    def forward(self, ids: Tensor) -> Tensor:
        c = self.codes[ids].to(torch.int64)
        parts = c.unflatten(-1, (self.groups, -1))
        out = rescale(parts, self.mult[ids].unsqueeze(-1), self.shift[ids].unsqueeze(-1))
        return out.flatten(-2)

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        ids, keep = args[0], [0] * self.index_rank
        c = self.shift.to(torch.int64)
        half = torch.where(c > 0, torch.ones_like(c) << (c - 1).clamp(min=0), torch.zeros_like(c))

        def rows(base: str, table: Tensor, dtype: torch.dtype) -> str:
            return g.op("Gather", [g.const(f"{name}_{base}", table, dtype), ids], f"{name}_{base}_rows", axis=0)

        codes = g.cast(rows("codes", self.codes, torch.int8 if self.codes.dtype == torch.int8 else torch.int16),
                       torch.int64, f"{name}_codes64")
        split = g.const(f"{name}_split", [*keep, self.groups, -1], torch.int64)
        parts = g.op("Reshape", [codes, split], f"{name}_parts")
        ax = g.const(f"{name}_ax", [-1], torch.int64)
        m, h, d = (g.op("Unsqueeze", [rows(base, t, torch.int64), ax], f"{name}_{base}_col")
                   for base, t in (("mult", self.mult), ("half", half), ("div", torch.ones_like(c) << c)))
        biased = g.op("Add", [g.op("Mul", [parts, m], f"{name}_prod"), h], f"{name}_biased")
        out = g.floor_div(biased, d, f"{name}_rescaled")
        return g.op("Reshape", [out, g.const(f"{name}_join", [*keep, -1], torch.int64)], f"{name}_out")


class IntSelect(nn.Module):
    """``v[index]`` with integers and full slices before the last dim (e.g. BERT's first token ``h[:, 0]``)."""

    def __init__(self, index: tuple[int | slice, ...]) -> None:
        super().__init__()
        self.index = index

    def forward(self, v: Tensor) -> Tensor:
        return v[self.index]

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        x, axis = args[0], 0
        for k, item in enumerate(self.index):
            if isinstance(item, int):  # Gather with a scalar index drops the axis
                x = g.op("Gather", [x, g.const(f"{name}_idx_{k}", item, torch.int64)], f"{name}_take_{k}", axis=axis)
            else:
                axis += 1
        return x


class IntShape(nn.Module):
    """A tensor method that only moves entries (transpose, permute, unflatten, flatten, view, reshape,
    contiguous) on integer values; ``rank``: the input's number of dims (for the ONNX lowering)."""

    def __init__(self, method: str, args: tuple, rank: int) -> None:
        super().__init__()
        self.method, self.args, self.rank = method, args, rank

    def forward(self, v: Tensor) -> Tensor:
        return getattr(v, self.method)(*self.args)

    def _dims(self) -> list[int]:
        a, r = self.args, self.rank
        if self.method == "transpose":
            perm = list(range(r))
            i, j = a[0] % r, a[1] % r
            perm[i], perm[j] = perm[j], perm[i]
            return perm
        dims = list(a[0]) if len(a) == 1 and isinstance(a[0], (list, tuple)) else list(a)
        return [d % r for d in dims]

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        x, a, r = args[0], self.args, self.rank
        if self.method == "contiguous":
            return g.op("Identity", [x], f"{name}_out")
        if self.method in ("transpose", "permute"):
            return g.op("Transpose", [x], f"{name}_out", perm=self._dims())
        if self.method == "unflatten" and a and a[0] % r == r - 1:  # the last dim split: leading dims copied
            shape = [0] * (r - 1) + list(a[1])
        elif self.method == "flatten" and (a[1] if len(a) > 1 else -1) % r == r - 1:
            shape = [0] * (a[0] % r if a else 0) + [-1]
        elif self.method in ("view", "reshape") and all(isinstance(d, int) for d in a):
            shape = list(a[0]) if len(a) == 1 and isinstance(a[0], (list, tuple)) else list(a)
        else:
            raise HawqError(f"export_onnx_integer: no ONNX rule for '{self.method}{a}' on a {r}-d tensor")
        return g.op("Reshape", [x, g.const(f"{name}_shape", shape, torch.int64)], f"{name}_out")


class InputTransform(nn.Module):
    """One op of a float transform of the model input before its quantization (e.g. Inception-V3's
    ``transform_input``): in float64, in PyTorch and in ONNX alike (IEEE operations, same results).

    ``kind``: ``"index"`` (``x[:, i]``: full slices and integers), ``"unsqueeze"``, ``"mul"``,
    ``"add"``, ``"sub"``, ``"div"`` (with a Python number, ``reverse``: the number on the left) or
    ``"cat"``.
    """

    ARITH = {"mul": ("Mul", operator.mul), "add": ("Add", operator.add), "sub": ("Sub", operator.sub),
             "div": ("Div", operator.truediv)}

    def __init__(self, kind: str, param: Any = None, reverse: bool = False) -> None:
        super().__init__()
        self.kind, self.param, self.reverse = kind, param, reverse

    def forward(self, *xs: Tensor) -> Tensor:
        xs = tuple(x.to(torch.float64) for x in xs)
        if self.kind == "index":
            return xs[0][self.param]
        if self.kind == "unsqueeze":
            return xs[0].unsqueeze(self.param)
        if self.kind == "cat":
            return torch.cat(xs, self.param)
        fn = self.ARITH[self.kind][1]
        return fn(self.param, xs[0]) if self.reverse else fn(xs[0], self.param)

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        xs = [g.cast(a, torch.float64, f"{name}_f64_{i}") for i, a in enumerate(args)]
        if self.kind == "index":
            x, axis = xs[0], 0
            for k, item in enumerate(self.param):
                if isinstance(item, int):  # Gather with a scalar index drops the axis
                    x = g.op("Gather", [x, g.const(f"{name}_idx_{k}", item, torch.int64)], f"{name}_take_{k}",
                             axis=axis)
                else:
                    axis += 1
            return x
        if self.kind == "unsqueeze":
            return g.op("Unsqueeze", [xs[0], g.const(f"{name}_axes", [self.param], torch.int64)], f"{name}_out")
        if self.kind == "cat":
            return g.op("Concat", xs, f"{name}_out", axis=self.param)
        c = g.const(f"{name}_c", float(self.param), torch.float64)
        return g.op(self.ARITH[self.kind][0], [c, xs[0]] if self.reverse else [xs[0], c], f"{name}_out")


class Dequantize(nn.Module):
    """Final dequantization: ``v * s`` (the only float op after the input quantization)."""

    def __init__(self, scale: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("scale", scale.to(torch.float64))
        self.out_dtype = dtype

    def forward(self, v: Tensor) -> Tensor:
        return (v.to(torch.float64) * self.scale).to(self.out_dtype)

    def to_onnx(self, g: OnnxBuilder, args: list[str], name: str) -> str:
        x = g.cast(args[0], torch.float64, f"{name}_f64")
        y = g.op("Mul", [x, g.const(f"{name}_scale", self.scale, torch.float64)], f"{name}_real")
        return g.cast(y, self.out_dtype, f"{name}_out")


# --- conversion -----------------------------------------------------------------------------------
_WHAT = "to_integer"
_GROUP_HINT = "integer inference needs per-channel or per-tensor scales"


class _Meta:
    """Conversion-time facts about one integer tensor: its scale and whether dims after C are 1."""

    def __init__(self, scale: Tensor | None, spatial_one: bool = False, bound: Tensor | None = None,
                 grid: tuple[int, int] | None = None, fixed: bool = False, input_side: bool = False,
                 size: bool = False, keep: bool = False) -> None:
        self.scale = scale  # None: the float model input
        self.spatial_one = spatial_one
        self.bound = bound  # a static bound on |v| (same broadcast shape as scale): proves no overflow
        self.grid = grid  # (qmin, qmax) when v holds codes of a per-tensor grid (matmul operands)
        self.fixed = fixed  # the grid is the fake-quant model's (a StaticGrid / QuantSoftmax): keep it as is
        self.input_side = input_side  # a float value computed from the model inputs only (before quantization)
        self.size = size  # a tensor's size or an entry of it (x.shape, x.shape[0], x.shape[-2:])
        self.keep = keep  # int64 attention keep flags (1 = attend), from a padding mask


def _layer_codes(layer: nn.Module, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """Weight codes, compact weight scale (float64) and float64 bias of a quantized conv/linear (BN folded).

    ``layer`` is the model's own module, not the float64 working copy: its ``int_weight()`` rounds
    in the weight's dtype exactly as the fake-quant forward does, so the integer model, the packed
    ``model.safetensors`` codes and every exporter share one set of codes.
    """
    check_weights(layer, name, _WHAT, _GROUP_HINT)
    codes, scale = layer.int_weight()
    _, b = source_weight_bias(layer)
    return (codes.cpu(), scale.detach().cpu().to(torch.float64),
            None if b is None else b.detach().cpu().to(torch.float64))


def _bias_codes(bias: Tensor | None, acc_scale: Tensor, name: str) -> Tensor | None:
    if bias is None:
        return None
    codes = torch.round(bias / acc_scale)
    if bool((codes.abs() > INT32_MAX).any()):
        raise HawqError(f"to_integer: the bias of '{name}' overflows int32 at scale s_in * s_w")
    return codes.to(torch.int32)


def _chan(scale: Tensor, ndim: int) -> Tensor:
    """A per-channel (dim 1) scale shaped to broadcast against an ``ndim``-d NCHW tensor."""
    return scale.reshape(1, -1, *([1] * (ndim - 2))) if scale.dim() else scale


def _as_float64(x: Any) -> Any:
    """Entry of a float island: floating tensors to float64 (the island runs in float64)."""
    return x.to(torch.float64) if isinstance(x, Tensor) and x.is_floating_point() else x


def _as_dtype(x: Any, dtype: torch.dtype) -> Any:
    return x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x


class _Converter(GraphRewriter):
    """Rewrites a traced fake-quant graph node by node into integer modules (see the module doc).

    ``info[node]`` is a :class:`_Meta`; its scale is None for a plain (float or index) value.
    """

    what = _WHAT
    target = "integer"
    supported = ("quantized Conv2d/Linear, BatchNorm2d (also FrozenBatchNorm2d), ReLU, add, cat, max pool, "
                 "avg pool (ceil_mode=False), global avg pool, flatten, dropout, nearest upsampling, "
                 "view/reshape/permute/transpose, x.shape and its entries")
    float_layer_hint = "integer inference needs every conv/linear quantized"
    graph_name = "IntegerModel"

    def __init__(self, model: nn.Module, gm: fx.GraphModule, out_dtype: torch.dtype, float_ops: bool,
                 ranges: dict[str, float] | None = None, attention_bits: int = 8,
                 source: nn.Module | None = None) -> None:
        super().__init__(model, gm)
        # The caller's model (its own dtype and device): the weight codes come from its layers.
        self.source_modules = dict((source or model).named_modules())
        self.out_dtype = out_dtype
        self.float_ops = float_ops
        self.ibert = ranges is not None  # transformer="ibert": integer kernels for transformer ops
        self.ranges = ranges or {}  # node name -> calibrated max |value| (float64 working copy)
        self.attention_bits = attention_bits
        self._grids: dict[tuple[fx.Node, int], tuple[fx.Node, _Meta]] = {}
        if self.ibert:
            self.supported += ("; with quant.transformer='ibert' also GELU, softmax(dim=-1), LayerNorm, "
                               "activation matmul, / or * by a constant, mean, transpose/permute/view/reshape")
        self.float_nodes: list[str] = []
        self._dequantized: dict[tuple[fx.Node, torch.dtype | None], fx.Node] = {}

    def module_name(self, base: str) -> str:
        # Integer layers keep their dotted names (``integer_layers``, state_dict keys); clashes get underscores.
        name = base.replace(".", "_") if base in self.new_modules else base
        while name in self.new_modules:
            name += "_"
        return name

    def _emit(self, node: fx.Node, module_name: str, module: nn.Module, args: tuple, meta: _Meta) -> None:
        self.bind(node, self.emit(module_name, module, args), meta)

    def _tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), found.append)
        return found

    def _all_int(self, node: fx.Node, lift: bool = False) -> bool:
        """Every tensor input is an integer tensor (``lift``: or a float model input ibert mode quantizes)."""
        inputs = self._tensor_inputs(node)
        return bool(inputs) and all(self.info[n].scale is not None or (lift and self._liftable(n)) for n in inputs)

    # --- transformer="ibert": static grids ----------------------------------------------------
    def _liftable(self, arg: fx.Node) -> bool:
        """A float model input that integer ops may use after quantizing it (ibert mode only)."""
        return self.ibert and arg.op == "placeholder" and arg.name in self.ranges

    def _operand(self, arg: fx.Node) -> tuple[fx.Node, _Meta]:
        """``(value, meta)`` of an integer operand; a float model input is quantized first (16 bits)."""
        if self.info[arg].scale is None and self._liftable(arg):
            return self._grid(arg, INNER_BITS, INNER_MARGIN)
        return self.env[arg], self.info[arg]

    def _grid(self, arg: fx.Node, bits: int, margin: float) -> tuple[fx.Node, _Meta]:
        """``arg`` as signed ``bits``-bit codes of a per-tensor grid spanning ``margin`` x its calibrated range.

        These grids are where I-BERT has quantizers that the fake-quant model lacks (matmul operands,
        the inputs of GELU and LayerNorm); a tensor already on such a grid is used as it is.
        """
        meta = self.info[arg]
        if meta.grid is not None:  # signed codes fit in ``bits`` bits, or unsigned ones (softmax) in ``bits``
            qmin, qmax = meta.grid
            if meta.fixed or qmax <= (2**bits - 1 if qmin == 0 else 2 ** (bits - 1) - 1):
                return self.env[arg], meta
        key = (arg, bits)
        if key not in self._grids:
            qmax = 2 ** (bits - 1) - 1
            extent = self.ranges.get(arg.name)
            if extent is None:
                raise HawqError(f"to_integer: no calibrated range for node '{arg.name}' (transformer='ibert' "
                                "needs example_input)")
            scale = torch.tensor(max(extent, 1e-8) * margin / qmax, dtype=torch.float64)
            if meta.scale is None:
                module: nn.Module = QuantizeInput(scale, -qmax, qmax)
            else:
                module = IntRequant(meta.scale, scale, -qmax, qmax)
            value = self.emit(f"requant_{arg.name}", module, (self.env[arg],))
            bound = torch.tensor(float(qmax), dtype=torch.float64)
            self._grids[key] = (value, _Meta(scale, bound=bound, grid=(-qmax, qmax)))
        return self._grids[key]

    def _act_grid(self, arg: fx.Node, act: QuantAct, name: str) -> tuple[fx.Node, _Meta]:
        """``arg`` requantized to the calibrated grid of a fake-quant module's quantizer (integer == fake-quant)."""
        if not act.calibrated:
            raise HawqError(f"to_integer: the grid of '{name}' is not calibrated; run calibrate() first")
        meta = self.info[arg]
        scale = torch.tensor(float(act.scale), dtype=torch.float64)
        qmin, qmax = act.qmin, act.qmax
        if meta.scale is None:
            module: nn.Module = QuantizeInput(scale, qmin, qmax)
        else:
            module = IntRequant(meta.scale, scale, qmin, qmax)
        value = self.emit(f"requant_{name}", module, (self.env[arg],))
        return value, _Meta(scale, bound=torch.tensor(float(max(-qmin, qmax)), dtype=torch.float64),
                            grid=(qmin, qmax), fixed=True)

    def _shape(self, node: fx.Node) -> torch.Size | None:
        tm = getattr(node, "meta", {}).get("tensor_meta")
        return None if tm is None else tm.shape

    def _gelu(self, node: fx.Node, name: str, arg: fx.Node, act: QuantAct | None = None) -> None:
        if act is not None:
            v, meta = self._act_grid(arg, act, name)
        else:
            v, meta = self._grid(arg, INNER_BITS, INNER_MARGIN)
        consts = GeluConstants(float(meta.scale))
        bound = float(meta.bound) * (2 * consts.q_one + 1)
        if bound > INT32_MAX:
            raise HawqError(f"to_integer: GELU '{name}' can overflow int32")
        self._emit(node, name, IntGELU(consts), (v,),
                   _Meta(torch.tensor(consts.out_scale, dtype=torch.float64),
                         bound=torch.tensor(bound, dtype=torch.float64)))

    def _softmax(self, node: fx.Node, name: str, arg: fx.Node, dim: Any, out_bits: int | None = None,
                 mask: fx.Node | None = None) -> None:
        """``out_bits`` given: a fake-quant QuantSoftmax (its output grid kept exactly); ``mask``: its padding mask."""
        shape = self._shape(arg)
        if dim not in (-1, None if shape is None else len(shape) - 1):
            raise self.unsupported(node, ": integer softmax runs over the last dim only")
        v, meta = self._operand(arg)
        consts = ExpConstants()
        exp_grid = IntRequant(meta.scale, torch.tensor(consts.scale, dtype=torch.float64), -EXP_CLAMP, EXP_CLAMP)
        args: tuple[fx.Node, ...] = (self.emit(f"requant_{name}", exp_grid, (v,)),)
        if mask is not None and self.info[mask].keep:
            args += (self.env[mask],)
        elif mask is not None:
            args += (self.emit(f"keep_{name}", MaskInput(), (self.env[mask],)),)
        out_max = 2 ** (self.attention_bits if out_bits is None else out_bits) - 1
        self._emit(node, name, IntSoftmax(consts, out_max), args,
                   _Meta(torch.tensor(1.0 / out_max, dtype=torch.float64),
                         bound=torch.tensor(float(out_max), dtype=torch.float64), grid=(0, out_max),
                         fixed=out_bits is not None))

    def _matmul(self, node: fx.Node, a: fx.Node, b: fx.Node) -> None:
        bits = self.attention_bits
        (va, ma), (vb, mb) = self._grid(a, bits, 1.0), self._grid(b, bits, 1.0)
        shape = self._shape(a)
        if shape is None:
            raise HawqError(f"to_integer: matmul '{node.name}' needs shapes; pass example_input to to_integer")
        bound = float(ma.bound) * float(mb.bound) * shape[-1]
        if bound > INT32_MAX:
            raise HawqError(f"to_integer: the int32 accumulator of matmul '{node.name}' can overflow")
        self._emit(node, node.name, IntMatmul(node.name, (ma.grid, mb.grid)), (va, vb),
                   _Meta(ma.scale * mb.scale, bound=torch.tensor(bound, dtype=torch.float64)))

    def _scale_const(self, node: fx.Node, divide: bool) -> bool:
        """``v / c`` or ``v * c`` with a Python number: only the scale changes (a sign flip if c < 0)."""
        if len(node.args) != 2 or node.kwargs:
            return False
        a, b = node.args
        if isinstance(b, fx.Node) and isinstance(a, (int, float)) and not divide:
            a, b = b, a
        if not isinstance(a, fx.Node) or isinstance(b, bool) or not isinstance(b, (int, float)) or b == 0:
            return False
        v, meta = self._operand(a)
        factor = 1.0 / b if divide else float(b)
        if factor < 0:
            v = self.emit(f"{node.name}_neg", IntScale(), (v,))
        self.bind(node, v, _Meta(meta.scale * abs(factor), bound=meta.bound, grid=meta.grid, fixed=meta.fixed))
        return True

    def _mean(self, node: fx.Node) -> bool:
        args = dict(zip(("input", "dim", "keepdim"), node.args, strict=False)) | dict(node.kwargs)
        shape, dim = self._shape(node.args[0]), args.get("dim")
        if shape is None or dim is None or set(args) - {"input", "dim", "keepdim"}:
            return False
        dims = [d % len(shape) for d in ((dim,) if isinstance(dim, int) else dim)]
        v, meta = self._operand(node.args[0])
        if meta.scale.dim() and len(shape) - 1 in dims:
            v, meta = self._grid(node.args[0], INNER_BITS, INNER_MARGIN)  # a per-feature scale: one grid first
        keep = bool(args.get("keepdim", False))
        self._emit(node, node.name, IntMean(tuple(dims), keep), (v,), _Meta(meta.scale, bound=meta.bound))
        return True

    def _shape_op(self, node: fx.Node) -> bool:
        """transpose/permute/view/reshape/contiguous on a per-tensor grid (per-feature scales are requantized)."""
        first = node.args[0]
        if any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]):
            return False
        v, meta = self._operand(first)
        if meta.scale.dim() and node.target == "flatten":
            return False  # per-channel conv features: the exact flatten rule applies
        if meta.scale.dim():
            v, meta = self._grid(first, self.attention_bits, 1.0)
        shape = self._shape(first)
        if node.kwargs or node.op != "call_method" or shape is None:
            out = self.graph.create_node(node.op, node.target, (v, *node.args[1:]), dict(node.kwargs), node.name)
        else:  # a module, so that the integer ONNX export lowers it
            out = self.emit(node.name, IntShape(node.target, tuple(node.args[1:]), len(shape)), (v,))
        self.bind(node, out, meta)
        return True

    def _layernorm(self, node: fx.Node, name: str, ln: nn.LayerNorm, arg: fx.Node) -> None:
        if len(ln.normalized_shape) != 1:
            raise self.unsupported(node, ": integer LayerNorm over the last dim only", module=ln)
        d = ln.normalized_shape[0]
        weight = ln.weight if ln.weight is not None else torch.ones(d, dtype=torch.float64)
        bias = ln.bias if ln.bias is not None else torch.zeros(d, dtype=torch.float64)
        if isinstance(ln, QuantLayerNorm):
            v, meta = self._act_grid(arg, ln.input_quant, name)
        else:
            v, meta = self._grid(arg, INNER_BITS, INNER_MARGIN)
        consts = LayerNormConstants(float(meta.scale), weight, bias, ln.eps, name)
        self._emit(node, name, IntLayerNorm(consts), (v,), _Meta(consts.out_scale, bound=consts.bound))

    def rewrite(self) -> fx.GraphModule:
        gm = super().rewrite()
        gm.float_nodes = list(self.float_nodes)
        return gm

    # --- float islands ------------------------------------------------------------------------
    def _plain(self, arg: fx.Node, dtype: torch.dtype | None = torch.float64) -> fx.Node:
        """The new-graph value of ``arg`` as a plain tensor (integer values dequantized)."""
        meta = self.info[arg]
        if meta.scale is None:
            return self.env[arg]
        key = (arg, dtype)
        if key not in self._dequantized:
            self._dequantized[key] = self.emit(f"dequant_{arg.name}", Dequantize(meta.scale, dtype), (self.env[arg],))
        return self._dequantized[key]

    def _float_op(self, node: fx.Node, mod: nn.Module | None = None, why: str = "") -> None:
        """Run ``node`` unchanged on plain float64 values (only with ``float_ops=True``)."""
        if not self.float_ops:
            transform = self._input_transform(node)
            if transform is not None:
                args = tuple(self.env[a] for a in self._tensor_inputs(node))
                return self._emit(node, node.name, transform, args, _Meta(None, input_side=True))
            raise self.unsupported(node, why + " (float_ops=True runs it in float)", module=mod)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self._plain)
        target = node.target
        if node.op in ("call_module", "get_attr"):
            obj = self.modules[node.target] if node.op == "call_module" else get_attr(self.model, node.target)
            target = self.add_module(node.target, obj)
        self.bind(node, self.graph.create_node(node.op, target, args, kwargs, node.name), _Meta(None))
        if node.op != "get_attr":
            self.float_nodes.append(str(node.target) if node.op == "call_module" else node.name)

    # --- handlers -----------------------------------------------------------------------------
    _ARITH_OPS = {operator.mul: "mul", torch.mul: "mul", "mul": "mul", operator.add: "add", torch.add: "add",
                  "add": "add", operator.sub: "sub", torch.sub: "sub", "sub": "sub", operator.truediv: "div",
                  torch.div: "div", "div": "div"}

    def _input_transform(self, node: fx.Node) -> InputTransform | None:
        """``node`` as an :class:`InputTransform` when it transforms the float model input (every tensor
        input is a float value computed from model inputs only) with a supported op, else None."""
        inputs = self._tensor_inputs(node)
        if (node.op == "call_module" or not inputs or node.kwargs
                or not all(self.info[a].scale is None and self.info[a].input_side for a in inputs)):
            return None
        t, args = node.target, node.args
        if t is operator.getitem and len(args) == 2:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            full = slice(None)
            if all(isinstance(i, int) or i == full for i in idx):
                return InputTransform("index", idx)
        elif t in (torch.unsqueeze, "unsqueeze") and len(args) == 2 and isinstance(args[1], int):
            return InputTransform("unsqueeze", args[1])
        elif t in (torch.cat, torch.concat) and len(args) in (1, 2) and isinstance(args[0], (list, tuple)):
            return InputTransform("cat", args[1] if len(args) == 2 else 0)
        elif t in self._ARITH_OPS and len(args) == 2 and len(inputs) == 1:
            number = args[1] if isinstance(args[0], fx.Node) else args[0]
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                return InputTransform(self._ARITH_OPS[t], number, reverse=not isinstance(args[0], fx.Node))
        return None

    def on_placeholder(self, node: fx.Node) -> None:
        ph = self.graph.placeholder(node.name, default_value=node.args[0] if node.args else inspect.Signature.empty)
        self.bind(node, self.graph.call_function(_as_float64, (ph,)) if self.float_ops else ph,
                  _Meta(None, input_side=True))

    def on_get_attr(self, node: fx.Node) -> None:
        self._float_op(node)

    def on_output(self, node: fx.Node) -> None:
        def out(arg: fx.Node) -> fx.Node:
            if self.info[arg].scale is not None:
                return self._plain(arg, self.out_dtype)
            if not self.float_ops:
                raise self.unsupported(node, ": the output is not computed by the integer graph")
            return self.graph.call_function(_as_dtype, (self.env[arg], self.out_dtype))

        self.graph.output(fx.node.map_arg(node.args[0], out))

    def on_quant_layer(self, node: fx.Node, name: str, mod: nn.Module) -> None:
        v, meta = self.value(node, node.args[0])
        act = check_input_quant(mod, name, _WHAT, REFERENCE_ACT_MAX_BITS)
        if isinstance(mod, QuantLinear) and mod.group_size is not None:
            return self._group_linear(node, name, mod, v, meta, act)
        codes, w_scale, bias = _layer_codes(self.source_modules.get(name, mod), name)
        acc_scale = float(act.scale) * w_scale.to(torch.float64)  # compact: () or (out,)
        bias_int = _bias_codes(bias, acc_scale, name)
        bound = codes.to(torch.float64).abs().reshape(codes.shape[0], -1).sum(1) * max(-act.qmin, act.qmax)
        if bias_int is not None:
            bound = bound + bias_int.to(torch.float64).abs()
        if bool((bound > INT32_MAX).any()):
            raise HawqError(f"to_integer: the int32 accumulator of '{name}' can overflow")
        if isinstance(mod, QuantConv2d):
            module = IntConv2d(codes, bias_int, mod, meta.scale, act, name)
            self._emit(node, name, module, (v,), _Meta(_chan(acc_scale, 4), bound=_chan(bound, 4)))
        else:  # Linear: the per-output-feature scale broadcasts along the last dim
            module = IntLinear(codes, bias_int, meta.scale, act, name)
            self._emit(node, name, module, (v,), _Meta(acc_scale, bound=bound))

    def _group_linear(self, node: fx.Node, name: str, mod: nn.Module, v: fx.Node, meta: _Meta, act: QuantAct) -> None:
        """A per-group QuantLinear (:class:`IntGroupLinear`): per-output-feature grid ``s_in * max_g s_w / 2^k``,
        ``k`` as large as keeps the sum of the rescaled group accumulators and the bias below 2^30."""
        layer = self.source_modules.get(name, mod)
        if layer.weight_bits > 8:
            raise HawqError(f"to_integer: layer '{name}' has {layer.weight_bits}-bit weights; at most 8 supported")
        shape = self._shape(node.args[0])
        if shape is None:
            raise HawqError(f"to_integer: grouped layer '{name}' needs shapes; pass example_input to to_integer")
        codes, w_scale = layer.int_weight()
        codes, w_scale = codes.cpu(), w_scale.detach().cpu().to(torch.float64)  # (out, in), (out, groups)
        groups = w_scale.shape[-1]
        w_scale = w_scale.reshape(codes.shape[0], groups)
        top = w_scale.amax(1)
        ratio = w_scale / top[:, None]  # <= 1
        in_max = max(-act.qmin, act.qmax)
        bound_g = codes.to(torch.float64).abs().unflatten(1, (groups, -1)).sum(-1) * in_max  # (out, groups)
        bias = layer.bias.detach().cpu().to(torch.float64) if layer.bias is not None else None
        base = float(act.scale) * top
        rest = (bound_g * ratio).sum(1) + groups + (0 if bias is None else (bias / base).abs())
        room = 2.0**30 / (rest + 1)
        if bool((room < 1).any()):
            raise HawqError(f"to_integer: the int32 accumulator of '{name}' can overflow")
        k = torch.floor(torch.log2(room)).clamp(0, FRACTION_BITS)
        out_scale = base / 2.0**k
        m, c = dyadic((ratio * 2.0**k[:, None]).clamp_min(2.0**-60))
        bias_int = _bias_codes(bias, out_scale, name)
        module = IntGroupLinear(codes, bias_int, meta.scale, act, name, m.t().contiguous(), c.t().contiguous(),
                                len(shape))
        bound = (bound_g * ratio * 2.0**k[:, None] + 1).sum(1) + (0 if bias_int is None else bias_int.abs())
        self._emit(node, name, module, (v,), _Meta(out_scale, bound=bound.to(torch.float64)))

    def _batchnorm(self, node: fx.Node, name: str, bn: nn.BatchNorm2d, v: fx.Node, meta: _Meta) -> None:
        # torchvision's FrozenBatchNorm2d always uses its (running) statistics and is always affine
        if isinstance(bn, nn.BatchNorm2d) and (bn.training or not bn.track_running_stats):
            raise HawqError(f"to_integer: BatchNorm '{name}' must be in eval mode with running statistics")
        num_features = bn.running_mean.numel()
        g = (bn.weight.detach().double() if getattr(bn, "affine", True)
             else torch.ones(num_features, dtype=torch.float64))
        g = g / torch.sqrt(bn.running_var.double() + bn.eps)
        beta = bn.bias.detach().double() if getattr(bn, "affine", True) else torch.zeros_like(g)
        shift = beta - bn.running_mean.double() * g
        s = meta.scale.reshape(-1) if meta.scale.dim() else meta.scale.expand(num_features)
        if bool((g == 0).any()):
            raise HawqError(f"to_integer: BatchNorm '{name}' has a zero gain; fold or remove that channel")
        new_scale = s * g.abs()
        bound = meta.bound.reshape(-1).expand(num_features)
        # Extra fractional bits 2^k, as many as keep |v'| < 2^30 (at most FRACTION_BITS).
        room = 2.0**30 / (bound + (shift / new_scale).abs() + 1)
        k = torch.floor(torch.log2(room)).clamp(0, FRACTION_BITS)
        if bool((room < 1).any()):
            raise HawqError(f"to_integer: BatchNorm '{name}' overflows int32 at the folded scale")
        new_scale = new_scale / 2.0**k
        bias = torch.round(shift / new_scale)
        mult = torch.sign(g) * 2.0**k
        out_bound = bound * 2.0**k + bias.abs()
        self._emit(node, name, IntChannelAffine(mult, bias), (v,),
                   _Meta(_chan(new_scale, 4), bound=_chan(out_bound, 4)))

    def _flatten(self, node: fx.Node, name: str, v: fx.Node, meta: _Meta, start: int, end: int) -> None:
        if start != 1 or end != -1:
            self._float_op(node, why=": only flatten(x, 1) runs in integer")
            return

        def flat(t: Tensor) -> Tensor:
            if t.numel() == 1:
                return t.reshape(())
            if not meta.spatial_one:
                shape = getattr(node.args[0], "meta", {}).get("tensor_meta")
                if shape is None:
                    raise HawqError(f"to_integer: flatten '{node.name}' of a per-channel tensor needs shapes; "
                                    "pass example_input to to_integer")
                t = t.expand(1, *shape.shape[1:])
            return t.reshape(1, -1)

        self._emit(node, name, IntFlatten(start, end), (v,), _Meta(flat(meta.scale), bound=flat(meta.bound)))

    # --- op rules (hawq.quant.ops.RULES): what each op becomes in integer arithmetic --------------
    def on_unmatched(self, node: fx.Node, mod: nn.Module | None) -> None:
        self._float_op(node, mod)  # no integer rule: a float island, or an error without float_ops

    def _ibert_ok(self, node: fx.Node) -> bool:
        """I-BERT mode and every tensor input integer (or a float model input it quantizes)."""
        first = node.args[0] if node.args else None
        return (self.ibert and isinstance(first, fx.Node) and first in self.info
                and self._all_int(node, lift=True))

    def _unary_int(self, node: fx.Node) -> tuple[fx.Node, _Meta] | None:
        """``(value, meta)`` of the one integer input of ``node``, or None (then it runs in float)."""
        if len(node.args) != 1 or not self._all_int(node):
            return None
        return self.env[node.args[0]], self.info[node.args[0]]

    @handles("batchnorm", "integer")
    def _rule_batchnorm(self, node: fx.Node, mod: nn.Module | None) -> None:
        unary = self._unary_int(node)
        if unary is None:
            return self._float_op(node, mod)
        self._batchnorm(node, node.target, mod, *unary)

    @handles("relu", "integer")
    def _rule_relu(self, node: fx.Node, mod: nn.Module | None) -> None:
        unary = self._unary_int(node)
        if unary is None:
            return self._float_op(node, mod)
        self._emit(node, node.target if mod is not None else node.name, IntReLU(), (unary[0],), unary[1])

    @handles("add", "integer")
    def _rule_add(self, node: fx.Node, mod: nn.Module | None) -> None:
        int_ok = self._all_int(node, lift=self.ibert)  # ibert: a residual of the (float) model input
        if not int_ok or len(node.args) != 2 or node.kwargs:
            return self._float_op(node, mod)
        (va, ma), (vb, mb) = self._operand(node.args[0]), self._operand(node.args[1])
        # Common scale: the finer operand's, refined by up to FRACTION_BITS while the static
        # bound of the sum stays below 2^30 (so the adds' rounding is negligible and int32 safe).
        real_bound = ma.bound * ma.scale + mb.bound * mb.scale
        out = torch.maximum(torch.minimum(ma.scale, mb.scale) / 2.0**FRACTION_BITS, real_bound / 2.0**30)
        # (+ 0 * out broadcasts each operand's scale to the common scale's shape)
        module = IntAdd((ma.scale + 0 * out), (mb.scale + 0 * out), out, node.name)
        bound = real_bound / out + 2
        self._emit(node, node.name, module, (va, vb), _Meta(out, ma.spatial_one and mb.spatial_one, bound))

    @handles("flatten", "integer")
    def _rule_flatten(self, node: fx.Node, mod: nn.Module | None) -> None:
        if mod is not None:
            unary = self._unary_int(node)
            if unary is None:
                return self._float_op(node, mod)
            return self._flatten(node, node.target, *unary, mod.start_dim, mod.end_dim)
        if node.op == "call_method" and self._ibert_ok(node) and self._shape_op(node):
            return None  # x.flatten() on a per-tensor grid: a shape op
        if not self._all_int(node) or node.kwargs:
            return self._float_op(node)
        start = node.args[1] if len(node.args) > 1 else 0
        end = node.args[2] if len(node.args) > 2 else -1
        self._flatten(node, node.name, self.env[node.args[0]], self.info[node.args[0]], start, end)

    def _pool_args(self, node: fx.Node, mod: nn.Module | None, names: tuple[str, ...]) -> dict[str, Any] | None:
        """A pooling node's settings by name (module attributes or the call's arguments), or None when
        its input is not one integer tensor."""
        if mod is not None:
            if len(node.args) != 1 or node.kwargs or not self._all_int(node):
                return None
            return {k: getattr(mod, k) for k in names[1:]}
        bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        if set(bound) - set(names) or not isinstance(bound.get("input"), fx.Node) or not self._all_int(node):
            return None
        return bound

    _MAX_POOL = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    _AVG_POOL = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")

    @handles("max_pool", "integer")
    def _rule_max_pool(self, node: fx.Node, mod: nn.Module | None) -> None:
        p = self._pool_args(node, mod, self._MAX_POOL)
        if p is None or p.get("return_indices", False):
            return self._float_op(node, mod)
        pool = mod if mod is not None else nn.MaxPool2d(
            p["kernel_size"], p.get("stride"), p.get("padding", 0), p.get("dilation", 1),
            ceil_mode=p.get("ceil_mode", False))
        v, meta = self.env[node.args[0]], self.info[node.args[0]]
        self._emit(node, node.target if mod is not None else node.name, IntMaxPool2d(pool), (v,), meta)

    @handles("avg_pool", "integer")
    def _rule_avg_pool(self, node: fx.Node, mod: nn.Module | None) -> None:
        p = self._pool_args(node, mod, self._AVG_POOL)
        pair = nn.modules.utils._pair
        if (p is None or p.get("ceil_mode", False) or isinstance(p.get("padding", 0), str)
                or self.info[node.args[0]].bound is None):
            return self._float_op(node, mod, why=": integer average pooling needs ceil_mode=False"
                                  if p is not None and p.get("ceil_mode", False) else "")
        k = pair(p["kernel_size"])
        s = pair(p.get("stride") or p["kernel_size"])
        pad = pair(p.get("padding", 0))
        v, meta = self.env[node.args[0]], self.info[node.args[0]]
        # Fractional bits for the quotient, as many as keep |out| < 2^30 (at most FRACTION_BITS).
        top = float(meta.bound.max()) + 1
        frac = int(min(max(math.floor(math.log2(2.0**30 / top)), 0), FRACTION_BITS))
        module = IntAvgPool2d(k, s, pad, bool(p.get("count_include_pad", True)), p.get("divisor_override"), frac)
        name = node.target if mod is not None else node.name
        self._emit(node, name, module, (v,), _Meta(meta.scale / 2.0**frac, bound=meta.bound * 2.0**frac + 1))

    @handles("cat", "integer")
    def _rule_cat(self, node: fx.Node, mod: nn.Module | None) -> None:
        bound = dict(zip(("tensors", "dim"), node.args, strict=False)) | dict(node.kwargs)
        parts = bound.get("tensors")
        if (set(bound) - {"tensors", "dim"} or not isinstance(parts, (list, tuple)) or not parts
                or not all(isinstance(t, fx.Node) for t in parts) or not self._all_int(node)
                or any(self.info[t].bound is None for t in parts)):
            return self._float_op(node)
        metas = [self.info[t] for t in parts]
        # One per-tensor grid for all parts: the finest part's scale refined by up to FRACTION_BITS
        # while the largest value stays below 2^30 (as for the residual add).
        real_bound = max(float((m.bound * m.scale).max()) for m in metas)
        finest = min(float(m.scale.min()) for m in metas)
        out = torch.tensor(max(finest / 2.0**FRACTION_BITS, real_bound / 2.0**30), dtype=torch.float64)
        module = IntCat([m.scale for m in metas], out, int(bound.get("dim", 0)))
        bound_out = torch.tensor(real_bound / float(out) + 1, dtype=torch.float64)
        self._emit(node, node.name, module, tuple(self.env[t] for t in parts),
                   _Meta(out, all(m.spatial_one for m in metas), bound_out))

    @handles("adaptive_avg_pool", "integer")
    def _rule_adaptive_avg_pool(self, node: fx.Node, mod: nn.Module | None) -> None:
        if mod is not None:
            unary = self._unary_int(node)
            is_global = mod.output_size in (1, (1, 1))
            name = node.target
        else:
            unary = (self.env[node.args[0]], self.info[node.args[0]]) if self._all_int(node) else None
            is_global = node.args[1:] in ((1,), ((1, 1),))
            name = node.name
        if unary is None or not is_global:
            return self._float_op(node, mod)
        v, meta = unary
        self._emit(node, name, IntSumPool2d(), (v,), _Meta(meta.scale, True, meta.bound))

    @handles("grid", "integer")
    def _rule_grid(self, node: fx.Node, mod: nn.Module | None) -> None:
        if len(node.args) != 1 or not self._ibert_ok(node):
            return self._float_op(node, mod)
        self.bind(node, *self._act_grid(node.args[0], mod, node.target))  # a StaticGrid of I-BERT fake-quant

    @handles("gelu", "integer")
    def _rule_gelu(self, node: fx.Node, mod: nn.Module | None) -> None:
        if len(node.args) != 1 or not self._ibert_ok(node):
            return self._float_op(node, mod)
        if isinstance(mod, QuantGELU):
            return self._gelu(node, node.target, node.args[0], mod.input_quant)
        exact = (mod.approximate == "none" if mod is not None
                 else node.op == "call_function" and node.kwargs.get("approximate", "none") == "none")
        if not exact:
            return self._float_op(node, mod)  # i-GELU approximates the exact (erf) GELU only
        self._gelu(node, node.target if mod is not None else node.name, node.args[0])

    @handles("softmax", "integer")
    def _rule_softmax(self, node: fx.Node, mod: nn.Module | None) -> None:
        if self.ibert and isinstance(mod, QuantSoftmax) and len(node.args) == 2 and not node.kwargs:
            scores, mask = node.args
            if self.info[mask].scale is not None or self.info[scores].scale is None:
                raise self.unsupported(node, ": the attention mask must be a float model input added to "
                                       "integer scores", module=mod)
            return self._softmax(node, node.target, scores, -1, mod.out_bits, mask)
        if mod is not None:
            if len(node.args) != 1 or not self._ibert_ok(node):
                return self._float_op(node, mod)
            if isinstance(mod, QuantSoftmax):
                return self._softmax(node, node.target, node.args[0], -1, mod.out_bits)
            return self._softmax(node, node.target, node.args[0], mod.dim)
        if not self._ibert_ok(node) or node.kwargs.get("dtype") is not None or len(node.args) > 2:
            return self._float_op(node)
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        self._softmax(node, node.name, node.args[0], dim)

    @handles("layernorm", "integer")
    def _rule_layernorm(self, node: fx.Node, mod: nn.Module | None) -> None:
        if len(node.args) != 1 or not self._ibert_ok(node):
            return self._float_op(node, mod)
        self._layernorm(node, node.target, mod, node.args[0])

    @handles("matmul", "integer")
    def _rule_matmul(self, node: fx.Node, mod: nn.Module | None) -> None:
        if not self._ibert_ok(node) or len(node.args) != 2 or node.kwargs:
            return self._float_op(node)
        self._matmul(node, node.args[0], node.args[1])

    @handles("scale", "integer")
    def _rule_scale(self, node: fx.Node, mod: nn.Module | None) -> None:
        divide = node.target in (operator.truediv, torch.div, "div")
        if not (self._ibert_ok(node) and self._scale_const(node, divide)):
            self._float_op(node)

    @handles("mean", "integer")
    def _rule_mean(self, node: fx.Node, mod: nn.Module | None) -> None:
        if not (self._ibert_ok(node) and self._mean(node)):
            self._float_op(node)

    @handles("shape", "integer")
    def _rule_shape(self, node: fx.Node, mod: nn.Module | None) -> None:
        if self._ibert_ok(node) and self._shape_op(node):
            return None
        if not self.float_ops and self._layout(node):
            return None  # an integer-only model: view / reshape / permute on a per-tensor grid
        self._float_op(node)

    _LAYOUT_FUNCS = {torch.reshape: "reshape", torch.permute: "permute", torch.transpose: "transpose"}

    def _layout(self, node: fx.Node) -> bool:
        """view / reshape / permute / transpose / contiguous of an integer tensor whose sizes are ints or
        entries of tensor sizes (``x.shape[0]``); per-channel scales are first put on one grid."""
        kind = node.target if node.op == "call_method" else self._LAYOUT_FUNCS.get(node.target)
        x = node.args[0] if node.args else None
        if (kind not in ("view", "reshape", "permute", "transpose", "contiguous") or node.kwargs
                or not isinstance(x, fx.Node) or self.info[x].scale is None or self.info[x].bound is None):
            return False
        if kind == "contiguous":
            if len(node.args) != 1:
                return False
            self.bind(node, self.env[x], self.info[x])
            return True
        rest = list(node.args[1:])
        if kind != "transpose" and len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            rest = list(rest[0])
        sizes: list[fx.Node] = []
        if kind in ("view", "reshape"):
            spec: list[int | None] = []
            for r in rest:
                if isinstance(r, fx.Node) and self.info[r].size:
                    sizes.append(self.env[r])
                    spec.append(None)
                elif isinstance(r, int) and not isinstance(r, bool):
                    spec.append(r)
                else:
                    return False
            kind = "reshape"
        else:
            shape = self._shape(x)
            if shape is None or not all(isinstance(r, int) for r in rest):
                return False
            dims = [r % len(shape) for r in rest]
            if kind == "transpose":
                if len(dims) != 2:
                    return False
                perm = list(range(len(shape)))
                perm[dims[0]], perm[dims[1]] = perm[dims[1]], perm[dims[0]]
                dims = perm
            spec, kind = dims, "permute"
        v, meta = self._per_tensor(x, node.name)
        self._emit(node, node.name, IntLayout(kind, spec), (v, *sizes), _Meta(meta.scale, bound=meta.bound))
        return True

    def _per_tensor(self, arg: fx.Node, name: str) -> tuple[fx.Node, _Meta]:
        """``arg`` on one per-tensor grid: as it is, or rescaled from its per-channel scales to the finest of
        them refined by up to FRACTION_BITS while the largest value stays below 2^30 (as for the add)."""
        v, meta = self.env[arg], self.info[arg]
        if meta.scale.numel() == 1:
            return v, meta
        top = float((meta.bound * meta.scale).max())
        out = torch.tensor(max(float(meta.scale.min()) / 2.0**FRACTION_BITS, top / 2.0**30), dtype=torch.float64)
        v = self.emit(f"{name}_grid", IntRegrid(meta.scale, out), (v,))
        return v, _Meta(out, meta.spatial_one, torch.tensor(top / float(out) + 1, dtype=torch.float64))

    @handles("size", "integer")
    def _rule_size(self, node: fx.Node, mod: nn.Module | None) -> None:
        x = node.args[0]
        if self.float_ops or node.kwargs or self.info[x].size or (node.op == "call_method" and len(node.args) > 2):
            return self._float_op(node)
        value = self.emit(f"{node.name}_of", SizeOf(), (self.env[x],))
        if node.op == "call_method" and len(node.args) == 2:  # x.size(d)
            value = self.emit(node.name, SizeItem(node.args[1]), (value,))
        self.bind(node, value, _Meta(None, size=True))

    @handles("size_item", "integer")
    def _rule_size_item(self, node: fx.Node, mod: nn.Module | None) -> None:
        src, index = node.args
        ok = isinstance(index, int) or (isinstance(index, slice) and index.step in (None, 1)
                                        and all(isinstance(i, (int, type(None))) for i in (index.start, index.stop)))
        if self.float_ops or not ok or not self.info[src].size:
            return self._float_op(node)
        self._emit(node, node.name, SizeItem(index), (self.env[src],), _Meta(None, size=True))

    _INTERPOLATE = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")

    @handles("upsample", "integer")
    def _rule_upsample(self, node: fx.Node, mod: nn.Module | None) -> None:
        if mod is not None:
            p = {"input": node.args[0] if len(node.args) == 1 else None, "size": mod.size,
                 "scale_factor": mod.scale_factor, "mode": mod.mode,
                 "recompute_scale_factor": mod.recompute_scale_factor}
        else:
            p = dict(zip(self._INTERPOLATE, node.args, strict=False)) | dict(node.kwargs)
        x, size, factor = p.get("input"), p.get("size"), p.get("scale_factor")
        if (not isinstance(x, fx.Node) or self.info[x].scale is None or p.get("mode", "nearest") != "nearest"
                or p.get("antialias") or p.get("recompute_scale_factor") or (size is None) == (factor is None)):
            return self._float_op(node, mod)
        pair = nn.modules.utils._pair
        args: tuple[fx.Node, ...] = (self.env[x],)
        if isinstance(size, fx.Node):
            if not self.info[size].size:
                return self._float_op(node, mod)
            args, fixed, factors = (*args, self.env[size]), None, None
        else:
            fixed = None if size is None else [int(s) for s in pair(size)]
            factors = None if factor is None else [float(f) for f in pair(factor)]
        meta = self.info[x]  # channels unchanged: per-channel scales and bounds carry over
        if meta.bound is None or float(meta.bound.max()) > INT32_MAX:
            return self._float_op(node, mod, why=": nearest upsampling needs values proven to fit int32")
        self._emit(node, node.target if mod is not None else node.name, IntUpsampleNearest(fixed, factors), args,
                   _Meta(meta.scale, bound=meta.bound))

    # --- a whole BERT (hawq.quant.ibert.TraceableBert) ------------------------------------------
    @handles("select", "integer")
    def _rule_select(self, node: fx.Node, mod: nn.Module | None) -> None:
        x, index = node.args if len(node.args) == 2 else (None, None)
        if not (self.ibert and isinstance(x, fx.Node) and self.info[x].scale is not None and not node.kwargs):
            return self._float_op(node)
        index = index if isinstance(index, tuple) else (index,)
        shape = self._shape(x)
        full = slice(None)
        if (shape is None or len(index) >= len(shape) or not index
                or not all(i == full or (isinstance(i, int) and not isinstance(i, bool)) for i in index)):
            return self._float_op(node, why=": integer indexing takes integers and full slices before the last dim")
        meta = self.info[x]
        self._emit(node, node.name, IntSelect(index), (self.env[x],),
                   _Meta(meta.scale, bound=meta.bound, grid=meta.grid, fixed=meta.fixed))

    @handles("embedding", "integer")
    def _rule_embedding(self, node: fx.Node, mod: nn.Module | None) -> None:
        ids = node.args[0] if len(node.args) == 1 else None
        if not self.ibert or node.kwargs or not isinstance(ids, fx.Node) or self.info[ids].scale is not None:
            return self._float_op(node, mod)
        if mod.max_norm is not None:
            raise self.unsupported(node, ": integer embeddings need max_norm=None", module=mod)
        shape = self._shape(ids)
        if shape is None:
            raise HawqError(f"to_integer: embedding '{node.target}' needs shapes; pass example_input to to_integer")
        layer = self.source_modules.get(node.target, mod)
        codes, scale = layer.int_weight()  # the model's own codes, as the fake-quant forward rounds them
        rows = codes.shape[0]
        scale = scale.detach().cpu().to(torch.float64)
        per_group = scale.reshape(rows, -1) if scale.dim() else scale.expand(rows).reshape(rows, 1)
        groups = per_group.shape[1]
        mags = codes.cpu().to(torch.float64).abs().unflatten(-1, (groups, -1)).amax(-1) * per_group
        # One output grid 2^28 steps over the table's largest value (three such embeddings add up below
        # 2^30): its rounding is ~1e-4 of a step of the LayerNorm's 16-bit input grid, so the integer
        # sum lands on the fake-quant model's code except at near-exact ties.
        real_max = max(float(mags.max()), 1e-12)
        out_scale = torch.tensor(real_max / 2.0**EMBEDDING_BITS, dtype=torch.float64)
        # an all-zero row (a padding index) may carry any scale: its codes are 0 whatever the factor
        ratio = torch.where(mags > 0, per_group / out_scale, torch.ones_like(per_group))
        m, c = dyadic(ratio)
        module = IntEmbedding(codes.cpu(), m, c, len(shape))
        self._emit(node, node.target, module, (self.env[ids],),
                   _Meta(out_scale, bound=torch.tensor(2.0**EMBEDDING_BITS + 1, dtype=torch.float64)))

    @handles("positions", "integer")
    def _rule_positions(self, node: fx.Node, mod: nn.Module | None) -> None:
        if len(node.args) != 1 or node.kwargs or self.info[node.args[0]].scale is not None:
            raise self.unsupported(node, ": expected the model's input_ids", module=mod)
        self._emit(node, node.target, PositionIds(), (self.env[node.args[0]],), _Meta(None))

    @handles("padding_mask", "integer")
    def _rule_padding_mask(self, node: fx.Node, mod: nn.Module | None) -> None:
        if not self.ibert or len(node.args) != 1 or node.kwargs or self.info[node.args[0]].scale is not None:
            return self._float_op(node, mod)
        self._emit(node, node.target, IntPaddingKeep(), (self.env[node.args[0]],), _Meta(None, keep=True))

    @handles("tanh", "integer")
    def _rule_tanh(self, node: fx.Node, mod: nn.Module | None) -> None:
        if len(node.args) != 1 or node.kwargs or not self._ibert_ok(node):
            return self._float_op(node, mod)
        name = node.target if mod is not None else node.name
        v, meta = self._operand(node.args[0])
        consts = TanhConstants()
        exp_grid = IntRequant(meta.scale, torch.tensor(consts.exp.scale, dtype=torch.float64), -EXP_CLAMP, EXP_CLAMP)
        q = self.emit(f"requant_{name}", exp_grid, (v,))
        self._emit(node, name, IntTanh(consts), (q,),
                   _Meta(torch.tensor(1.0 / consts.out_max, dtype=torch.float64),
                         bound=torch.tensor(float(consts.out_max), dtype=torch.float64)))

    @handles("pooling", "integer")
    def _rule_pooling(self, node: fx.Node, mod: nn.Module | None) -> None:
        hidden, mask = node.args if len(node.args) == 2 else (None, None)
        if (not self.ibert or node.kwargs or not isinstance(hidden, fx.Node) or self.info[hidden].scale is None
                or not isinstance(mask, fx.Node) or self.info[mask].scale is not None):
            return self._float_op(node, mod)
        v, _ = self._grid(hidden, INNER_BITS, INNER_MARGIN)  # one per-tensor grid: the norm sums every feature
        module = IntMaskedMeanNormalize()
        self._emit(node, node.target, module, (v, self.env[mask]),
                   _Meta(torch.tensor(2.0**-module.out_bits, dtype=torch.float64),
                         bound=torch.tensor(2.0**module.out_bits + 1, dtype=torch.float64)))


class _RangeObserver(fx.Interpreter):
    """Runs the traced float64 fake-quant graph once and records max |value| of every tensor node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.ranges: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, Tensor) and out.is_floating_point() and out.numel():
            self.ranges[n.name] = float(out.detach().abs().max())
        return out


@torch.no_grad()
def to_integer(model: nn.Module, example_input: Tensor | tuple[Tensor, ...] | None = None, float_ops: bool = False,
               cfg: QuantConfig | None = None) -> fx.GraphModule:
    """Convert a calibrated fake-quant model into an integer-only ``fx.GraphModule`` (a new model).

    Every Conv2d/Linear on the path must be a calibrated ``QuantConv2d``/``QuantBnConv2d``/
    ``QuantLinear`` with weights and activations at <= 8 bits. BatchNorm must be in eval mode
    (its running statistics are used). ``example_input`` (one batch) is needed only when a
    per-channel tensor is flattened over spatial dims > 1. The model is not modified.
    Switch engines with :func:`set_integer_backend`.

    ``float_ops=True`` (for transformer blocks: GELU, softmax, LayerNorm, attention matmuls,
    embeddings) runs every operator without an integer rule as a float64 island: its integer
    inputs are dequantized, and the next quantized layer requantizes its output on entry. The
    names of those operators are listed in the result's ``float_nodes``. Without it, such an
    operator raises a HawqError naming it.

    ``cfg`` is the model's :class:`~hawq.quant.QuantConfig` (default: read back from its modules,
    :func:`hawq.quant.infer_quant_config`; only ``transformer`` and ``attention_bits`` matter here).
    ``cfg.transformer == "ibert"`` runs transformer operators in integer (I-BERT; docs/quant.md,
    "Integer-only transformers"): GELU, softmax over the last dim, LayerNorm, matmuls of two
    activations, ``/`` or ``*`` by a constant, mean, and shape ops. Grids the fake-quant model
    does not have -- matmul operands (``cfg.attention_bits``, per tensor; the softmax output is
    unsigned ``attention_bits``), GELU/LayerNorm inputs and a float input used by a residual add
    (16 bits) -- are static, set from the max |value| seen on ``example_input`` (required; a
    tuple for a model with several inputs, e.g. ``(hidden, attention_mask)``).

    An I-BERT-aware fake-quant model (:func:`hawq.quant.quantize_transformer_ops`) already has
    those grids and kernels (``StaticGrid``, ``QuantGELU``, ``QuantSoftmax``, ``QuantLayerNorm``):
    their calibrated grids and output codes are used as they are, so the integer model computes
    the fake-quant model's values (up to rare one-code differences where a dyadic requantization
    and a float rounding fall on opposite sides of a rounding boundary). Its ``QuantSoftmax`` may
    take an additive padding mask, a model input, which is turned into integer keep flags.
    """
    for name, mod in model.named_modules():
        if isinstance(mod, QUANT_LAYERS):
            check_input_quant(mod, name, _WHAT, REFERENCE_ACT_MAX_BITS)
        elif isinstance(mod, StaticGrid) and not mod.calibrated:
            raise HawqError(f"to_integer: the grid '{name}' is not calibrated; run calibrate() first")
    cfg = infer_quant_config(model) if cfg is None else cfg
    check_quant_config(cfg)
    transformer = cfg.transformer
    if transformer == "ibert" and example_input is None:
        raise HawqError("to_integer: transformer='ibert' needs example_input (a batch that calibrates the "
                        "attention, GELU and LayerNorm input grids)")
    work, gm = working_copy(model, torch.float64, _WHAT)
    ranges = None
    if example_input is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
        xs = [x.to("cpu", torch.float64) if x.is_floating_point() else x.cpu() for x in inputs]
        ShapeProp(gm).propagate(*xs)
        if transformer == "ibert":
            observer = _RangeObserver(gm)
            observer.run(*xs)
            ranges = observer.ranges
    params = list(model.parameters())
    return _Converter(work, gm, params[0].dtype if params else torch.float32, float_ops, ranges,
                      cfg.attention_bits, source=model).rewrite()


def set_integer_backend(model: nn.Module, backend: str) -> nn.Module:
    """``"reference"`` (float64-exact int arithmetic) or ``"int_mm"`` (torch._int_mm int8 GEMM)."""
    if backend not in BACKENDS:
        raise HawqError(f"integer backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    for m in model.modules():
        if isinstance(m, (IntConv2d, IntLinear)):
            m.backend = backend
    return model


def integer_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The integer conv/linear modules of a converted model, keyed by their original layer names."""
    return {m.layer_name: m for m in model.modules() if isinstance(m, (IntConv2d, IntLinear, IntGroupLinear))}
