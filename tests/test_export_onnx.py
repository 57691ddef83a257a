"""hawq.export.export_onnx: QDQ graphs that onnxruntime runs and that agree with the fake-quant model."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

from hawq import HawqError
from hawq.bitmap import LayerBits
from hawq.export.onnx_qdq import compare_onnx, export_onnx
from hawq.layers import quantizable_layers
from hawq.models.fashion import fashion_resnet
from hawq.quant.config import QuantConfig
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
