"""hawq.export.export_onnx: QDQ graphs that onnxruntime runs and that agree with the fake-quant model."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from conftest import branches_model
from onnx import TensorProto
from torch import nn

from hawq import HawqError
from hawq.bitmap import LayerBits
from hawq.export.onnx_qdq import compare_onnx, compare_onnx_integer, export_onnx, export_onnx_integer
from hawq.layers import quantizable_layers
from hawq.models.fashion import fashion_resnet
from hawq.quant.config import QuantConfig
from hawq.quant.integer import to_integer
from hawq.quant.model import calibrate, quantize_model

pytestmark = pytest.mark.filterwarnings("ignore")


def _weight_dq_types(path) -> dict[str, int]:
    """{layer: ONNX data type of its weight codes} from the DequantizeLinear nodes."""
    proto = onnx.load(str(path))
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and ".weight_codes" in node.input[0]:
            out[node.input[0].split(".weight_codes")[0]] = inits[node.input[0]]
    return out


def _meta(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _check_agreement(result: dict) -> None:
    # Tolerance: one step of an 8-bit grid over the reference logits (max|y| / 127).
    assert result["max_abs_diff"] <= result["step"], result
    assert result["argmax_agreement"] == 1.0, result


def test_resnet_mixed_4_8_int4_qdq_matches_fake_quant(tmp_path):
    torch.manual_seed(0)
    model = fashion_resnet(width=4)
    names = quantizable_layers(model)
    bits = {n: LayerBits(4 if i % 2 else 8, 8) for i, n in enumerate(names)}
    quantize_model(model, bits, QuantConfig())
    x = torch.randn(16, 1, 28, 28)
    calibrate(model, [x], lambda m, b: m(b), progress=False)
    path = export_onnx(model.eval(), x[:2], tmp_path / "model.onnx")
    assert _meta(path)["hawq.weight_int4"] == "true"
    types = _weight_dq_types(path)
    assert set(types) == set(names)
    for name in names:
        assert types[name] == (TensorProto.INT4 if bits[name].weight == 4 else TensorProto.INT8), name
    _check_agreement(compare_onnx(model, path, torch.randn(32, 1, 28, 28)))  # batch differs from export


def test_linear_int8_containers_and_activation_only_layer(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 6))
    bits = {"0": LayerBits(4, 8), "2": LayerBits(32, 8), "4": LayerBits(6, 4)}  # "2": float weight, int input
    quantize_model(model, bits, QuantConfig())
    x = torch.randn(64, 12)
    calibrate(model, [x], lambda m, b: m(b), progress=False)
    path = export_onnx(model.eval(), x[:4], tmp_path / "linear.onnx", int4=False)
    assert _meta(path)["hawq.weight_int4"] == "false"
    assert _weight_dq_types(path) == {"0": TensorProto.INT8, "4": TensorProto.INT8}
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") == 3  # every layer's input, including the float-weight one
    assert ops.count("Clip") >= 2  # signed 8-bit and 4-bit grids are narrower than int8
    _check_agreement(compare_onnx(model, path, torch.randn(50, 12)))


class _TinyText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 20)
        self.fc = nn.Linear(20, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(ids).mean(dim=1))


def test_grouped_linear_and_embedding_use_blocked_dequantize(tmp_path):
    torch.manual_seed(2)
    model = _TinyText()
    bits = {"embed": LayerBits(4, 32), "fc": LayerBits(4, 8)}
    quantize_model(model, bits, QuantConfig(group_size=8))  # 20 = 8 + 8 + 4
    ids = torch.randint(0, 40, (16, 5))
    calibrate(model, [ids], lambda m, b: m(b), progress=False)
    path = export_onnx(model.eval(), ids[:2], tmp_path / "text.onnx")
    blocked = [n for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 8 for a in n.attribute)]
    assert len(blocked) == 2
    _check_agreement(compare_onnx(model, path, torch.randint(0, 40, (24, 5))))


def test_export_errors_are_one_line(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(HawqError, match="no quantized layers"):
        export_onnx(model, torch.randn(2, 4), tmp_path / "a.onnx")
    quantize_model(model, {"0": LayerBits(8, 8)})
    with pytest.raises(HawqError, match="not calibrated"):
        export_onnx(model, torch.randn(2, 4), tmp_path / "a.onnx")
    calibrate(model, [torch.randn(2, 4)], lambda m, b: m(b), progress=False)
    with pytest.raises(HawqError, match="opset"):
        export_onnx(model, torch.randn(2, 4), tmp_path / "a.onnx", opset=11)
    assert not (tmp_path / "a.onnx").exists()


def _mixed_resnet(fold: bool) -> nn.Module:
    """Demo ResNet (residual adds, max/global pool) at mixed 4/8-bit weights and activations, non-trivial BN."""
    torch.manual_seed(3)
    model = fashion_resnet(width=8).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(-0.5, 1.5)  # some negative gains: sign flips in the integer BN
            m.bias.data.normal_(0, 0.1)
    names = quantizable_layers(model)
    bits = {n: LayerBits(4 if i % 2 else 8, 4 if i % 3 == 1 else 8) for i, n in enumerate(names)}
    quantize_model(model, bits, QuantConfig(fold_bn=fold))
    calibrate(model, [torch.randn(32, 1, 28, 28)], lambda m, b: m(b), progress=False)
    return model.eval()


@pytest.mark.parametrize("fold", [True, False])
def test_integer_onnx_is_bit_identical_to_pytorch_integer_model(tmp_path, fold):
    model = _mixed_resnet(fold)
    x = torch.randn(4, 1, 28, 28)
    int_model = to_integer(model, x)
    path = export_onnx_integer(int_model, x, tmp_path / "int.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"ConvInteger", "MatMulInteger"} <= ops
    assert not ops & {"Conv", "Gemm", "MatMul", "QuantizeLinear", "DequantizeLinear"}  # no float kernels
    result = compare_onnx_integer(int_model, path, torch.randn(48, 1, 28, 28) * 2)  # other batch, clipping
    # Same integers in both runtimes: within one output step, and in fact bit for bit.
    assert result["max_diff_in_steps"] <= 1.0, result
    assert result["exact_fraction"] == 1.0 and result["max_abs_diff"] == 0.0, result
    assert result["argmax_agreement"] == 1.0, result


def _assert_bit_identical(int_model, path, inputs) -> dict:
    result = compare_onnx_integer(int_model, path, inputs)
    assert result["exact_fraction"] == 1.0 and result["max_abs_diff"] == 0.0, result
    assert result["argmax_agreement"] == 1.0, result
    return result


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_integer_onnx_windowed_avg_pool_and_cat_bit_identical(tmp_path, count_include_pad):
    q, x = branches_model(count_include_pad)
    int_model = to_integer(q, x[:2])
    path = export_onnx_integer(int_model, x[:2], tmp_path / "branches.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Concat" in ops and "Pad" in ops and "MaxPool" in ops
    assert not {"AveragePool", "Conv", "Gemm", "MatMul"} & set(ops)  # the window sums are INT64 slices
    _assert_bit_identical(int_model, path, torch.randn(40, 1, 13, 11) * 2)  # other batch, clipping


class _PyramidToy(nn.Module):
    """An FPN in small: frozen BN, fixed-factor and size-matched nearest upsampling, an add of the
    two paths, and a head's layout ops (view by size entries, transpose, reshape) before a cat."""

    def __init__(self) -> None:
        from torchvision.ops.misc import FrozenBatchNorm2d

        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 6, 3, padding=1), FrozenBatchNorm2d(6)
        self.down, self.lateral = nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.Conv2d(6, 6, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = torch.relu(self.bn(self.stem(x)))
        c2 = self.down(c1)
        top = self.lateral(c1) + torch.nn.functional.interpolate(c2, size=c1.shape[-2:], mode="nearest")
        fine = self.head(top + self.up(c2) + torch.nn.functional.interpolate(c2, scale_factor=2.0, mode="nearest"))
        n = fine.size(0)
        a = fine.view(n, 3, 2, fine.shape[2], fine.shape[3]).transpose(1, 3).reshape(n, -1, 2)
        b = self.head(c2).view(n, 3, 2, -1).permute(0, 3, 1, 2).reshape(n, -1, 2)
        return torch.cat([a, b], dim=1)


def test_integer_onnx_upsampling_sizes_and_layout_bit_identical(tmp_path):
    torch.manual_seed(0)
    net = _PyramidToy().eval()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.weight.uniform_(-2, 2)  # negative gains flip signs on the integer grid
    x = torch.randn(8, 1, 8, 12)
    q = quantize_model(net, {n: LayerBits(8, 8) for n in quantizable_layers(net)}, QuantConfig())
    calibrate(q, [x], lambda m, b: m(b), progress=False)
    int_model = to_integer(q.eval(), x[:2])
    kinds = [type(m).__name__ for m in int_model.modules()]
    assert kinds.count("IntUpsampleNearest") == 3 and kinds.count("IntLayout") == 6
    assert "IntChannelAffine" in kinds and "IntRegrid" in kinds
    with torch.no_grad():
        fake, ints = q(x), int_model(x)
    assert float((ints - fake).abs().max()) <= float(fake.abs().max()) / 127  # within one 8-bit output step
    path = export_onnx_integer(int_model, x[:2], tmp_path / "pyramid.onnx", dynamic_sizes=True)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Resize", "Shape", "Reshape", "Transpose"} <= ops
    for inputs in (x, torch.randn(3, 1, 16, 6) * 2):  # another image size: the sizes are read, not fixed
        result = compare_onnx_integer(int_model, path, inputs)
        assert result["exact_fraction"] == 1.0 and result["max_abs_diff"] == 0.0, result


@pytest.mark.parametrize("transform_input", [False, True])
def test_inception_v3_integer_onnx_bit_identical(tmp_path, transform_input):
    """torchvision Inception-V3 as deployed (no aux head, eval), 75x75, 10 classes: to_integer and
    export_onnx_integer convert every op (padded 3x3 average pools, branch concatenations, max
    pools, global pool, dropout, and with ImageNet weights' ``transform_input`` the float64 input
    transform before the input quantization); onnxruntime computes the PyTorch integer model bit for bit."""
    from hawq.models.registry import get_model_spec
    from hawq.quant import InputTransform, integer_layers

    torch.manual_seed(0)
    net = get_model_spec("inception_v3").builder(num_classes=10, aux_logits=False,
                                                 transform_input=transform_input).eval()
    x = torch.rand(4, 3, 75, 75)
    q = quantize_model(net, {n: LayerBits(4 if i % 3 == 1 else 8, 8)
                             for i, n in enumerate(quantizable_layers(net))}, QuantConfig())
    calibrate(q, [x], lambda m, b: m(b), progress=False)
    int_model = to_integer(q.eval(), x[:2])
    assert not int_model.float_nodes
    kinds = [type(m).__name__ for m in int_model.modules()]
    assert kinds.count("IntAvgPool2d") == 9 and kinds.count("IntCat") >= 11
    assert any(isinstance(m, InputTransform) for m in int_model.modules()) == transform_input
    # The input quantization sees what the fake-quant model's first quantizer sees (in float64).
    xt = torch.rand(3, 3, 75, 75) * 1.2 - 0.1
    seen = {}
    first = q.Conv2d_1a_3x3.conv
    hook = first.input_quant.register_forward_pre_hook(lambda m, inp: seen.update(fq=inp[0].detach()))
    copy.deepcopy(q).double()(xt.double())
    hook.remove()
    conv = integer_layers(int_model)["Conv2d_1a_3x3.conv"]
    hook = conv.register_forward_pre_hook(lambda m, inp: seen.update(int=m.input_codes(inp[0])))
    int_model(xt)
    hook.remove()
    act = first.input_quant
    assert torch.equal(seen["int"], torch.round(seen["fq"] / float(act.scale)).clamp(act.qmin, act.qmax).long())
    path = export_onnx_integer(int_model, x[:2], tmp_path / "inception_int.onnx")
    _assert_bit_identical(int_model, path, xt)


def test_integer_onnx_linear_signed_and_unsigned_grids(tmp_path):
    torch.manual_seed(4)
    # "1" requantizes a signed int32 accumulator (negative values: floor, not truncation); "3" is unsigned.
    model = nn.Sequential(nn.Linear(12, 32), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))
    quantize_model(model, {"0": LayerBits(8, 8), "1": LayerBits(4, 4), "3": LayerBits(8, 8)})
    calibrate(model, [torch.randn(64, 12)], lambda m, b: m(b), progress=False)
    x = torch.randn(40, 12)
    path = export_onnx_integer(model.eval(), x[:2], tmp_path / "lin.onnx")  # converts the fake-quant model
    proto = onnx.load(str(path))
    casts = {a.i for n in proto.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert {TensorProto.INT8, TensorProto.UINT8} <= casts  # signed grids, unsigned after ReLU
    result = compare_onnx_integer(to_integer(model, x[:2]), path, x)
    assert result["exact_fraction"] == 1.0, result


def test_integer_onnx_rejects_float_islands(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    quantize_model(model, {"0": LayerBits(8, 8), "2": LayerBits(8, 8)})
    calibrate(model, [torch.randn(16, 6)], lambda m, b: m(b), progress=False)
    int_model = to_integer(model.eval(), float_ops=True)
    with pytest.raises(HawqError, match="float operators"):
        export_onnx_integer(int_model, torch.randn(2, 6), tmp_path / "f.onnx")
    assert not (tmp_path / "f.onnx").exists()


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_linear_rounds_like_fake_quant(signed):
    """The QDQ premise: onnxruntime's QuantizeLinear is hawq's round(x / s) (division, ties to even)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import helper

    from hawq.quant.quantizers import fake_quant_act

    scale = torch.tensor(0.05377, dtype=torch.float32)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    k = torch.arange(qmin - 3, qmax + 3, dtype=torch.float64)
    ties = ((k + 0.5) * float(scale)).float()  # exact .5 multiples in float64, rounded to float32
    x = torch.cat([ties, torch.nextafter(ties, torch.tensor(1e9)), torch.nextafter(ties, torch.tensor(-1e9)),
                   (k * float(scale)).float(), torch.randn(20000) * 60 * float(scale)])
    container = TensorProto.INT8 if signed else TensorProto.UINT8
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [float(scale)]), helper.make_tensor("z", container, [], [0])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"x": x.numpy().astype(np.float32)})[0])
    assert torch.equal(got, fake_quant_act(x, scale, qmin, qmax))
    # (x * (1/s), what a reciprocal-multiplying runtime would compute, differs on some of these inputs)
    assert not torch.equal(got, torch.clamp(torch.round(x * (1 / scale)), qmin, qmax) * scale)
