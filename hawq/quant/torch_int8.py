"""Fast CPU inference: a calibrated fake-quant model on PyTorch's int8 engine (fbgemm / x86).

:func:`to_fbgemm` rewrites the traced fake-quant graph into ``torch.ao.nn.quantized`` modules, whose
kernels (``quantized::conv2d``, ``conv2d_relu``, ``linear``, ``add``, ``add_relu``) are PyTorch's own
int8 engine. Nothing is re-calibrated where hawq has a quantizer:

* weights are hawq's integer codes (BN folded as the fake-quant model folds it), per-channel qint8
  with hawq's scales; 4-bit (and lower) weights are their codes widened to int8, so the int8
  kernel multiplies exactly hawq's quantized weights;
* the tensor that feeds a quantized layer is quantized onto that layer's ``QuantAct`` grid: a conv
  (with its BN and ReLU fused) or a residual add writes its output directly at the consumer's
  scale. hawq's grids have zero point 0; PyTorch's activations are ``quint8``, so an unsigned grid
  keeps zero point 0 and a signed one uses zero point 128 with the same scale (same grid points);
* tensors that feed no quantized layer (a conv output entering a residual add, the input of a
  pooling that precedes the classifier) have no hawq quantizer; their ``quint8`` ranges are the
  min/max observed on ``example_input`` (pass a representative calibration batch).

Engines: ``"fbgemm"`` (PyTorch's classic x86 int8 backend), ``"x86"`` (PyTorch picks fbgemm or
oneDNN kernels per op) and ``"onednn"``, which also fuses a conv with the residual add that
consumes it (``quantized::conv2d_add_relu``), so that the conv's output is not rounded to 8 bits
before the add.

Arithmetic: int8 x int8 -> int32 kernels, but fbgemm requantizes the int32 accumulator with a
float32 multiplier (``s_in * s_w / s_out``) and adds a float bias, so it is "int8 kernels, float
requant multiplier". It is not hawq's exact dyadic integer pipeline (:func:`hawq.quant.to_integer`
is the reference for that); it differs from the fake-quant model where a value lands within float
rounding of a grid boundary, by the 8-bit quantization of the add operands above, and by rounding
an average pool's output on the integer grid.

Saturating kernels: without AVX512-VNNI (AVX2, and AVX-512 before VNNI), fbgemm's and oneDNN's
u8 x s8 GEMM kernels multiply with ``vpmaddubsw``, which adds the products of two adjacent input
channels in a *saturating int16* before widening to int32; fbgemm's depthwise kernel does so on
every ISA. ``a0*w0 + a1*w1`` overflows when ``a_max * (|w0| + |w1|) > 32767``: with hawq's full
8-bit activation grids (codes up to 255; a signed grid's zero point 128 puts its codes at 1..255)
and 8-bit weights (up to 127) it does, and the logits are then off by many steps (PyTorch's own
fbgemm qconfig avoids it by 7-bit activations, ``reduce_range``, which would leave hawq's grid).
hawq keeps its grid and removes the overflow exactly: for a layer whose bound
``2 * a_max * max|w| > 32767`` holds *and* whose kernel is found to saturate on this machine (a
probe of the same op, shape and engine on extreme and random codes, :func:`kernel_saturates`), the
weight codes are split ``w = w_hi + w_lo`` with ``w_hi = trunc(w / 2)`` (:func:`pair_safe_codes`,
both halves within [-64, 64]) and the layer reads its input twice (``[x, x]`` per group,
:class:`DuplicateChannels`): the int32 accumulator is the same sum, every pair stays within
``255 * 128 = 32640``, and the result is bit-exact with the non-saturating kernel at twice the
multiply-adds of that layer. On a VNNI CPU only depthwise convolutions with 8-bit weights are
split. The decision is made on the machine that converts; convert on the machine that runs.

The classifier head (a ``QuantLinear`` whose output is a model output) runs by default as a float
linear on hawq's dequantized int8 input codes and weights (``float_head=True``): exactly the
fake-quant layer, so logits are not rounded to 8 bits; it costs a negligible share of a ResNet.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from hawq import HawqError
from hawq.quant.fx_rewrite import (
    GraphRewriter,
    check_input_quant,
    check_weights,
    source_weight_bias,
    working_copy,
)
from hawq.quant.integer import pair_safe_codes
from hawq.quant.modules import FoldedBatchNorm2d, QuantAct, QuantBnConv2d, QuantConv2d, QuantLinear
from hawq.quant.ops import ADD_FUNCS, QUANT_LAYERS, RELU_FUNCS, handles

ENGINES = ("fbgemm", "x86", "onednn")
QUINT8_MAX = 255
SIGNED_ZERO_POINT = 128  # a signed hawq grid in quint8: same scale, codes shifted by 128
INT16_MAX = 32767  # vpmaddubsw's saturation bound for a pair of u8 x s8 products
PROBE_OUTPUTS = 32  # output channels of a saturation probe (ungrouped layers)
_WHAT = "to_fbgemm"


# --- quantization parameters (pure functions) -----------------------------------------------------
def act_qparams(act: QuantAct) -> tuple[float, int, int, int]:
    """``(scale, zero_point, code_min, code_max)`` of a hawq activation grid written as ``quint8``.

    ``code_min``/``code_max`` are hawq's clamp bounds in quint8 codes (e.g. 1..255 for signed 8-bit,
    0..15 for unsigned 4-bit); they are narrower than quint8's 0..255 where hawq's grid is.
    """
    zp = SIGNED_ZERO_POINT if act.is_signed else 0
    return float(act.scale), zp, act.qmin + zp, act.qmax + zp


def observed_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric ``quint8`` scale and zero point covering ``[min(lo, 0), max(hi, 0)]``."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / QUINT8_MAX if hi > lo else 1.0
    zp = int(min(QUINT8_MAX, max(0, round(-lo / scale))))
    return scale, zp


def may_saturate(code_max: int, codes: Tensor) -> bool:
    """Whether a pair sum ``a0*w0 + a1*w1`` of u8 codes ``<= code_max`` and these weight codes can exceed int16."""
    return 2 * code_max * int(codes.abs().max()) > INT16_MAX


@functools.cache
def kernel_saturates(engine: str, spec: tuple, weight_max: int = 127) -> bool:
    """Whether ``engine``'s kernel for this layer shape loses int32 exactness on this CPU.

    ``spec``: ``("linear", in_features, out_features)`` or ``("conv", in_channels, out_channels,
    kernel_size, stride, padding, dilation, groups)``. Runs that op with weight codes of magnitude
    ``weight_max`` (every sign pattern: all ``+weight_max``, and random signs) on inputs whose u8
    codes are all 255, and random in 128..255, and compares every output with the exact integer
    sum requantized the same way: a kernel whose u8 x s8 pair sums saturate at int16 misses by
    several output codes, requantization rounding by at most one. Which kernel fbgemm/oneDNN run
    depends on the CPU (``FBGEMM_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``), the engine and the
    layer's shape (depthwise, grouped, 1x1, im2col, border handling), so the probe uses all of them.
    """
    if spec[0] == "linear" or spec[-1] == 1:  # the kernel pairs along the inputs: a few outputs suffice
        spec = (spec[0], spec[1], min(spec[2], PROBE_OUTPUTS), *spec[3:])
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    gen = torch.Generator().manual_seed(0)
    try:
        if spec[0] == "linear":
            _, k, n = spec
            layer: nn.Module = nnq.Linear(k, n)
            per_out, x_shape = k, (2, k)
        else:
            _, c_in, n, ks, stride, pad, dil, groups = spec
            layer = nnq.Conv2d(c_in, n, ks, stride, pad, dil, groups, True)
            per_out = c_in // groups
            x_shape = (2, c_in, *[2 * p + d * (kk - 1) + 3 * s for p, d, kk, s in zip(pad, dil, ks, stride)])
        w_shape = (n, per_out, *spec[3]) if spec[0] == "conv" else (n, per_out)
        signs = torch.randint(0, 2, w_shape, generator=gen) * 2 - 1
        signs[0] = 1  # one output channel with every product positive: the all-255 input's worst case
        codes = (signs * weight_max).to(torch.int8)
        x_codes = torch.randint(128, QUINT8_MAX + 1, x_shape, generator=gen)
        x_codes[0] = QUINT8_MAX
        exact = (F.linear(x_codes.double(), codes.double()) if spec[0] == "linear" else
                 F.conv2d(x_codes.double(), codes.double(), None, stride, pad, dil, groups))
        # zero point 128 and scale so that every exact output lands within codes 28..228
        scale = float(exact.abs().max()) / 100 or 1.0
        layer.set_weight_bias(_qweight(codes, torch.ones(n)), None)
        layer.scale, layer.zero_point = scale, SIGNED_ZERO_POINT
        x = torch._make_per_tensor_quantized_tensor(x_codes.to(torch.uint8), 1.0, 0)
        with torch.no_grad():
            got = layer(x).int_repr().long() - SIGNED_ZERO_POINT
        return bool(((got - torch.round(exact / scale)).abs() > 1).any())
    finally:
        torch.backends.quantized.engine = previous


def _saturation_spec(mod: QuantConv2d | QuantLinear) -> tuple:
    if isinstance(mod, QuantConv2d):
        return ("conv", mod.in_channels, mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride),
                tuple(mod.padding), tuple(mod.dilation), mod.groups)
    return ("linear", mod.in_features, mod.out_features)


# --- runtime modules (thin) -------------------------------------------------------------------------
class QuantizeInput(nn.Module):
    """Model input -> ``quint8`` on the first layer's grid (clamped to hawq's code range first)."""

    def __init__(self, scale: float, zero_point: int, code_min: int, code_max: int) -> None:
        super().__init__()
        self.scale, self.zero_point = scale, zero_point
        self.lo, self.hi = (code_min - zero_point) * scale, (code_max - zero_point) * scale

    def forward(self, x: Tensor) -> Tensor:
        return torch.quantize_per_tensor(x.float().clamp(self.lo, self.hi), self.scale, self.zero_point,
                                         torch.quint8)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, zero_point={self.zero_point}"


class Requantize(nn.Module):
    """A quantized tensor onto another grid (dequantize, clamp to the grid's codes, quantize)."""

    def __init__(self, scale: float, zero_point: int, code_min: int = 0, code_max: int = QUINT8_MAX) -> None:
        super().__init__()
        self.scale, self.zero_point = scale, zero_point
        self.lo, self.hi = (code_min - zero_point) * scale, (code_max - zero_point) * scale

    def forward(self, x: Tensor) -> Tensor:
        x = x.dequantize() if x.is_quantized else x
        return torch.quantize_per_tensor(x.clamp(self.lo, self.hi), self.scale, self.zero_point, torch.quint8)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, zero_point={self.zero_point}"


class DuplicateChannels(nn.Module):
    """``[x_g, x_g]`` for each of ``groups`` channel groups along ``dim``: the input of a layer with
    :func:`pair_safe_codes` weights (a conv's channels: ``dim=1``; a linear's features: ``dim=-1``)."""

    def __init__(self, groups: int, dim: int = 1) -> None:
        super().__init__()
        self.groups, self.dim = groups, dim

    def forward(self, x: Tensor) -> Tensor:
        if self.groups == 1:
            return torch.cat([x, x], dim=self.dim)
        n, c, *rest = x.shape  # grouped: only convs (dim 1)
        per_group = x.reshape(n, self.groups, c // self.groups, *rest)
        return torch.cat([per_group, per_group], dim=2).reshape(n, 2 * c, *rest)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, dim={self.dim}"


class ClampCodes(nn.Module):
    """Clamp a quantized tensor to a narrower code range (hawq grids below 8 bits)."""

    def __init__(self, scale: float, zero_point: int, code_min: int, code_max: int) -> None:
        super().__init__()
        self.lo, self.hi = (code_min - zero_point) * scale, (code_max - zero_point) * scale

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, self.lo, self.hi)


class QuantizedAdd(nn.Module):
    """Residual add (optionally fused with ReLU) of two ``quint8`` tensors into ``(scale, zero_point)``."""

    def __init__(self, scale: float, zero_point: int, relu: bool) -> None:
        super().__init__()
        self.scale, self.zero_point, self.relu = scale, zero_point, relu

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        op = torch.ops.quantized.add_relu if self.relu else torch.ops.quantized.add
        return op(a, b, self.scale, self.zero_point)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, zero_point={self.zero_point}, relu={self.relu}"


class ConvAdd(nn.Module):
    """onednn's fused conv + residual add (+ ReLU): ``requant(conv(x) + accum)`` in one kernel."""

    def __init__(self, conv: nn.Module, scale: float, zero_point: int, relu: bool) -> None:
        super().__init__()
        self.conv, self.scale, self.zero_point, self.relu = conv, scale, zero_point, relu

    def forward(self, x: Tensor, accum: Tensor) -> Tensor:
        op = torch.ops.quantized.conv2d_add_relu if self.relu else torch.ops.quantized.conv2d_add
        return op(x, accum, self.conv._packed_params, self.scale, self.zero_point)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, zero_point={self.zero_point}, relu={self.relu}"


class FloatHeadLinear(nn.Module):
    """The classifier head as the fake-quant layer itself: float linear on hawq's grids (no output rounding)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, act: QuantAct, relu: bool) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.scale, self.qmin, self.qmax = float(act.scale), act.qmin, act.qmax
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = x.dequantize() if x.is_quantized else x.float()
        q = torch.clamp(torch.round(x / self.scale), self.qmin, self.qmax) * self.scale
        y = F.linear(q, self.weight, self.bias)
        return F.relu(y) if self.relu else y


class FloatAvgPool(nn.Module):
    """An average pool on the dequantized input (float output; the next quantized layer requantizes)."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = copy.deepcopy(pool)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x.dequantize())


class DequantizeOutput(nn.Module):
    """Model output: ``quint8`` -> float."""

    def forward(self, x: Tensor) -> Tensor:
        return x.dequantize() if isinstance(x, Tensor) and x.is_quantized else x


# --- weights -----------------------------------------------------------------------------------------
def _layer_weight(layer: QuantConv2d | QuantLinear, name: str, act: QuantAct,
                  bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """hawq's ``(codes, per-channel scale, bias)`` of a layer, the bias rounded as the fake-quant model does.

    An unfolded eval BatchNorm after a plain ``QuantConv2d`` goes into the per-channel scale
    (``|g|``), the sign of the codes (exact: the grid is symmetric) and the bias.
    """
    check_weights(layer, name, _WHAT, "fbgemm needs per-channel scales")
    codes, scale = layer.int_weight()  # the codes every other path uses (hawq.quant.quantizers)
    _, b = source_weight_bias(layer)
    scale = scale.float().expand(codes.shape[0]).clone() if scale.dim() == 0 else scale.float()
    if b is not None:  # the fake-quant bias is rounded onto the accumulator grid s_in * s_w
        b = b.detach().float()
        acc = float(act.scale) * scale
        b = torch.round(b / acc) * acc
    if bn is not None:
        if bn.training or not bn.track_running_stats:
            raise HawqError(f"to_fbgemm: BatchNorm after '{name}' must be in eval mode with running statistics")
        g = (bn.weight.detach().float() if bn.affine else torch.ones(bn.num_features))
        g = g / torch.sqrt(bn.running_var.float() + bn.eps)
        if bool((g == 0).any()):
            raise HawqError(f"to_fbgemm: the BatchNorm after '{name}' has a zero gain")
        beta = bn.bias.detach().float() if bn.affine else torch.zeros_like(g)
        shift = beta - bn.running_mean.float() * g
        codes = codes * torch.sign(g).to(torch.int8).reshape(-1, *([1] * (codes.dim() - 1)))
        scale = scale * g.abs()
        b = shift if b is None else b * g + shift
    return codes, scale, b


def _qweight(codes: Tensor, scale: Tensor) -> Tensor:
    return torch._make_per_channel_quantized_tensor(codes.to(torch.int8), scale.double(),
                                                    torch.zeros(codes.shape[0], dtype=torch.int64), 0)


# --- conversion --------------------------------------------------------------------------------------
class _QParams:
    """A quantized tensor's grid in the new graph: ``quint8`` scale, zero point and hawq's code range."""

    def __init__(self, scale: float, zero_point: int, code_min: int = 0, code_max: int = QUINT8_MAX) -> None:
        self.scale, self.zero_point, self.code_min, self.code_max = scale, zero_point, code_min, code_max

    def same_grid(self, other: _QParams) -> bool:
        return (abs(self.scale - other.scale) <= 1e-7 * other.scale and self.zero_point == other.zero_point)


class _Converter(GraphRewriter):
    """Rewrites the traced fake-quant graph into quantized modules; ``info[node]`` is its grid (None: float)."""

    what = _WHAT
    target = "torch_int8"
    supported = ("quantized Conv2d/Linear, BatchNorm2d after a conv, ReLU, residual add, max/avg pool, "
                 "flatten, dropout, identity")
    float_layer_hint = "the int8 engine needs every conv/linear quantized"
    graph_name = "FbgemmModel"

    def __init__(self, model: nn.Module, gm: fx.GraphModule, ranges: dict[str, tuple[float, float]],
                 float_head: bool, engine: str) -> None:
        super().__init__(model, gm)
        self.ranges, self.float_head = ranges, float_head
        self.absorbed: dict[fx.Node, fx.Node] = {}  # fused node -> the node whose value it takes
        self.engine, self.fuse_add = engine, engine == "onednn"
        # onednn: a conv whose only consumer is a residual add waits for it (fused conv + add).
        self.deferred: dict[fx.Node, tuple[nn.Module, fx.Node, fx.Node, str]] = {}  # node: (conv, x, last, name)
        self.deferred_alias: dict[fx.Node, fx.Node] = {}

    # --- helpers ------------------------------------------------------------------------------
    def _is_relu(self, node: fx.Node) -> bool:
        if isinstance(self.module_of(node), nn.ReLU):
            return True
        if node.op == "call_function" and node.target in RELU_FUNCS:
            return True
        return node.op == "call_method" and node.target in ("relu", "relu_")

    def _only_user(self, node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def _skip_identity(self, node: fx.Node) -> fx.Node:
        """Follow single-user identity modules (folded BN, dropout) downstream."""
        nxt = self._only_user(node)
        while nxt is not None and self.is_identity(nxt):
            node, nxt = nxt, self._only_user(nxt)
        return node

    def _consumers(self, node: fx.Node) -> list[fx.Node]:
        """Users of ``node``'s value, looking through identity modules."""
        out: list[fx.Node] = []
        for u in node.users:
            # Max pooling commutes with rounding onto a grid: look through it as well.
            through = self.is_identity(u) or isinstance(self.module_of(u), nn.MaxPool2d)
            out.extend(self._consumers(u) if through else [u])
        return out

    def _out_qparams(self, node: fx.Node) -> _QParams:
        """Grid of a produced tensor: its first quantized consumer's QuantAct, else the observed range."""
        for c in self._consumers(node):
            mod = self.module_of(c)
            if isinstance(mod, (QuantConv2d, QuantLinear)) and mod.input_quant is not None:
                scale, zp, _, _ = act_qparams(mod.input_quant)
                return _QParams(scale, zp)  # the kernel writes all of 0..255; a consumer clamps if needed
        if node.name not in self.ranges:
            raise HawqError(f"to_fbgemm: no observed range for '{node.name}'; is it on the forward path?")
        return _QParams(*observed_qparams(*self.ranges[node.name]))

    # --- handlers -----------------------------------------------------------------------------
    def before_node(self, node: fx.Node) -> bool:
        if node not in self.absorbed:  # fused into an earlier conv / linear / add: takes its value
            return False
        src = self.absorbed[node]
        if src in self.deferred:
            self.deferred_alias[node] = src
        else:
            self.bind(node, self.env[src], self.info[src])
        return True

    def on_output(self, node: fx.Node) -> None:
        self.graph.output(fx.node.map_arg(node.args[0], self._output_value))

    def _output_value(self, arg: fx.Node) -> fx.Node:
        if self.info[arg] is None:
            return self.env[arg]
        return self.emit(f"dequant_{arg.name}", DequantizeOutput(), (self.env[arg],))

    def on_placeholder(self, node: fx.Node) -> None:
        ph = self.graph.placeholder(node.name)
        qp = self._out_qparams(node)
        for c in self._consumers(node):
            mod = self.module_of(c)
            if isinstance(mod, (QuantConv2d, QuantLinear)) and mod.input_quant is not None:
                qp = _QParams(*act_qparams(mod.input_quant))  # clamped here: the first layer needs no clamp
                break
        self.bind(node, self.emit(f"quant_{node.name}", QuantizeInput(qp.scale, qp.zero_point, qp.code_min,
                                                                        qp.code_max), (ph,)), qp)

    def _layer_input(self, node: fx.Node, name: str, act: QuantAct) -> fx.Node:
        """The layer's input on its own grid (requantized when the producer wrote another grid)."""
        v, qp = self.value(node, node.args[0])
        scale, zp, lo, hi = act_qparams(act)
        want = _QParams(scale, zp, lo, hi)
        if qp is None or not qp.same_grid(want):
            return self.emit(f"requant_{name}", Requantize(scale, zp, lo, hi), (v,))
        if qp.code_min < lo or qp.code_max > hi:
            # hawq's grid is narrower than quint8 (below 8 bits, or signed without code -128): clamp.
            return self.emit(f"clamp_{name}", ClampCodes(scale, zp, lo, hi), (v,))
        return v

    # --- op rules (hawq.quant.ops.RULES): what each op becomes on PyTorch's quantized engines ------
    def _module_input(self, node: fx.Node, mod: nn.Module, float_ok: bool = False) -> tuple[fx.Node, Any]:
        """The one quantized input of a module node (``float_ok``: a float one is accepted too)."""
        if len(node.args) != 1 or node.kwargs:
            raise self.unsupported(node, ": extra arguments", mod)
        v, qp = self.value(node, node.args[0])
        if qp is None and not float_ok:
            raise self.unsupported(node, ": its input is a float tensor", mod)
        return v, qp

    def _passthrough(self, node: fx.Node) -> None:
        """The same call on the quantized tensor (entries move or are selected; the grid is kept)."""
        v, qp = self.value(node, node.args[0])
        rest = fx.node.map_arg((node.args[1:], node.kwargs), lambda a: self.value(node, a)[0])
        self.bind(node, self.graph.create_node(node.op, node.target, (v, *rest[0]), rest[1]), qp)

    def on_unmatched(self, node: fx.Node, mod: nn.Module | None) -> None:
        if mod is not None:
            self._module_input(node, mod)  # the more specific error first
        raise self.unsupported(node, module=mod)

    @handles("relu", "torch_int8")
    def _rule_relu(self, node: fx.Node, mod: nn.Module | None) -> None:
        if mod is not None:
            v, qp = self._module_input(node, mod)
            return self.bind(node, self.emit(node.target, nn.ReLU(), (v,)), qp)
        if len(node.args) != 1:
            raise self.unsupported(node)
        v, qp = self.value(node, node.args[0])
        self.bind(node, self.emit(node.name, nn.ReLU(), (v,)), qp)

    @handles("max_pool", "torch_int8")
    def _rule_max_pool(self, node: fx.Node, mod: nn.Module | None) -> None:
        if mod is None:
            return self._passthrough(node)
        v, qp = self._module_input(node, mod)
        self.bind(node, self.emit(node.target, copy.deepcopy(mod), (v,)), qp)

    @handles("flatten", "torch_int8")
    def _rule_flatten(self, node: fx.Node, mod: nn.Module | None) -> None:
        if mod is None:
            return self._passthrough(node)
        v, qp = self._module_input(node, mod, float_ok=True)
        self.bind(node, self.emit(node.target, copy.deepcopy(mod), (v,)), qp)

    @handles("shape", "torch_int8")
    def _rule_shape(self, node: fx.Node, mod: nn.Module | None) -> None:
        if node.op != "call_method" or node.target not in ("view", "reshape"):
            raise self.unsupported(node)
        self._passthrough(node)

    @handles("avg_pool", "torch_int8")
    @handles("adaptive_avg_pool", "torch_int8")
    def _rule_avg_pool(self, node: fx.Node, mod: nn.Module | None) -> None:
        if mod is not None:
            v, _ = self._module_input(node, mod)
            return self._avg_pool(node, node.target, mod, v)
        v, qp = self.value(node, node.args[0])
        if qp is None:
            raise self.unsupported(node, ": its input is a float tensor")
        rest = fx.node.map_arg((node.args[1:], node.kwargs), lambda a: self.value(node, a)[0])
        deq = self.emit(f"dequant_{node.name}", DequantizeOutput(), (v,))
        self.bind(node, self.graph.create_node(node.op, node.target, (deq, *rest[0]), rest[1]), None)

    def _avg_pool(self, node: fx.Node, name: str, mod: nn.Module, v: fx.Node) -> None:
        # Averaging on the dequantized values, not on the integer grid: a quantized average pool
        # rounds its mean onto the input's grid, which is far coarser than the grid of the layer
        # after a global pool (the mean's range is much smaller). The next layer requantizes.
        self.bind(node, self.emit(name, FloatAvgPool(mod), (v,)), None)

    def _conv_add(self, node: fx.Node, conv_node: fx.Node, other: Any) -> None:
        """onednn's fused ``conv2d_add(_relu)``: the conv's int32 result is added before any rounding."""
        q, x, _, name = self.deferred.pop(conv_node)
        accum, qa = self.value(node, other)
        if qa is None:
            raise self.unsupported(node, ": adds a float tensor")
        chain, _, relu = self._fusable_chain(node, allow_bn=False)
        qp = self._out_qparams(chain[-1] if chain else node)
        self.bind(node, self.emit(f"{name}_add", ConvAdd(q, qp.scale, qp.zero_point, relu), (x, accum)), qp)
        for n in chain:
            self.absorbed[n] = node

    def _fusable_chain(self, node: fx.Node, allow_bn: bool) -> tuple[list[fx.Node], nn.BatchNorm2d | None, bool]:
        """Nodes after a conv/linear/add that fuse into it: identities, one eval BatchNorm, one ReLU."""
        chain: list[fx.Node] = []
        bn: nn.BatchNorm2d | None = None
        cur = node
        while True:
            nxt = self._only_user(cur)
            if nxt is None:
                return chain, bn, False
            mod = self.module_of(nxt)
            if self.is_identity(nxt):
                pass
            elif (allow_bn and bn is None and isinstance(mod, nn.BatchNorm2d)
                  and not isinstance(mod, FoldedBatchNorm2d)):
                bn = mod
            elif self._is_relu(nxt) and len(nxt.args) == 1 and not nxt.kwargs:
                chain.append(nxt)
                return chain, bn, True
            else:
                return chain, bn, False
            chain.append(nxt)
            cur = nxt

    def on_quant_layer(self, node: fx.Node, name: str, mod: QuantConv2d | QuantLinear) -> None:
        act = check_input_quant(mod, name, _WHAT)
        is_conv = isinstance(mod, QuantConv2d)
        chain, bn, relu = self._fusable_chain(node, allow_bn=is_conv and not isinstance(mod, QuantBnConv2d))
        last = chain[-1] if chain else node
        codes, w_scale, bias = _layer_weight(mod, name, act, bn)
        x = self._layer_input(node, name, act)
        only_output = all(u.op == "output" for u in self._consumers(last))
        if not is_conv and self.float_head and only_output:
            w = codes.float() * w_scale.reshape(-1, 1)
            out, qp = self.emit(name, FloatHeadLinear(w, bias, act, relu), (x,)), None
        else:
            qp = self._out_qparams(last)
            if is_conv and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
                raise HawqError(f"to_fbgemm: conv '{name}' needs numeric zero padding")
            widen = 1
            spec = _saturation_spec(mod)
            if may_saturate(act_qparams(act)[3], codes) and kernel_saturates(self.engine, spec):
                wide_spec = (spec[0], 2 * spec[1], *spec[2:])
                if kernel_saturates(self.engine, wide_spec, weight_max=64):
                    raise HawqError(f"to_fbgemm: the {self.engine} kernel of '{name}' saturates int16 sums "
                                    f"even with 7-bit weight halves on this CPU; use another engine")
                codes, widen = pair_safe_codes(codes), 2  # exact int32 sums on an int16-pair kernel
                x = self.emit(f"dup_{name}", DuplicateChannels(mod.groups if is_conv else 1, 1 if is_conv else -1),
                              (x,))
            if is_conv:
                cls = nniq.ConvReLU2d if relu else nnq.Conv2d
                q = cls(widen * mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                        mod.dilation, mod.groups, True)
            else:
                q = nniq.LinearReLU(widen * mod.in_features, mod.out_features) if relu else \
                    nnq.Linear(widen * mod.in_features, mod.out_features)
            q.set_weight_bias(_qweight(codes, w_scale), bias)
            if is_conv and self.fuse_add and not relu and self._is_add(self._only_user(last)):
                self.deferred[node] = (q, x, last, name)
                for n in chain:
                    self.absorbed[n] = node
                return
            q.scale, q.zero_point = qp.scale, qp.zero_point
            out = self.emit(name, q, (x,))
        self.bind(node, out, qp)
        for n in chain:
            self.absorbed[n] = node

    def _is_add(self, node: fx.Node | None) -> bool:
        if node is None or len(node.args) != 2 or node.kwargs:
            return False
        return (node.op == "call_function" and node.target in ADD_FUNCS) or (
            node.op == "call_method" and node.target == "add")

    def _emit_deferred(self, conv_node: fx.Node) -> fx.Node:
        """A deferred conv that is not fused after all: emit it with its own output grid."""
        q, x, last, name = self.deferred.pop(conv_node)
        qp = self._out_qparams(last)
        q.scale, q.zero_point = qp.scale, qp.zero_point
        out = self.emit(name, q, (x,))
        self.bind(conv_node, out, qp)
        return out

    @handles("add", "torch_int8")
    def _rule_add(self, node: fx.Node, mod: nn.Module | None) -> None:
        if len(node.args) != 2 or node.kwargs:
            raise self.unsupported(node)
        srcs = [self.deferred_alias.get(a, a) if isinstance(a, fx.Node) else a for a in node.args]
        fused = next((i for i, n in enumerate(srcs) if n in self.deferred), None)
        for i, n in enumerate(srcs):
            if i != fused and n in self.deferred:
                self._emit_deferred(n)
            if i != fused and node.args[i] in self.deferred_alias:
                self.bind(node.args[i], self.env[n], self.info[n])
        if fused is not None:
            self._conv_add(node, srcs[fused], node.args[1 - fused])
            return
        (a, qa), (b, qb) = self.value(node, node.args[0]), self.value(node, node.args[1])
        if qa is None or qb is None:
            raise self.unsupported(node, ": adds a float tensor")
        chain, _, relu = self._fusable_chain(node, allow_bn=False)
        last = chain[-1] if chain else node
        qp = self._out_qparams(last)
        self.bind(node, self.emit(node.name, QuantizedAdd(qp.scale, qp.zero_point, relu), (a, b)), qp)
        for n in chain:
            self.absorbed[n] = node


def _observe_ranges(gm: fx.GraphModule, batches: Sequence[Tensor]) -> dict[str, tuple[float, float]]:
    """Min/max of every tensor-valued node of the fake-quant graph over ``batches``."""
    ranges: dict[str, tuple[float, float]] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, Tensor) and out.is_floating_point() and out.numel():
                lo, hi = float(out.min()), float(out.max())
                old = ranges.get(n.name)
                ranges[n.name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
            return out

    rec = _Recorder(gm)
    for x in batches:
        rec.run(x)
    return ranges


@torch.no_grad()
def to_fbgemm(model: nn.Module, example_input: Tensor | Iterable[Tensor], engine: str = "fbgemm",
              float_head: bool = True) -> fx.GraphModule:
    """Convert a calibrated fake-quant model to PyTorch's int8 CPU engine (a new ``fx.GraphModule``).

    ``example_input``: one batch, or an iterable of batches, of representative inputs; they set the
    ``quint8`` ranges of the tensors that have no hawq quantizer (see the module doc). ``engine``:
    ``"fbgemm"``, ``"x86"`` or ``"onednn"``; the weights are packed for it and the returned model
    sets ``torch.backends.quantized.engine`` to it on every call. With ``"onednn"`` a conv whose
    only consumer is a residual add is fused with it (``quantized::conv2d_add(_relu)``): the conv's
    result is added before it is rounded, one rounding fewer than fbgemm's separate quantized add,
    and one pass over memory fewer. ``float_head``: run a classifier
    ``QuantLinear`` that produces a model output as the float fake-quant layer. Every conv/linear
    must be a calibrated ``QuantConv2d``/``QuantBnConv2d``/``QuantLinear`` with <= 8-bit weights and
    activations; anything without a rule raises a HawqError naming it. The model is not modified.
    """
    if engine not in ENGINES:
        raise HawqError(f"to_fbgemm: engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    if engine not in torch.backends.quantized.supported_engines:
        raise HawqError(f"to_fbgemm: this PyTorch build has no '{engine}' quantized engine")
    batches = [example_input] if isinstance(example_input, Tensor) else list(example_input)
    if not batches or not all(isinstance(b, Tensor) for b in batches):
        raise HawqError("to_fbgemm: example_input must be a tensor or an iterable of tensors")
    torch.backends.quantized.engine = engine
    for name, mod in model.named_modules():
        if isinstance(mod, QUANT_LAYERS) and mod.input_quant is not None and not mod.input_quant.calibrated:
            raise HawqError(f"to_fbgemm: the input quantizer of '{name}' is not calibrated; run calibrate() first")
    work, gm = working_copy(model, torch.float32, _WHAT)
    ranges = _observe_ranges(gm, [b.to("cpu", torch.float32) for b in batches])
    out = _Converter(work, gm, ranges, float_head, engine).rewrite()
    # The weights are packed for ``engine`` and onednn's fused conv + add checks the global engine.
    out.register_forward_pre_hook(functools.partial(_select_engine, engine))
    out.quantized_engine = engine
    return out


def _select_engine(engine: str, module: nn.Module, args: Any) -> None:
    if torch.backends.quantized.engine != engine:
        torch.backends.quantized.engine = engine
