"""hawq.quant.to_fbgemm: a calibrated fake-quant model on PyTorch's int8 fbgemm engine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from hawq import HawqError
from hawq.bitmap import LayerBits, uniform_bitmap
from hawq.data.fashion_mnist import load_fashion_mnist, make_fake_fashion_mnist
from hawq.layers import quantizable_layers
from hawq.models.fashion import fashion_resnet
from hawq.quant import QuantConfig, calibrate, quantize_model
from hawq.quant.fast import ConvAdd, QuantizeInput, act_qparams, observed_qparams, to_fbgemm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PyTorch's quantized-tensor deprecation note


def _run(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A width-8 demo ResNet trained briefly on the fake Fashion-MNIST (so logits have real margins),
    with perturbed BN statistics including negative gains."""
    torch.manual_seed(0)
    root = make_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=512, n_test=256)
    train_x, train_y = load_fashion_mnist(root, "train").tensors
    test_x, _ = load_fashion_mnist(root, "test").tensors
    model = fashion_resnet(width=8)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 2 - 0.5)  # some negative gains
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with torch.set_grad_enabled(True):
        for _step in range(40):
            idx = torch.randint(0, len(train_x), (64,), generator=g)
            loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), train_x, test_x


def _quantized(model: nn.Module, calib: torch.Tensor, bits: dict[str, LayerBits], fold: bool) -> nn.Module:
    q = quantize_model(copy.deepcopy(model), bits, QuantConfig(fold_bn=fold))
    calibrate(q, calib[:128].split(64), _run, progress=False)
    return q


def _bits(model: nn.Module, weight_bits: int) -> dict[str, LayerBits]:
    return uniform_bitmap(quantizable_layers(model), weight_bits, 8)


@pytest.mark.parametrize(("weight_bits", "fold", "engine"),
                         [(8, True, "fbgemm"), (4, True, "fbgemm"), (8, False, "fbgemm"),
                          pytest.param(8, True, "onednn", marks=pytest.mark.skipif(
                              "onednn" not in torch.backends.quantized.supported_engines, reason="no onednn"))])
def test_fbgemm_matches_fake_quant(trained, weight_bits: int, fold: bool, engine: str) -> None:
    model, train_x, test_x = trained
    fq = _quantized(model, train_x, _bits(model, weight_bits), fold)
    fast = to_fbgemm(fq, train_x[:128], engine=engine)
    fused = [m for m in fast.modules() if isinstance(m, ConvAdd)]
    assert len(fused) == (3 if engine == "onednn" else 0)  # one conv + residual add per block
    with torch.no_grad():
        ref, out = fq(test_x), fast(test_x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
    assert agree >= 0.99, agree
    # The logits stay within a few steps of the classifier's input grid (its scale times the
    # L1 norm of a weight row bounds one input code's effect on a logit).
    fc = fq.fc
    step = float(fc.input_quant.scale) * float(fc.quantized_weight().abs().sum(1).max())
    err = (out - ref).abs()
    assert float(err.mean()) < 0.5 * step and float(err.max()) < 4 * step, (float(err.max()), step)


def test_weights_are_hawqs_codes_including_int4(trained) -> None:
    model, train_x, _ = trained
    bits = {n: LayerBits(4 if i % 2 else 8, 8) for i, n in enumerate(quantizable_layers(model))}
    fq = _quantized(model, train_x, bits, fold=True)
    fast = to_fbgemm(fq, train_x[:64], float_head=False)
    seen = 0
    for name, layer in fq.named_modules():
        if not hasattr(layer, "int_weight"):
            continue
        codes, scale = layer.int_weight()
        packed = dict(fast.named_modules())[name.replace(".", "_")]
        w = packed.weight()
        assert torch.equal(w.int_repr(), codes), name
        assert torch.allclose(w.q_per_channel_scales().float(), scale.float(), rtol=1e-6), name
        if layer.weight_bits == 4:
            assert int(codes.abs().max()) <= 7
        seen += 1
    assert seen == len(bits)
    assert isinstance(dict(fast.named_modules())["fc"], nnq.Linear)


def test_layer_output_codes_match_fake_quant_rounding() -> None:
    """conv + ReLU written at the next layer's grid: fbgemm's float requant multiplier gives the
    fake-quant codes except where a value sits on a rounding boundary (at most one code)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    fq = quantize_model(model, uniform_bitmap(["0", "2"], 8, 8))
    x = torch.randn(8, 3, 12, 12)
    calibrate(fq, [x], _run, progress=False)
    fast = to_fbgemm(fq, x)
    act = fq[2].input_quant
    scale, zp, lo, hi = act_qparams(act)
    assert zp == 0 and (lo, hi) == (0, 255)  # after ReLU: unsigned grid
    with torch.no_grad():
        want = torch.clamp(torch.round(fq[1](fq[0](x)) / scale), lo, hi)
        quant = next(m for m in fast.modules() if isinstance(m, QuantizeInput))
        got = fast.get_submodule("0")(quant(x)).int_repr().float()
    diff = (got - want).abs()
    assert float(diff.max()) <= 1 and float((diff == 0).float().mean()) >= 0.999


def test_signed_input_grid_uses_zero_point_128() -> None:
    q = fashion_resnet(width=4).eval()
    fq = quantize_model(q, uniform_bitmap(quantizable_layers(q), 8, 8))
    x = torch.randn(4, 1, 28, 28)
    calibrate(fq, [x], _run, progress=False)
    fast = to_fbgemm(fq, x)
    quant = next(m for m in fast.modules() if isinstance(m, QuantizeInput))
    assert quant.zero_point == 128 and quant.scale == pytest.approx(float(fq.conv1.input_quant.scale))
    codes = quant(x * 100).int_repr()
    assert int(codes.min()) == 1 and int(codes.max()) == 255  # hawq's [-127, 127], never code -128
    assert observed_qparams(-1.0, 3.0) == (pytest.approx(4 / 255), 64)


class _Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sigmoid(self.a(x)))


def test_errors_name_the_problem() -> None:
    x = torch.randn(16, 8)
    fq = quantize_model(_Sigmoid(), uniform_bitmap(["a", "b"], 8, 8))
    with pytest.raises(HawqError, match="not calibrated"):
        to_fbgemm(fq, x)
    calibrate(fq, [x], _run, progress=False)
    with pytest.raises(HawqError, match="sigmoid"):
        to_fbgemm(fq, x)
    with pytest.raises(HawqError, match="engine"):
        to_fbgemm(fq, x, engine="tpu")
    half = quantize_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), {"0": LayerBits(8, 8)})
    calibrate(half, [x], _run, progress=False)
    with pytest.raises(HawqError, match="'2' is float"):
        to_fbgemm(half, x)
    wide = quantize_model(_Sigmoid(), uniform_bitmap(["a", "b"], 16, 8))
    calibrate(wide, [x], _run, progress=False)
    with pytest.raises(HawqError, match="16-bit weights"):
        to_fbgemm(wide, x)
