"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) nodes, run by onnxruntime.

How: every hawq quantized layer is swapped (in a copy of the model) for a twin whose forward
calls two custom torch ops, ``hawq_export::dequantize_weight`` and
``hawq_export::quantize_dequantize``; ``torch.onnx.export(dynamo=True)`` translates them through
``custom_translation_table`` into ONNX ops:

* weights: an integer initializer of codes -> ``DequantizeLinear(codes, scale, 0, axis=0)``
  (per output channel; per group uses opset-21 blocked quantization, ``block_size`` = group size
  along the last axis). Codes of 2..4-bit layers are stored as ONNX ``INT4`` when the opset is
  >= 21 and onnxruntime loads and runs the graph; otherwise (or with ``int4=False``) they are
  ``INT8`` initializers carrying the 4-bit codes. Wider codes are INT8 (<= 8 bits) or INT16.
* activations (a layer's input, HAWQ convention): ``Clip(x, qmin*s, qmax*s) -> QuantizeLinear ->
  DequantizeLinear`` with the calibrated scale, zero point 0 and an INT8/UINT8 (INT16/UINT16 above
  8 bits) container; the Clip is dropped when the container's range is the quantizer's range
  (e.g. unsigned 8-bit), so the QDQ pattern is the plain one onnxruntime fuses.
* biases: the float bias the fake-quant layer uses (rounded to the accumulator grid), as is.
* I-BERT models (``quant.transformer: ibert``): every grid (``StaticGrid``: matmul operands, the
  16-bit inputs of GELU and LayerNorm) is a QDQ pair like any activation; GELU, softmax, LayerNorm
  and tanh run as the float ops at those quantized inputs (:func:`float_kernel`), as QDQ runtimes
  run them. The integer kernels themselves are in the integer-only file.

The exported graph computes what the fake-quant PyTorch model computes, in float32 with another
summation order; :func:`compare_onnx` runs both and reports the largest difference against the
output quantization step.

Integer-only ONNX (:func:`export_onnx_integer`): the model converted by ``hawq.quant.to_integer``
written op for op as ``ConvInteger``/``MatMulInteger`` and INT64 dyadic rescaling, which onnxruntime
runs bit-identically to the PyTorch integer model (:func:`compare_onnx_integer`).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import Tensor, nn

from hawq import HawqError
from hawq.bitmap import atomic_write_bytes
from hawq.export.config import check_opset
from hawq.export.quantized_file import quantized_layers
from hawq.quant import Dequantize, QuantAct, fold_bn, infer_quant_config, to_integer

INT4_MAX_BITS = 4
INT4_OPSET = 21  # INT4 tensors and blocked (per-group) quantization
_ACT_CONTAINERS = {  # (signed, max bits) -> (torch dtype of the zero point, low, high)
    (True, 8): (torch.int8, -128, 127), (False, 8): (torch.uint8, 0, 255),
    (True, 16): (torch.int16, -(2**15), 2**15 - 1), (False, 16): (torch.uint16, 0, 2**16 - 1),
}


# ---------------------------------------------------------------------------------------------
# custom ops: their eager kernels are the fake-quant math; the exporter maps them to QDQ nodes


@torch.library.custom_op("hawq_export::dequantize_weight", mutates_args=())
def dequantize_weight(codes: Tensor, scale: Tensor, zero_point: Tensor, block_size: int) -> Tensor:
    """``codes * scale`` with a per-tensor (``scale`` 0-d), per-axis-0 or blocked (last axis) scale."""
    values = codes.to(torch.float32)
    if scale.dim() == 0:
        return values * scale
    if block_size > 0:
        full = scale.repeat_interleave(block_size, dim=-1)[..., : codes.shape[-1]]
        return values * full
    return values * scale.reshape(-1, *([1] * (codes.dim() - 1)))


@dequantize_weight.register_fake
def _(codes: Tensor, scale: Tensor, zero_point: Tensor, block_size: int) -> Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("hawq_export::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                        clip: bool) -> Tensor:
    """``clamp(round(x / s), qmin, qmax) * s`` (zero point 0), as ``hawq.quant.fake_quant_act``."""
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


@quantize_dequantize.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, clip: bool) -> Tensor:
    return torch.empty_like(x)


def _translation_table(opset: int) -> dict:
    import onnxscript

    op = getattr(onnxscript, f"opset{opset}")

    def dequantize_weight_onnx(codes, scale, zero_point, block_size: int):
        if block_size > 0:
            return op.DequantizeLinear(codes, scale, zero_point, axis=-1, block_size=block_size)
        return op.DequantizeLinear(codes, scale, zero_point, axis=0)

    def quantize_dequantize_onnx(x, scale, zero_point, qmin: int, qmax: int, clip: bool):
        if clip:
            low = op.Mul(scale, op.Constant(value_float=float(qmin)))
            high = op.Mul(scale, op.Constant(value_float=float(qmax)))
            x = op.Clip(x, low, high)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    return {torch.ops.hawq_export.dequantize_weight.default: dequantize_weight_onnx,
            torch.ops.hawq_export.quantize_dequantize.default: quantize_dequantize_onnx}


# ---------------------------------------------------------------------------------------------
# export twins of the quantized layers


class _ActQDQ(nn.Module):
    mode = "frozen"  # read by hawq.quant layers that keep float weights (their bias rounding)

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        if not act.calibrated:
            raise HawqError("export_onnx: activation quantizers are not calibrated; run hawq.quant.calibrate")
        bits, signed = int(act.bits), bool(act.signed)
        container = 8 if bits <= 8 else 16
        zp_dtype, low, high = _ACT_CONTAINERS[(signed, container)]
        self.qmin, self.qmax = int(act.qmin), int(act.qmax)
        self.clip = (self.qmin, self.qmax) != (low, high)
        self.register_buffer("scale", act.scale.detach().to(torch.float32).clone())
        self.register_buffer("zero_point", torch.zeros((), dtype=zp_dtype))

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.hawq_export.quantize_dequantize(x, self.scale, self.zero_point, self.qmin, self.qmax,
                                                         self.clip)


class _QDQLayer(nn.Module):
    """A conv / linear / embedding computing with ``DequantizeLinear`` weights and a QDQ input."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        with torch.no_grad():
            codes, scale = layer.int_weight()
            bias = layer._quant_bias(layer.bias) if getattr(layer, "bias", None) is not None else None
            bias_codes, bias_scale = _bias_on_accumulator_grid(layer)
        self.bits = int(layer.weight_bits)
        self.group_size = getattr(layer, "group_size", None) or 0
        code_dtype = torch.int8 if self.bits <= 8 else torch.int16
        self.register_buffer("weight_codes", codes.to(code_dtype).clone())
        self.register_buffer("weight_scale", scale.detach().to(torch.float32).clone())
        self.register_buffer("weight_zero_point", torch.zeros(scale.shape, dtype=code_dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # An int32 bias on the s_in * s_w grid (what the fake-quant layer rounds it to) lets
        # onnxruntime fuse DQ -> Conv -> Q into an integer QLinearConv.
        self.int_bias = bias_codes is not None
        if self.int_bias:
            self.register_buffer("bias_codes", bias_codes)
            self.register_buffer("bias_scale", bias_scale)
            self.register_buffer("bias_zero_point", torch.zeros(bias_scale.shape, dtype=torch.int32))
        act = getattr(layer, "input_quant", None)
        if act is not None and getattr(act, "mode", "frozen") != "frozen":
            raise HawqError(f"export_onnx: activation quantizer in mode '{act.mode}'; freeze it before export")
        self.input_quant = _ActQDQ(act) if act is not None else None
        if isinstance(layer, nn.Conv2d):
            self.kind = "conv"
            self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)
            if layer.padding_mode != "zeros":
                raise HawqError(f"export_onnx: conv padding_mode '{layer.padding_mode}' is not supported")
        elif isinstance(layer, nn.Linear):
            self.kind = "linear"
        elif isinstance(layer, nn.Embedding):
            self.kind = "embedding"
            self.padding_idx = layer.padding_idx
            if layer.max_norm is not None:
                raise HawqError("export_onnx: Embedding with max_norm is not supported")
        else:
            raise HawqError(f"export_onnx: cannot export a quantized {type(layer).__name__}")

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        w = torch.ops.hawq_export.dequantize_weight(self.weight_codes, self.weight_scale, self.weight_zero_point,
                                                    self.group_size)
        bias = self.bias
        if self.int_bias:
            bias = torch.ops.hawq_export.dequantize_weight(self.bias_codes, self.bias_scale, self.bias_zero_point, 0)
        if self.kind == "conv":
            return F.conv2d(x, w, bias, *self.conv_args)
        if self.kind == "linear":
            return F.linear(x, w, bias)
        return F.embedding(x, w, self.padding_idx)


def _bias_on_accumulator_grid(layer: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """``(int32 codes, scale s_in * s_w)`` of the bias when the layer rounds it to that grid, else Nones."""
    act = getattr(layer, "input_quant", None)
    bias = getattr(layer, "bias", None)
    if bias is None or act is None or getattr(layer, "group_size", None) is not None:
        return None, None
    scale = (act.scale * layer.weight_scale()).to(torch.float32)
    codes = torch.round(bias.detach() / scale)
    if not bool(torch.isfinite(codes).all()) or bool((codes.abs() > 2**31 - 1).any()):
        return None, None
    return codes.to(torch.int32), scale.clone()


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class _FloatLayerNorm(nn.Module):
    """A QuantLayerNorm's QDQ form: its input grid as a QDQ pair, then float LayerNorm."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.input_quant = _ActQDQ(ln.input_quant)
        self.ln = nn.LayerNorm(ln.normalized_shape, ln.eps, ln.elementwise_affine, bias=ln.bias is not None)
        self.ln.load_state_dict({k: v for k, v in ln.state_dict().items() if not k.startswith("input_quant")})

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(self.input_quant(x))


class _FloatGELU(nn.Module):
    def __init__(self, gelu: nn.Module) -> None:
        super().__init__()
        self.input_quant = _ActQDQ(gelu.input_quant)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.input_quant(x))


class _FloatSoftmax(nn.Module):
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return torch.softmax(x if mask is None else x + mask, dim=-1)


def float_kernel(module: nn.Module) -> nn.Module | None:
    """The QDQ form of an I-BERT fake-quant kernel (its input grid as QDQ, the float op), or None."""
    from hawq.quant.ibert import QuantGELU, QuantLayerNorm, QuantSoftmax, QuantTanh

    if isinstance(module, QuantLayerNorm):
        return _FloatLayerNorm(module)
    if isinstance(module, QuantGELU):
        return _FloatGELU(module)
    if isinstance(module, QuantSoftmax):
        return _FloatSoftmax()
    if isinstance(module, QuantTanh):
        return nn.Tanh()
    return None


def ibert_float_view(model: nn.Module) -> nn.Module | None:
    """What the QDQ file of an I-BERT model computes, in PyTorch: a copy of ``model`` with each I-BERT
    kernel replaced by :func:`float_kernel` (grids and layers unchanged); None when it has none.
    The QDQ verdict compares the file with this model."""
    names = [name for name, m in model.named_modules() if float_kernel(m) is not None]
    if not names:
        return None
    view = copy.deepcopy(model).eval()
    for name in names:
        _set_submodule(view, name, float_kernel(view.get_submodule(name)))
    return view


def qdq_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) whose quantized layers compute through the QDQ custom ops
    (I-BERT kernels: :func:`float_kernel`)."""
    twin = copy.deepcopy(model).eval()
    if infer_quant_config(twin).fold_bn:  # export what inference runs: the folded convs
        twin = fold_bn(twin)
    layers = quantized_layers(twin)
    if not layers:
        raise HawqError("export_onnx: the model has no quantized layers; run hawq.quant.quantize_model first")
    for name, layer in layers.items():
        _set_submodule(twin, name, _QDQLayer(layer))
    for name, m in list(twin.named_modules()):
        kernel = float_kernel(m)
        if kernel is not None:
            _set_submodule(twin, name, kernel)
        elif isinstance(m, QuantAct) and name and "." not in name:  # a standalone grid of a traced I-BERT model
            _set_submodule(twin, name, _ActQDQ(m))
    for m in twin.modules():  # activation-only quantized layers (float weights)
        act = getattr(m, "input_quant", None)
        if isinstance(act, QuantAct) and not isinstance(m, _QDQLayer):
            m.input_quant = _ActQDQ(act)
    return twin


# ---------------------------------------------------------------------------------------------
# export


def _to_int4(model_proto: onnx.ModelProto, int4_layers: set[str]) -> int:
    """Re-type the INT8 code/zero-point initializers of ``int4_layers``' DequantizeLinear as INT4."""
    inits = {t.name: t for t in model_proto.graph.initializer}
    converted = 0
    for node in model_proto.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith(".weight_codes"):
            continue
        layer = node.input[0][: -len(".weight_codes")]
        if layer not in int4_layers or node.input[0] not in inits:
            continue
        for i in (0, 2):  # codes and zero point; fresh names, since identical tensors may be shared
            src = numpy_helper.to_array(inits[node.input[i]]).astype(np.int8)
            new_name = f"{node.input[i]}.int4"
            if new_name not in inits:
                tensor = onnx.helper.make_tensor(new_name, TensorProto.INT4, src.shape, src.flatten().tolist())
                model_proto.graph.initializer.append(tensor)
                inits[new_name] = tensor
            node.input[i] = new_name
        converted += 1
    used = {name for node in model_proto.graph.node for name in node.input}
    kept = [t for t in model_proto.graph.initializer if t.name in used]
    del model_proto.graph.initializer[:]
    model_proto.graph.initializer.extend(kept)
    return converted


def _ort_session(model_bytes_or_path: Any, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes_or_path, opts, providers=["CPUExecutionProvider"])


def _feeds(session, inputs: tuple[Tensor, ...]) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise HawqError(f"ONNX model takes {len(names)} inputs, got {len(inputs)}")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}


def _as_tuple(example_input: Any) -> tuple[Tensor, ...]:
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not all(isinstance(t, Tensor) for t in inputs):
        raise HawqError("export_onnx: example_input must be a tensor or a tuple of tensors")
    return inputs


def export_onnx(model: nn.Module, example_input: Tensor | tuple[Tensor, ...], path: str | os.PathLike,
                opset: int = 21, int4: bool = True, dynamic_batch: bool = True) -> Path:
    """Write a QDQ ONNX model of the (calibrated, fake-quant) ``model`` to ``path``; return the path.

    ``int4``: store 2..4-bit weight codes as INT4 when ``opset >= 21`` and onnxruntime runs the
    result, else as INT8 (the choice is recorded in the model's metadata ``hawq.weight_int4``).
    ``dynamic_batch`` makes the first input dim symbolic. The file is written atomically.
    """
    check_opset(opset, "export_onnx: opset")
    inputs = _as_tuple(example_input)
    twin = qdq_twin(model)
    if any(getattr(m, "group_size", 0) for m in twin.modules() if isinstance(m, _QDQLayer)) and opset < INT4_OPSET:
        raise HawqError(f"export_onnx: per-group weights need opset >= {INT4_OPSET} (blocked DequantizeLinear)")
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(twin, inputs, dynamo=True, opset_version=opset, verbose=False,
                                        custom_translation_table=_translation_table(opset),
                                        dynamic_shapes=dynamic_shapes, external_data=False)
        except Exception as e:  # noqa: BLE001 -- torch.export raises many types; report one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HawqError(f"export_onnx: torch.onnx.export failed: {first[:300]}") from None
    proto = program.model_proto
    int4_layers = {name for name, layer in quantized_layers(model).items()
                   if int(layer.weight_bits) <= INT4_MAX_BITS}
    used_int4 = False
    if int4 and opset >= INT4_OPSET and int4_layers:
        candidate = copy.deepcopy(proto)
        if _to_int4(candidate, int4_layers):
            try:  # keep INT4 only if onnxruntime loads and runs it
                session = _ort_session(candidate.SerializeToString())
                session.run(None, _feeds(session, inputs))
                proto, used_int4 = candidate, True
            except Exception:  # noqa: BLE001 -- any failure means: fall back to INT8 containers
                used_int4 = False
    onnx.helper.set_model_props(proto, {"hawq.weight_int4": str(used_int4).lower(),
                                        "hawq.format": "qdq"})
    return _save_atomic(proto, Path(path))


# ---------------------------------------------------------------------------------------------
# verification


def accumulator_lsb(model: nn.Module) -> float:
    """The last quantized layer's accumulator LSB ``s_in * max(s_w)``: its finest output increment."""
    layers = quantized_layers(model)
    if not layers:
        raise HawqError("accumulator_lsb: the model has no quantized layers")
    last = layers[list(layers)[-1]]
    act = getattr(last, "input_quant", None)
    return float(last.weight_scale().max()) * (float(act.scale) if act is not None else 1.0)


def output_step(reference: Tensor, bits: int = 8) -> float:
    """One step of a symmetric ``bits``-bit grid over the reference outputs: ``max|y| / (2^(bits-1) - 1)``.

    The tolerance the tests use for QDQ-vs-PyTorch agreement on small networks. It is not a bound
    for every network: float summation order differs between the two runtimes, so an activation
    within float error of a rounding boundary may land on the neighbouring code, and that code
    propagates through every later layer (on ResNet-18 the logits can differ by more than one such
    step). :func:`export_onnx_integer` is the exact alternative.
    """
    return float(reference.detach().abs().max()) / (2 ** (bits - 1) - 1)


def compare_onnx(model: nn.Module, path: str | os.PathLike, inputs: Tensor | tuple[Tensor, ...],
                 threads: int = 1) -> dict[str, float]:
    """Run the PyTorch fake-quant ``model`` and the ONNX file on ``inputs`` and compare the outputs.

    Returns ``max_abs_diff``, ``step`` (:func:`output_step`, the tolerance), ``max_diff_in_steps``,
    ``within_one_step`` (fraction of outputs), ``lsb`` (:func:`accumulator_lsb`) with
    ``within_one_lsb``, and ``argmax_agreement`` for 2-D logits.
    """
    model = model.eval()
    got, ref = _onnx_and_torch_outputs(model, path, _as_tuple(inputs), threads, "compare_onnx")
    diff = (got - ref).abs()
    step, lsb = output_step(ref), accumulator_lsb(model)
    worst = float(diff.max())
    # all-zero reference outputs have no step: equal outputs are 0 steps apart, others have no figure
    in_steps = worst / step if step > 0 else (0.0 if worst == 0 else None)
    out = {"max_abs_diff": worst, "step": step, "max_diff_in_steps": in_steps,
           "within_one_step": float((diff <= step).float().mean()), "lsb": lsb,
           "within_one_lsb": float((diff <= lsb).float().mean())}
    if ref.dim() == 2:
        out["argmax_agreement"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return out


def _onnx_and_torch_outputs(model: nn.Module, path: str | os.PathLike, inputs: tuple[Tensor, ...], threads: int,
                            who: str) -> tuple[Tensor, Tensor]:
    """The ONNX file's first output and ``model``'s on ``inputs``, checked to have the same shape."""
    session = _ort_session(str(path), threads)
    got = torch.from_numpy(session.run(None, _feeds(session, inputs))[0])
    with torch.no_grad():
        ref = model(*inputs)
    if got.shape != ref.shape:
        raise HawqError(f"{who}: ONNX output shape {tuple(got.shape)} != PyTorch {tuple(ref.shape)}")
    return got, ref


# ---------------------------------------------------------------------------------------------
# integer-only ONNX: hawq's dyadic integer pipeline (``hawq.quant.to_integer``) op for op


class _IntOnnxBuilder:
    """Writes the ONNX nodes of one ``to_integer`` graph (integer tensors travel as INT64)."""

    SHARE_MIN = 256  # constants with at least this many entries are stored once when repeated

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._shared: dict[tuple[str, tuple[int, ...], bytes], str] = {}

    def fresh(self, base: str) -> str:
        name = base.replace(".", "_")
        while name in self._names:
            name += "_"
        self._names.add(name)
        return name

    def const(self, base: str, value: Tensor | np.ndarray | int | float | list, dtype: torch.dtype) -> str:
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        array = np.asarray(value.detach().cpu().numpy() if isinstance(value, Tensor) else value).astype(np_dtype)
        # A module called more than once (RetinaNet's heads, on five FPN levels) becomes one integer
        # module per call: its large constants (weight codes, biases) are stored once.
        key = (str(array.dtype), array.shape, array.tobytes()) if array.size >= self.SHARE_MIN else None
        if key is not None and key in self._shared:
            return self._shared[key]
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(array, name))
        if key is not None:
            self._shared[key] = name
        return name

    def cast(self, v: str, dtype: torch.dtype, base: str) -> str:
        return self.op("Cast", [v], base, to=_onnx_dtype(dtype))

    def op(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.fresh(base)
        self.nodes.append(onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def floor_div(self, a: str, d: str, base: str) -> str:
        """``floor(a / d)`` for INT64 ``d > 0``: ONNX's integer Div truncates, so subtract ``a mod d`` first."""
        rem = self.op("Mod", [a, d], f"{base}_mod", fmod=0)  # fmod=0: the divisor's sign (Python's %)
        return self.op("Div", [self.op("Sub", [a, rem], f"{base}_exact"), d], f"{base}_floor")

    def rescale(self, v: str, mult: Tensor, shift: Tensor, base: str) -> str:
        """:func:`hawq.quant.integer.rescale`: ``floor((v * m + 2^(c-1)) / 2^c)`` in INT64."""
        c = shift.to(torch.int64)
        half = torch.where(c > 0, torch.ones_like(c) << (c - 1).clamp(min=0), torch.zeros_like(c))
        prod = self.op("Mul", [v, self.const(f"{base}_mult", mult, torch.int64)], f"{base}_prod")
        biased = self.op("Add", [prod, self.const(f"{base}_half", half, torch.int64)], f"{base}_biased")
        return self.floor_div(biased, self.const(f"{base}_div", torch.ones_like(c) << c, torch.int64), base)


def _onnx_dtype(dtype: torch.dtype) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(torch.empty((), dtype=dtype).numpy().dtype)


def _int_module_onnx(b: _IntOnnxBuilder, mod: nn.Module, args: list[str], name: str) -> str:
    """Each integer module writes its own ONNX nodes (``mod.to_onnx``, see ``hawq.quant.OnnxBuilder``)."""
    lower = getattr(mod, "to_onnx", None)
    if not callable(lower):
        raise HawqError(f"export_onnx_integer: no ONNX rule for integer module '{name}' ({type(mod).__name__})")
    return lower(b, args, name)


def integer_onnx_model(int_model: fx.GraphModule, example_input: Tensor | tuple[Tensor, ...], opset: int = 21,
                       dynamic_batch: bool = True, dynamic_sizes: bool = False) -> onnx.ModelProto:
    """The ONNX graph of a ``to_integer`` model: ConvInteger/MatMulInteger and INT64 dyadic rescaling.

    Every operator is the PyTorch integer model's, on the same integers: the model input is
    quantized as ``round(x / s)`` in float64, convs and linears are ``ConvInteger``/``MatMulInteger``
    (int8/uint8 codes x int8 codes -> int32), and every rescale is ``floor((v*m + 2^(c-1)) / 2^c)`` in
    INT64 (``Mod`` then an exact ``Div``); windowed average pools are INT64 sums of strided ``Slice``s of
    the ``Pad``-ded input. Float islands (``to_integer(float_ops=True)``) have no rule and raise a HawqError.

    ``dynamic_batch`` makes the first input and output dim symbolic, ``dynamic_sizes`` every other one
    (a detector's image size and anchor count: its graph reads sizes with ``Shape``, nothing is fixed).
    A model with several inputs (a BERT's ``input_ids, attention_mask, token_type_ids``) takes a
    tuple; the ONNX inputs get the placeholders' names, and ``dynamic_batch`` also makes the
    sequence dim of 2-d integer inputs symbolic.
    """
    check_opset(opset, "export_onnx_integer: opset")
    if getattr(int_model, "float_nodes", None):
        raise HawqError(f"export_onnx_integer: the model has float operators ({int_model.float_nodes[0]}, ...); "
                        "only integer-only models export")
    examples = _as_tuple(example_input)
    b = _IntOnnxBuilder()
    env: dict[fx.Node, str] = {}
    inputs, outputs = [], []
    modules = dict(int_model.named_modules())
    for node in int_model.graph.nodes:
        if node.op == "placeholder":
            if len(inputs) >= len(examples):
                raise HawqError(f"export_onnx_integer: the model takes more inputs than the {len(examples)} "
                                "example tensors")
            x = examples[len(inputs)]
            shape: list[Any] = list(x.shape)
            if dynamic_sizes:  # images (NCHW) keep their channels
                shape[1:] = [shape[1], "height", "width"] if len(shape) == 4 else \
                    [f"in_{len(inputs)}_{i}" for i in range(1, len(shape))]
            if dynamic_batch:
                shape[0] = "batch"
                if x.dim() == 2 and not x.is_floating_point():  # token ids and masks: any sequence length
                    shape[1] = "sequence"
            inputs.append(onnx.helper.make_tensor_value_info(node.name, _onnx_dtype(x.dtype), shape))
            b._names.add(node.name)
            env[node] = node.name
        elif node.op == "call_module":
            args = []
            for a in node.args:
                if not isinstance(a, fx.Node) or a not in env:
                    raise HawqError(f"export_onnx_integer: node '{node.name}' has a non-tensor argument")
                args.append(env[a])
            env[node] = _int_module_onnx(b, modules[node.target], args, str(node.target))
        elif node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node):
                raise HawqError("export_onnx_integer: models with one output tensor only")
            deq = modules.get(result.target) if result.op == "call_module" else None
            if not hasattr(deq, "out_dtype"):
                raise HawqError("export_onnx_integer: the output is not a dequantized integer tensor")
            with torch.no_grad():
                out_shape: list[Any] = list(int_model(*examples).shape)
            if dynamic_sizes:
                out_shape[1:] = [f"out_{i}" for i in range(1, len(out_shape))]
            if dynamic_batch:
                out_shape[0] = "batch"
            outputs.append(onnx.helper.make_tensor_value_info(env[result], _onnx_dtype(deq.out_dtype), out_shape))
        else:
            raise HawqError(f"export_onnx_integer: no ONNX rule for node '{node.name}' ({node.op} {node.target})")
    graph = onnx.helper.make_graph(b.nodes, "hawq_integer", inputs, outputs, b.inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                   producer_name="hawq")
    onnx.helper.set_model_props(proto, {"hawq.format": "integer"})
    onnx.checker.check_model(proto)
    return proto


def export_onnx_integer(model: nn.Module, example_input: Tensor | tuple[Tensor, ...], path: str | os.PathLike,
                        opset: int = 21, dynamic_batch: bool = True, dynamic_sizes: bool = False) -> Path:
    """Write hawq's integer-only model of ``model`` as ONNX (bit-identical to ``to_integer`` in onnxruntime).

    ``model``: a calibrated fake-quant model (converted with ``hawq.quant.to_integer``) or an
    already converted integer model. Needs what ``to_integer`` needs (every conv/linear quantized
    at <= 8 bits); see :func:`integer_onnx_model` for the ops. The file is written atomically.
    """
    int_model = _as_integer_model(model, example_input)
    proto = integer_onnx_model(int_model, example_input, opset, dynamic_batch, dynamic_sizes)
    return _save_atomic(proto, Path(path))


def _as_integer_model(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule) and any(isinstance(m, Dequantize) for m in model.modules()):
        return model
    return to_integer(model, example_input)


def _save_atomic(proto: onnx.ModelProto, path: Path) -> Path:
    atomic_write_bytes(path, proto.SerializeToString())  # the project's temp + fsync + rename writer
    return path


def compare_onnx_integer(int_model: nn.Module, path: str | os.PathLike, inputs: Tensor | tuple[Tensor, ...],
                         threads: int = 1) -> dict[str, float]:
    """Run an integer ONNX file and the PyTorch integer model (``to_integer``) on ``inputs``.

    Returns ``max_abs_diff``, ``max_diff_in_steps`` (the difference in units of the integer
    output's step, the scale of the final ``Dequantize``), ``exact_fraction`` (outputs that agree
    bit for bit) and, for 2-D outputs, ``argmax_agreement``.
    """
    int_model = _as_integer_model(int_model, inputs)
    graph_out = next(n for n in int_model.graph.nodes if n.op == "output").args[0]
    deq = int_model.get_submodule(graph_out.target) if getattr(graph_out, "op", "") == "call_module" else None
    if not isinstance(deq, Dequantize):
        raise HawqError("compare_onnx_integer: the model's output is not a dequantized integer tensor")
    got, ref = _onnx_and_torch_outputs(int_model, path, _as_tuple(inputs), threads, "compare_onnx_integer")
    diff = (got.double() - ref.double()).abs()
    out = {"max_abs_diff": float(diff.max()), "max_diff_in_steps": float((diff / deq.scale).max()),
           "exact_fraction": float((got == ref).float().mean())}
    if ref.dim() == 2:
        out["argmax_agreement"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return out
