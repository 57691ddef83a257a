"""Integer-only inference: dyadic arithmetic, conversion of the demo ResNet, reference vs int8 engine."""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import branches_model
from torch import nn

from hawq import HawqError
from hawq.bitmap import LayerBits, uniform_bitmap
from hawq.data.fashion_mnist import load_fashion_mnist, make_fake_fashion_mnist
from hawq.layers import quantizable_layers
from hawq.models.fashion import fashion_resnet
from hawq.quant import (
    Dequantize,
    IntConv2d,
    QuantConfig,
    calibrate,
    dyadic,
    integer_layers,
    quantize_model,
    rescale,
    set_integer_backend,
    to_integer,
)


def _run(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A width-8 demo ResNet with non-trivial BN statistics, and the fake Fashion-MNIST test images.

    (No training: the CPU budget of the suite is small, and the conversion is exact for any weights.)
    """
    root = make_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=8, n_test=64)
    images, labels = load_fashion_mnist(root, "test").tensors
    torch.manual_seed(0)
    model = fashion_resnet(width=8).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 2 - 0.5)  # some negative gains
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model, images, labels


def _quantized(model: nn.Module, images: torch.Tensor, wbits: int, abits: int, fold: bool) -> nn.Module:
    q = quantize_model(copy.deepcopy(model), uniform_bitmap(quantizable_layers(model), wbits, abits),
                       QuantConfig(fold_bn=fold))
    calibrate(q, images[:32].split(16), _run, progress=False)
    return q


# --- dyadic arithmetic ---------------------------------------------------------------------------
def test_dyadic_precision_and_integer_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    ratios = torch.exp(torch.empty(200, dtype=torch.float64).uniform_(-20, 8, generator=g))  # 2e-9 .. 3e3
    m, c = dyadic(ratios)
    assert bool(((m >= 2**30) & (m <= 2**31)).all())
    assert ((m.double() / 2.0**c.double() - ratios).abs() / ratios).max() < 2.0**-30
    v = torch.randint(-(2**30), 2**30, (200,), generator=g)
    exact = torch.floor(v.double() * m.double() / 2.0**c.double() + 0.5)  # round half up
    assert torch.equal(rescale(v, m, c), exact.long())
    assert rescale(torch.tensor([5, -5, 7]), *dyadic(torch.tensor(1.0, dtype=torch.float64))).tolist() == [5, -5, 7]
    assert rescale(torch.tensor([3, -3]), torch.tensor(1), torch.tensor(1)).tolist() == [2, -1]  # ties go up
    m, c = dyadic(torch.tensor([2.0**-40], dtype=torch.float64))  # below 2^-32: shift capped at 62
    assert int(c) == 62 and int(m) == 2**22
    with pytest.raises(HawqError):
        dyadic(torch.tensor([0.0]))


# --- the demo ResNet -----------------------------------------------------------------------------
@pytest.mark.parametrize("fold", [False, True])
def test_integer_resnet_matches_fake_quant(trained, fold: bool) -> None:
    model, images, _ = trained
    q = _quantized(model, images, 8, 8, fold)
    int_model = to_integer(q)
    logits_int = int_model(images)
    # The integer model evaluates the fake-quant graph in exact arithmetic; compare with float64.
    logits_fq64 = copy.deepcopy(q).double()(images.double())
    assert torch.equal(logits_int.argmax(1), logits_fq64.argmax(1))
    # One output quantization step: the fc accumulator step s_in * s_w of each class. A value
    # within ~1e-7 of a rounding boundary inside the net may round the other way (dyadic and
    # fixed-point residuals are not bit-identical to float64), so allow rare images beyond it.
    step = float(q.fc.input_quant.scale) * q.fc.weight_scale().double()
    diff = (logits_int.double() - logits_fq64).abs()
    assert (diff <= step).all(dim=1).float().mean() >= 0.95
    assert diff.max() <= 0.01 * logits_fq64.abs().max()
    # The float32 fake-quant model (float32 rounding of its own) agrees on the classes.
    assert (logits_int.argmax(1) == q(images).argmax(1)).float().mean() >= 0.95


def test_reference_equals_int8_engine_including_int4_and_uint8(trained) -> None:
    model, images, _ = trained
    q = quantize_model(copy.deepcopy(model), {n: LayerBits(4 if i % 2 else 8, 8)
                                              for i, n in enumerate(quantizable_layers(model))})
    calibrate(q, [images[:32]], _run, progress=False)
    int_model = to_integer(q)
    layers = integer_layers(int_model)
    assert {m.unsigned_shift for m in layers.values()} == {0, 128}  # signed input, unsigned after ReLU
    assert all(m.int_mm_ok and m.weight_codes.dtype == torch.int8 for m in layers.values())
    assert int(layers["layer1.0.conv1"].weight_codes.abs().max()) <= 7  # int4 codes widened to int8
    ref = set_integer_backend(int_model, "reference")(images)
    fast = set_integer_backend(int_model, "int_mm")(images)
    assert torch.equal(ref, fast)
    for name, layer in layers.items():  # and layer by layer on the accumulators
        shape = (2, layer.weight_codes.shape[1], 9, 9) if isinstance(layer, IntConv2d) \
            else (5, layer.weight_codes.shape[1])
        codes = torch.randint(layer.qmin, layer.qmax + 1, shape)
        layer.backend = "reference"
        a = layer.accumulate(codes)
        layer.backend = "int_mm"
        assert torch.equal(a, layer.accumulate(codes)), name


_NON_VNNI_SCRIPT = """
import torch
from hawq.bitmap import uniform_bitmap
from hawq.layers import quantizable_layers
from hawq.models.fashion import fashion_resnet
from hawq.quant import calibrate, quantize_model, set_integer_backend, to_integer
from hawq.quant.integer import int_mm_saturates
torch.manual_seed(0)
model = fashion_resnet(width=8).eval()
x = torch.randn(16, 1, 28, 28) * 2
q = quantize_model(model, uniform_bitmap(quantizable_layers(model), 8, 8))
calibrate(q, [x], lambda m, b: m(b), progress=False)
int_model = to_integer(q)
ref = set_integer_backend(int_model, "reference")(x)
fast = set_integer_backend(int_model, "int_mm")(x)
assert int_mm_saturates(), "ONEDNN_MAX_CPU_ISA=AVX2 should select a saturating int8 GEMM"
assert torch.equal(ref, fast), float((ref - fast).abs().max())
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="forces oneDNN's x86 AVX2 kernels: needs an x86 CPU with AVX2 or better")
def test_int_mm_engine_exact_on_non_vnni_int8_gemm() -> None:
    """torch._int_mm on oneDNN without VNNI adds u8 x s8 pairs in a saturating int16; forced to AVX2
    in a subprocess, the int_mm engine still equals the reference engine (W8A8, 8-bit grids)."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", _NON_VNNI_SCRIPT], env=env, check=True, timeout=300)


def test_no_float_between_input_and_output(trained) -> None:
    model, images, _ = trained
    int_model = to_integer(_quantized(model, images, 8, 8, True))
    seen: list[str] = []

    def check(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        seen.append(type(mod).__name__)
        if not isinstance(mod, Dequantize):
            assert not out.is_floating_point(), type(mod).__name__
            assert int(out.abs().max()) < 2**31
        if not getattr(mod, "from_float", False) and not isinstance(mod, Dequantize):
            assert all(not t.is_floating_point() for t in inputs), type(mod).__name__

    for m in int_model.modules():
        if m is not int_model:
            m.register_forward_hook(check)
    int_model(images[:4])
    assert {"IntConv2d", "IntAdd", "IntReLU", "IntLinear", "IntSumPool2d", "Dequantize"} <= set(seen)
    conv = integer_layers(int_model)["layer2.0.conv1"]
    assert conv.bias_int.dtype == torch.int32 and conv.in_mult.dtype == torch.int64


def test_flatten_needs_shapes_and_errors_name_the_node() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(8, 1, 8, 8)
    q = quantize_model(copy.deepcopy(net), uniform_bitmap(["0", "3"], 8, 8))
    calibrate(q, [x], _run, progress=False)
    with pytest.raises(HawqError, match="example_input"):
        to_integer(q)
    out = to_integer(q, example_input=x)(x)
    assert torch.allclose(out.double(), copy.deepcopy(q).double()(x.double()), atol=1e-6)
    partly = quantize_model(copy.deepcopy(net), uniform_bitmap(["0"], 8, 8))
    calibrate(partly, [x], _run, progress=False)
    with pytest.raises(HawqError, match="layer '3' is float"):
        to_integer(partly, example_input=x)
    odd = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid())
    quantize_model(odd, uniform_bitmap(["0"], 8, 8))
    calibrate(odd, [x], _run, progress=False)
    with pytest.raises(HawqError, match="cannot convert module '1' \\(Sigmoid\\)"):
        to_integer(odd)
    raw = quantize_model(copy.deepcopy(net), uniform_bitmap(["0", "3"], 8, 8))
    with pytest.raises(HawqError, match="not calibrated"):
        to_integer(raw, example_input=x)


# --- a BERT-style block: integer Linear layers, float islands for the rest ---------------------
class _Block(nn.Module):
    """Single-head attention + GELU MLP with post-LayerNorm residuals (BERT layer shape)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1) / 4.0, dim=-1)
        x = self.ln1(x + self.drop(self.o(att @ self.v(x))))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.block, self.head = nn.Embedding(50, 16), _Block(), nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.emb(ids)).mean(dim=1))


def test_bert_style_block_with_float_islands() -> None:
    torch.manual_seed(0)
    model = _Encoder().eval()
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(1))
    quantize_model(model, uniform_bitmap(quantizable_layers(model), 8, 8))
    calibrate(model, [ids], _run, progress=False)
    with pytest.raises(HawqError, match="cannot convert module 'emb'.*float_ops=True"):
        to_integer(model)
    int_model = to_integer(model, float_ops=True)
    linears = {"block.q", "block.k", "block.v", "block.o", "block.fc1", "block.fc2", "head"}
    assert set(integer_layers(int_model)) == linears
    assert {"emb", "softmax", "gelu", "block.ln1", "block.ln2"} <= set(int_model.float_nodes)
    out = int_model(ids)
    ref = copy.deepcopy(model).double()(ids)
    # Islands see exactly the dequantized accumulators, so only float rounding separates the two.
    assert (out.double() - ref).abs().max() < 1e-6 * ref.abs().max()
    assert torch.equal(set_integer_backend(int_model, "int_mm")(ids), out)


# --- windowed average pooling and concatenation (Inception-V3's ops) ----------------------------
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize(("kernel", "stride", "padding", "override"),
                         [(3, 1, 1, None), (3, 2, 1, None), ((2, 3), (2, 1), (1, 0), None), (3, 1, 1, 5)])
def test_int_avg_pool_is_the_rounded_exact_quotient(count_include_pad, kernel, stride, padding, override) -> None:
    from hawq.quant import IntAvgPool2d

    pair = nn.modules.utils._pair
    g = torch.Generator().manual_seed(0)
    v = torch.randint(-(2**20), 2**20, (2, 3, 7, 6), generator=g)
    v[0, 0, :3, :3] = 1  # windows whose sum / divisor is a tie (x.5) at some positions
    for frac in (0, 3):
        pool = IntAvgPool2d(pair(kernel), pair(stride), pair(padding), count_include_pad, override, frac)
        got = pool(v)
        # PyTorch's float64 average (exact here: |v| < 2^21) scaled by 2^frac and rounded half up
        ref = F.avg_pool2d(v.double() * 2**frac, kernel, stride, padding, count_include_pad=count_include_pad,
                           divisor_override=override)
        assert got.dtype == torch.int64
        assert torch.equal(got, torch.floor(ref + 0.5).long())


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_integer_avg_pool_and_cat_match_fake_quant(count_include_pad: bool) -> None:
    from hawq.quant import IntCat

    q, x = branches_model(count_include_pad)
    int_model = to_integer(q, x[:2])
    kinds = [type(m).__name__ for m in int_model.modules()]
    assert kinds.count("IntAvgPool2d") == 3 and kinds.count("IntCat") == 1 and "IntMaxPool2d" in kinds
    assert not int_model.float_nodes
    cat = next(m for m in int_model.modules() if isinstance(m, IntCat))
    assert len({int(cat.shift_0.max()), int(cat.shift_1.max())}) > 1  # parts really on different scales
    xt = torch.randn(64, 1, 13, 11) * 1.5
    logits_int = int_model(xt)
    logits_fq64 = copy.deepcopy(q).double()(xt.double())
    # The test of the demo ResNet: one output step (the fc accumulator step), rare ties aside.
    step = float(q.fc.input_quant.scale) * q.fc.weight_scale().double()
    diff = (logits_int.double() - logits_fq64).abs()
    assert (diff <= step).all(dim=1).float().mean() >= 0.95
    assert diff.max() <= 0.01 * logits_fq64.abs().max()
    assert (logits_int.argmax(1) == logits_fq64.argmax(1)).float().mean() >= 0.95


def test_avg_pool_ceil_mode_is_a_one_line_error() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AvgPool2d(3, 2, 1, ceil_mode=True), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 2))
    x = torch.randn(4, 1, 8, 8)
    q = quantize_model(net, uniform_bitmap(["0", "3"], 8, 8))
    calibrate(q, [x], _run, progress=False)
    with pytest.raises(HawqError, match=r"cannot convert module '1' \(AvgPool2d\): integer average pooling needs "
                                        r"ceil_mode=False"):
        to_integer(q, x)
