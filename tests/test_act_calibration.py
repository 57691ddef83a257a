"""MSE-optimal activation ranges (``quant.act_calibration: mse``) and activation-only pins."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from hawq import HawqError
from hawq.bitmap import LayerBits, uniform_bitmap
from hawq.config import load_config
from hawq.layers import quantizable_layers
from hawq.quant import QuantAct, QuantConfig, calibrate, quantize_model, set_integer_backend, to_integer
from hawq.quant.observers import ACT_CALIBRATIONS, MSE_BATCH_SAMPLE, grid_mse, mse_extent, strided_sample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _outlier_acts(n: int = 512, d: int = 96, seed: int = 0) -> torch.Tensor:
    """Gaussian activations with one channel 8x larger (as BERT's LayerNorm outputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 5] *= 8.0
    return x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_mse_extent_never_worse_than_minmax(bits: int, signed: bool) -> None:
    x = _outlier_acts()
    if not signed:
        x = torch.relu(x)
    amax = float(x.abs().max())
    e = float(mse_extent(x, bits, signed))
    assert 0 < e <= amax
    assert grid_mse(x, e, bits, signed) <= grid_mse(x, amax, bits, signed)
    # Heavy tail: the search clips, and that pays, most at few bits.
    gain = grid_mse(x, amax, bits, signed) / grid_mse(x, e, bits, signed)
    assert e < amax and gain > (1.5 if bits == 4 else 1.0), gain
    # Without a tail (uniform values) the extent stays within one grid step of the maximum.
    u = torch.rand(4096, generator=torch.Generator().manual_seed(1)) * (2 if signed else 1) - (1 if signed else 0)
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    assert float(mse_extent(u, bits, signed)) >= (1 - 1 / qmax) * float(u.abs().max())
    assert float(mse_extent(torch.zeros(7), bits, signed)) == 0.0


def test_sample_covers_every_channel() -> None:
    # 100 x 1536 elements: the plain stride numel // 2^15 + 1 = 5 ... any stride sharing a factor with
    # 1536 (2 or 3) would see a third of the channels at most; the outlier channel 1 must be seen.
    for rows in (40, 100, 130):
        x = torch.zeros(rows, 1536)
        x[:, 1] = 9.0
        s = strided_sample(x)
        assert s.numel() <= MSE_BATCH_SAMPLE + 1 and float(s.max()) == 9.0, rows


def _linear(d: int) -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(d, 32)


def _calibrated_linear(method: str, x: torch.Tensor) -> nn.Module:
    q = quantize_model(nn.Sequential(_linear(x.shape[1])), {"0": LayerBits(32, 8)}, QuantConfig(act_calibration=method))
    calibrate(q, x.split(128), lambda m, b: m(b), progress=False)
    return q


def test_mse_calibration_lowers_layer_output_error() -> None:
    x = _outlier_acts()
    with torch.no_grad():
        want = _linear(x.shape[1])(x)
        err = {m: float((_calibrated_linear(m, x)(x) - want).pow(2).mean()) for m in ("minmax", "mse")}
    # Same calibration data, same float weights: only the input range differs (measured 1.9x lower).
    assert err["mse"] < 0.8 * err["minmax"], err
    acts = [m for m in _calibrated_linear("mse", x).modules() if isinstance(m, QuantAct)]
    assert len(acts) == 1 and acts[0].method == "mse" and float(acts[0].range_val) < float(x.abs().max())


def test_mse_ranges_pool_the_batches_and_reset() -> None:
    x = _outlier_acts(n=1024)
    act = QuantAct(8, cfg=QuantConfig(act_calibration="mse"))
    act.set_mode("calibrating")
    for b in x.split(256):
        act(b)
    act.set_mode("frozen")
    pooled = float(act.range_val)
    assert pooled == pytest.approx(float(mse_extent(x, 8, True, amax=x.abs().max())), rel=0.03)
    assert float(act.scale) == pytest.approx(pooled / 127)
    act.reset()
    assert act._mse_samples == [] and not act.calibrated


def test_mse_grids_run_integer_only_bit_for_bit(monkeypatch) -> None:
    """A BERT layer with MSE ranges and 12-bit FFN inputs: the integer model computes the fake-quant values."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    from hawq.quant.ibert import TraceableBertLayer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, attn_implementation="eager")
    layer = TraceableBertLayer(BertLayer(cfg).eval()).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 10, 32, generator=g)
    x[..., 3] *= 6.0  # an outlier channel
    bits = uniform_bitmap(quantizable_layers(layer), 4, 8)
    for name in bits:
        if name.endswith(("intermediate.dense", "output.dense")) and "attention" not in name:
            bits[name] = LayerBits(4, 12)
    q = quantize_model(copy.deepcopy(layer), bits, QuantConfig(act_calibration="mse", transformer="ibert"))
    calibrate(q, [(x[:8],)], lambda m, b: m(*b), progress=False)
    wide = [m for n, m in q.named_modules() if isinstance(m, QuantAct) and m.bits == 12]
    assert len(wide) == 2 and all(m.method == "mse" for m in wide)
    int_model = to_integer(q, example_input=(x[:8],))
    assert not getattr(int_model, "float_nodes", [])
    with torch.no_grad():
        out = int_model(x[8:]).double()
        ref = copy.deepcopy(q).double()(x[8:].double())
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max(), float((out - ref).abs().max() / ref.abs().max())
    # 12-bit input codes: the reference engine only (MatMulInteger takes 8-bit inputs), said in one line.
    assert set_integer_backend(copy.deepcopy(int_model), "int_mm")(x[8:]).double().equal(out)


def test_wide_inputs_integer_reference_only(tmp_path) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    x = _outlier_acts(n=64, d=16)
    q = quantize_model(mlp, {"0": LayerBits(4, 8), "2": LayerBits(8, 12)}, QuantConfig(act_calibration="mse"))
    calibrate(q, x.split(32), lambda m, b: m(b), progress=False)
    int_model = to_integer(q)
    with torch.no_grad():
        ref = copy.deepcopy(q).double()(x.double())
    assert (int_model(x).double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    pytest.importorskip("onnx")
    from hawq.export import export_onnx_integer

    with pytest.raises(HawqError, match="layer '2' has input codes wider than 8 bits"):
        export_onnx_integer(q, x[:2], tmp_path / "m.onnx")


def test_config_names_the_method() -> None:
    assert ACT_CALIBRATIONS == ("minmax", "ema", "percentile", "mse")
    assert QuantConfig().act_calibration == "minmax"  # the default is unchanged
    assert load_config(None, ["quant.act_calibration=mse"]).quant.act_calibration == "mse"
    with pytest.raises(HawqError, match="quant.act_calibration.*did you mean 'mse'"):
        load_config(None, ["quant.act_calibration=mes"])
    with pytest.raises(HawqError, match="act_calibration must be 'minmax', 'ema', 'percentile' or 'mse'"):
        QuantAct(8, cfg=QuantConfig(act_calibration="max"))  # type: ignore[arg-type]


def test_activation_only_pin_keeps_the_uniform_weight() -> None:
    from hawq.search.stage import _uniform

    cfg = load_config(REPO / "configs" / "minilm_sentence_ffn12.yaml")
    pinned = [n for n, p in cfg.search.pins.items() if p == {"activation": 12}]
    assert len(pinned) == 12
    layers = ["a", *pinned]
    run = types.SimpleNamespace(cfg=cfg, layers=layers, spec=types.SimpleNamespace(default_pins={"a": {"weight": 8}}))
    hawq_map = {n: LayerBits(3, 12) for n in layers}
    uniform = _uniform(run, hawq_map, 4)
    assert uniform["a"] == LayerBits(8, 8)  # a weight pin: that weight, the searched activation width
    assert all(uniform[n] == LayerBits(4, 12) for n in pinned)  # not the HAWQ map's 3-bit weight


def test_results_gptq_counts_activation_widths_in_bops() -> None:
    from conftest import load_script

    script = load_script("results_gptq")
    assert (REPO / script.MODELS["minilm_ffn12"][0]).is_file()
    assert script.VARIANTS["gptq_mse"] == {"rounding": "gptq", "act_calibration": "mse"}
    data = {"cells": {"minilm_ffn12/hawq/gptq": {"metric": "cosine_mean", "value": 0.98, "cpu_s_quantize": 29.3}},
            "fp32": {"minilm_ffn12": {"cosine_mean": 1.0}}, "sizes_mb": {"minilm_ffn12/hawq": 12.198},
            "bops_g": {"minilm_ffn12/hawq": 1.234}}
    row = script.markdown_table(data).splitlines()[2]
    assert row == "| minilm_ffn12 | hawq | 12.198 | 1.234 | gptq | cosine_mean | 0.9800 | -0.0200 | 29.3 |"
