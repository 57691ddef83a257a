"""hawq.quant.to_fbgemm: a calibrated fake-quant model on PyTorch's int8 fbgemm engine."""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys
from pathlib import Path

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
from hawq.quant.torch_int8 import (
    ConvAdd,
    DuplicateChannels,
    QuantizeInput,
    act_qparams,
    kernel_saturates,
    may_saturate,
    observed_qparams,
    pair_safe_codes,
    to_fbgemm,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PyTorch's quantized-tensor deprecation note
ERR_MAX_STEPS = 4  # logit error bound in classifier-input steps (see test_fbgemm_matches_fake_quant)
needs_fbgemm = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                  reason="PyTorch's fbgemm int8 engine is x86-only; this build has none")
X86_AVX2 = platform.machine().lower() in ("x86_64", "amd64") and \
    torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _run(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A width-8 demo ResNet trained briefly on the fake Fashion-MNIST (so logits have real margins),
    with perturbed BN statistics including negative gains. Trained on one thread: the float
    gradients' summation order, hence the model, then does not depend on the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
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
    torch.set_num_threads(threads)
    return model.eval(), train_x, test_x


def _quantized(model: nn.Module, calib: torch.Tensor, bits: dict[str, LayerBits], fold: bool) -> nn.Module:
    q = quantize_model(copy.deepcopy(model), bits, QuantConfig(fold_bn=fold))
    calibrate(q, calib[:128].split(64), _run, progress=False)
    return q


def _bits(model: nn.Module, weight_bits: int) -> dict[str, LayerBits]:
    return uniform_bitmap(quantizable_layers(model), weight_bits, 8)


@needs_fbgemm
@pytest.mark.parametrize(("weight_bits", "fold", "engine"),
                         [(8, True, "fbgemm"), (4, True, "fbgemm"), (8, False, "fbgemm"),
                          pytest.param(8, True, "onednn", marks=pytest.mark.skipif(
                              "onednn" not in torch.backends.quantized.supported_engines,
                              reason="this PyTorch build has no onednn int8 engine"))])
def test_fbgemm_matches_fake_quant(trained, weight_bits: int, fold: bool, engine: str) -> None:
    model, train_x, test_x = trained
    fq = _quantized(model, train_x, _bits(model, weight_bits), fold)
    fast = to_fbgemm(fq, train_x[:128], engine=engine)
    fused = [m for m in fast.modules() if isinstance(m, ConvAdd)]
    assert len(fused) == (3 if engine == "onednn" else 0)  # one conv + residual add per block
    with torch.no_grad():
        ref, out = fq(test_x), fast(test_x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # Tolerance from what the kernels guarantee, not from this model's margins. Integer sums are
    # exact (kernels that saturate int16 pair sums are avoided, see test_saturating_kernels_*); each
    # requantization rounds within one code of the fake-quant rounding of the same value (float32
    # multiplier), and a residual add's operands are rounded once more (module doc). One code on
    # every classifier input moves a logit by at most ``step`` = s_in * max_j ||w_j||_1.
    # Measured (docs/quant.md): max 1.33 steps and mean <= 0.18 step over 12 trained models x these
    # four configurations, identical under forced AVX2 / AVX-512 / VNNI kernels; a saturating kernel
    # gave 6.6-36 steps.
    fc = fq.fc
    step = float(fc.input_quant.scale) * float(fc.quantized_weight().abs().sum(1).max())
    err = (out - ref).abs()
    assert float(err.mean()) < 0.5 * step and float(err.max()) < ERR_MAX_STEPS * step, (float(err.max()), step)
    # Top-1 agreement is a property of the model's margins, not of the kernels: this briefly trained
    # model has ~13% of test samples within one step of a tie, and agreement ranged 0.961-1.0 for
    # W4 over the 12 models (0.988 on one CPU in issue #17 failed a fixed 0.99). What the bound
    # guarantees: every sample whose fake-quant top-2 margin exceeds 2 * ERR_MAX_STEPS steps agrees.
    top2 = ref.topk(2, dim=1).values
    confident = (top2[:, 0] - top2[:, 1]) > 2 * ERR_MAX_STEPS * step
    same = out.argmax(1) == ref.argmax(1)
    assert bool(same[confident].all()), float(same.float().mean())


def _unsplit(weight: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Packed int8 codes back to hawq's codes (a layer split by pair_safe_codes packs [w_hi, w_lo])."""
    packed = weight.int_repr()
    if packed.shape[1] == codes.shape[1]:
        return packed
    half = packed.shape[1] // 2
    return (packed[:, :half].short() + packed[:, half:].short()).to(torch.int8)


@needs_fbgemm
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
        assert torch.equal(_unsplit(w, codes), codes), name
        assert torch.allclose(w.q_per_channel_scales().float(), scale.float(), rtol=1e-6), name
        if layer.weight_bits == 4:
            assert int(codes.abs().max()) <= 7
        seen += 1
    assert seen == len(bits)
    assert isinstance(dict(fast.named_modules())["fc"], nnq.Linear)


@needs_fbgemm
def test_layer_output_codes_match_fake_quant_rounding() -> None:
    """conv + ReLU written at the next layer's grid: fbgemm's float requant multiplier gives the
    fake-quant codes except where a value sits on a rounding boundary (at most one code)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    diff = _w8_codes(model, torch.randn(8, 3, 12, 12)).abs()
    assert float(diff.max()) <= 1 and float((diff == 0).float().mean()) >= 0.999


@needs_fbgemm
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


@needs_fbgemm
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


def test_pair_safe_codes_split_exactly() -> None:
    codes = torch.arange(-127, 128, dtype=torch.int8).reshape(5, 51)
    split = pair_safe_codes(codes)
    assert split.shape == (5, 102) and int(split.abs().max()) <= 64
    assert torch.equal(split[:, :51].short() + split[:, 51:].short(), codes.short())
    assert 2 * 255 * 64 <= 32767 < 2 * 255 * 65  # 7-bit halves cannot saturate a u8 pair sum
    assert may_saturate(255, codes) and not may_saturate(255, codes.clamp(-64, 64))
    assert not may_saturate(15, codes) and not may_saturate(255, torch.tensor([7, -7]))  # 4-bit
    x = torch.quantize_per_tensor(torch.arange(2 * 6 * 2.0).reshape(2, 6, 2), 1.0, 0, torch.quint8)
    dup = DuplicateChannels(groups=3)(x).dequantize()  # [x_g, x_g] per group of 2 channels
    assert torch.equal(dup[:, 0:2], x.dequantize()[:, 0:2]) and torch.equal(dup[:, 2:4], x.dequantize()[:, 0:2])
    assert torch.equal(dup[:, 4:6], x.dequantize()[:, 2:4])


def _w8_codes(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output codes of a W8A8 conv written at the next layer's grid, fbgemm vs fake-quant rounding."""
    fq = quantize_model(model, uniform_bitmap(["0", "2"], 8, 8))
    calibrate(fq, [x], _run, progress=False)
    fast = to_fbgemm(fq, x)
    scale, zp, lo, hi = act_qparams(fq[2].input_quant)
    assert zp == 0 and (lo, hi) == (0, 255)  # after ReLU: unsigned grid
    with torch.no_grad():
        want = torch.clamp(torch.round(fq[1](fq[0](x)) / scale), lo, hi)
        quant = next(m for m in fast.modules() if isinstance(m, QuantizeInput))
        dup = dict(fast.named_modules()).get("dup_0", nn.Identity())  # present where the layer was split
        got = fast.get_submodule("0")(dup(quant(x))).int_repr().float()
    return got - want


@needs_fbgemm
def test_saturating_kernels_depthwise_is_exact() -> None:
    """fbgemm's depthwise kernel adds u8 x s8 tap pairs in int16 on every ISA (VNNI included): 8-bit
    weights on 8-bit codes saturate unless the layer is split; then every code is within one."""
    torch.manual_seed(0)
    assert kernel_saturates("fbgemm", ("conv", 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 16))
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(4)  # large weights and inputs: many pairs beyond int16
    diff = _w8_codes(model, torch.randn(4, 16, 10, 10) * 3).abs()
    assert float(diff.max()) <= 1 and float((diff == 0).float().mean()) >= 0.99


_ISA_SCRIPT = """
import sys, warnings, torch
warnings.filterwarnings("ignore")
from hawq.bitmap import uniform_bitmap
from hawq.layers import quantizable_layers
from hawq.models.fashion import fashion_resnet
from hawq.quant import QuantConfig, calibrate, quantize_model
from hawq.quant.torch_int8 import DuplicateChannels, to_fbgemm
torch.manual_seed(0)
model = fashion_resnet(width=8).eval()
x = torch.randn(32, 1, 28, 28)
fq = quantize_model(model, uniform_bitmap(quantizable_layers(model), 8, 8), QuantConfig(fold_bn=True))
calibrate(fq, [x], lambda m, b: m(b), progress=False)
out = {}
for engine in sys.argv[2:]:
    fast = to_fbgemm(fq, x, engine=engine, float_head=False)
    with torch.no_grad():
        out[engine] = (fast(x), sum(isinstance(m, DuplicateChannels) for m in fast.modules()))
torch.save(out, sys.argv[1])
"""

_NON_VNNI = {"ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@needs_fbgemm
@pytest.mark.skipif(not X86_AVX2, reason="forces x86 AVX2 kernels: needs an x86 CPU with AVX2 or better")
def test_saturating_kernels_forced_avx2_match_default(tmp_path: Path) -> None:
    """The same W8A8 ResNet on forced non-VNNI AVX2 kernels (fbgemm, oneDNN, ATen) and on this CPU's
    default kernels gives bit-identical int8 outputs: the saturating layers were found and split."""
    engines = [e for e in ("fbgemm", "onednn") if e in torch.backends.quantized.supported_engines]
    runs = {}
    for name, extra in (("default", {}), ("avx2", _NON_VNNI)):
        env = {k: v for k, v in os.environ.items() if k not in _NON_VNNI}
        env.update(extra, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH", "")]))
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path), *engines], env=env, check=True,
                       timeout=300)
        runs[name] = torch.load(path, weights_only=False)
    for engine in engines:
        (ref, _), (out, split) = runs["default"][engine], runs["avx2"][engine]
        assert split > 0, engine  # AVX2 u8 x s8 kernels saturate 8-bit pairs: some layers were split
        # The same int8 logit codes: dequantizing them differs in the last float bit between ATen's
        # AVX2 and AVX-512 kernels (fused multiply-add or not), far below one code (~1e-3 here).
        assert float((out - ref).abs().max()) <= 1e-6, (engine, float((out - ref).abs().max()))
