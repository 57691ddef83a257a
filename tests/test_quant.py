"""hawq.quant: quantizer math, quantized modules, model swap and calibration."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hawq import HawqError
from hawq.bitmap import LayerBits, uniform_bitmap
from hawq.layers import quantizable_layers
from hawq.models.fashion import fashion_resnet
from hawq.quant import (
    FoldedBatchNorm2d,
    QuantAct,
    QuantBnConv2d,
    QuantConfig,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    calibrate,
    expand_scale,
    fake_quant_weight_ste,
    fold_bn,
    quantize_,
    quantize_model,
    quantize_to_int,
    quantize_weight,
    set_act_calibration,
    weight_scale,
)


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _demo(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = fashion_resnet(width=8).eval()
    _randomize_bn(m, seed)
    return m


def _images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _run(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


# --- quantizers --------------------------------------------------------------------------------
@pytest.mark.parametrize("per_channel,group_size", [(True, None), (False, None), (True, 5)])
def test_round_trip_error_bounded_by_half_step(per_channel: bool, group_size: int | None) -> None:
    w = torch.randn(6, 4, 3, 7, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4, 6, 8, 16):
        step = expand_scale(weight_scale(w, bits, per_channel, group_size), w.shape, group_size)
        err = (quantize_weight(w, bits, per_channel, group_size) - w).abs()
        # plus a few float32 ulps of |w|: at 16 bits the step nears float32 resolution
        assert (err <= step / 2 + 4 * torch.finfo(torch.float32).eps * w.abs()).all(), bits
        codes, scale = quantize_to_int(w, bits, per_channel, group_size)
        assert codes.abs().max() <= 2 ** (bits - 1) - 1
        assert torch.allclose(codes.float() * expand_scale(scale, w.shape, group_size),
                              quantize_weight(w, bits, per_channel, group_size))


def test_mse_falls_with_bits_and_float_is_identity() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    mse = [(quantize_weight(w, b) - w).pow(2).mean().item() for b in (2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(mse, mse[1:]))
    assert mse[-1] < 1e-4 * w.pow(2).mean().item()
    assert quantize_weight(w, 32) is w


def test_scale_shapes_and_codes() -> None:
    w = torch.randn(5, 10)
    assert weight_scale(w, 4).shape == (5,)
    assert weight_scale(w, 4, per_channel=False).shape == ()
    assert weight_scale(w, 4, group_size=4).shape == (5, 3)  # ragged last group of 2
    codes, _ = quantize_to_int(w, 4)
    assert codes.dtype == torch.int8 and codes.abs().max() == 7  # max|w| of each row maps to 7
    assert quantize_to_int(w, 12)[0].dtype == torch.int16
    assert (quantize_weight(torch.zeros(3, 3), 4) == 0).all()  # zero rows: no NaN


def test_bad_bits_raise() -> None:
    with pytest.raises(HawqError):
        quantize_weight(torch.randn(3, 3), 1)
    with pytest.raises(HawqError):
        quantize_weight(torch.randn(3, 3), 4, group_size=0)
    with pytest.raises(HawqError):
        quantize_to_int(torch.randn(3, 3), 32)


def test_ste_passes_gradient() -> None:
    w = torch.randn(4, 6, requires_grad=True)
    g = torch.randn(4, 6)
    (fake_quant_weight_ste(w, 3) * g).sum().backward()
    assert torch.equal(w.grad, g)


# --- QuantAct -----------------------------------------------------------------------------------
def test_quant_act_signedness_and_clipped_ste() -> None:
    act = QuantAct(8)
    act.set_mode("calibrating")
    act(torch.rand(100) * 4)  # non-negative: unsigned grid 0..255
    act.set_mode("frozen")
    assert not bool(act.signed) and act.qmax == 255 and abs(float(act.scale) - 4 / 255) < 0.01
    x = torch.tensor([-1.0, 1.0, 2.0, 10.0], requires_grad=True)
    y = act(x)
    assert y[0] == 0 and abs(float(y[3].detach()) - float(act.scale) * 255) < 1e-6
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]  # no gradient where the grid clips
    signed = QuantAct(4)
    signed.set_mode("calibrating")
    signed(torch.linspace(-3, 2, 11))
    assert bool(signed.signed) and signed.qmin == -7 and abs(float(signed.scale) - 3 / 7) < 1e-6


def test_quant_act_uncalibrated_raises_and_methods() -> None:
    with pytest.raises(HawqError, match="calibrat"):
        QuantAct(8)(torch.randn(3))
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    x[0] = 100.0  # an outlier that min/max keeps and the percentile clips
    scales = {}
    for method in ("minmax", "ema", "percentile"):
        act = QuantAct(8, cfg=QuantConfig(act_calibration=method, act_percentile=99.9))
        act.set_mode("calibrating")
        act(x)
        act(x * 0.5)
        scales[method] = float(act.scale)
    assert scales["minmax"] == pytest.approx(100 / 127)
    assert scales["minmax"] > scales["ema"] > 0.5 * 100 / 127 * 0.99
    assert scales["percentile"] < 0.1 * scales["minmax"]


# --- model swap ---------------------------------------------------------------------------------
def test_swap_preserves_names_keys_and_parameters() -> None:
    model = _demo()
    names = quantizable_layers(model)
    keys = set(model.state_dict())
    weight = model.conv1.weight
    out = quantize_model(model, uniform_bitmap(names, 4, 8))
    assert out is model
    assert quantizable_layers(model) == names
    for n in names:
        m = model.get_submodule(n)
        assert isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_bits == 4 and m.act_bits == 8
        assert isinstance(m.input_quant, QuantAct)
    assert model.conv1.weight is weight  # shared Parameter: an existing optimizer keeps working
    new_keys = set(model.state_dict())
    assert keys <= new_keys and all(".input_quant." in k for k in new_keys - keys)
    assert isinstance(model.fc, nn.Linear)


def test_swap_at_32_bits_is_exact_and_8_bits_close() -> None:
    model, x = _demo(), _images()
    ref = model(x)
    names = quantizable_layers(model)
    at32 = quantize_model(copy.deepcopy(model), uniform_bitmap(names, 32, 32))
    assert not any(isinstance(m, QuantConv2d) for m in at32.modules())
    assert torch.equal(at32(x), ref)
    at8 = quantize_model(copy.deepcopy(model), uniform_bitmap(names, 8, 8))
    calibrate(at8, [x], _run, progress=False)
    err = (at8(x) - ref).abs().max().item()
    # 8-bit weights and activations: well under 2% of the logit range on this tiny net.
    assert err < 0.02 * ref.abs().max().item(), err
    at4 = quantize_model(copy.deepcopy(model), uniform_bitmap(names, 4, 4))
    calibrate(at4, [x], _run, progress=False)
    assert (at4(x) - ref).abs().max().item() > err  # coarser grid, larger error


def test_weight_only_quantization_and_gradients_flow() -> None:
    model, x = _demo(), _images()
    quantize_model(model, {"layer1.0.conv1": LayerBits(4, 32), "fc": LayerBits(8, 8)})
    assert model.get_submodule("layer1.0.conv1").input_quant is None
    calibrate(model, [x], _run, progress=False)
    model.train()
    model(x).pow(2).sum().backward()
    for n in ("layer1.0.conv1", "fc", "conv1"):
        assert model.get_submodule(n).weight.grad.abs().sum() > 0


def test_embedding_and_group_linear() -> None:
    emb = QuantEmbedding.from_float(nn.Embedding(20, 16), 4, cfg=QuantConfig(group_size=8))
    idx = torch.arange(20)
    assert torch.allclose(emb(idx), quantize_weight(emb.weight, 4, group_size=8))
    assert emb.weight_scale().shape == (20, 2)
    lin = QuantLinear.from_float(nn.Linear(16, 3), 8, 32, QuantConfig(group_size=4))
    codes, scale = lin.int_weight()
    assert codes.shape == (3, 16) and scale.shape == (3, 4)


def test_bad_bitmaps_raise() -> None:
    model = _demo()
    with pytest.raises(HawqError, match="no layer"):
        quantize_model(model, {"nope": LayerBits(4, 8)})
    with pytest.raises(HawqError, match="BatchNorm2d"):
        quantize_model(model, {"bn1": LayerBits(4, 8)})
    quantize_(model, {"fc": LayerBits(4, 8)})
    with pytest.raises(HawqError, match="already"):
        quantize_model(model, {"fc": LayerBits(4, 8)})
    with pytest.raises(HawqError, match="no batches"):
        calibrate(model, [], _run, progress=False)


# --- BatchNorm folding ----------------------------------------------------------------------------
def test_bn_folding_matches_unfolded_and_export_fold() -> None:
    model, x = _demo(), _images()
    names = quantizable_layers(model)
    keys = set(quantize_model(copy.deepcopy(model), uniform_bitmap(names, 8, 8)).state_dict())
    folded = quantize_model(copy.deepcopy(model), uniform_bitmap(names, 8, 8), QuantConfig(fold_bn=True))
    assert isinstance(folded.conv1, QuantBnConv2d) and isinstance(folded.bn1, FoldedBatchNorm2d)
    assert isinstance(folded.layer2[0].downsample[0], QuantBnConv2d)
    assert set(folded.state_dict()) == keys  # BN parameters keep their names
    calibrate(folded, [x], _run, progress=False)
    ref = model(x)
    before = folded(x)
    assert (before - ref).abs().max() < 0.02 * ref.abs().max()
    fold_bn(folded)
    assert isinstance(folded.bn1, nn.Identity) and type(folded.conv1) is QuantConv2d
    assert torch.allclose(folded(x), before, atol=1e-5)
    float_model = fold_bn(copy.deepcopy(model))
    assert torch.allclose(float_model(x), ref, atol=1e-5)
    unfolded = quantize_model(copy.deepcopy(model), uniform_bitmap(names, 8, 8))
    calibrate(unfolded, [x], _run, progress=False)
    out = unfolded(x)
    fold_bn(unfolded)  # QuantConv2d + BN: left alone, the codes quantize the unfolded weight
    assert isinstance(unfolded.bn1, nn.BatchNorm2d) and torch.equal(unfolded(x), out)


def test_bn_conv_training_updates_running_stats() -> None:
    model, x = _demo(), _images()
    quantize_model(model, uniform_bitmap(["conv1"], 8, 8), QuantConfig(fold_bn=True))
    calibrate(model, [x], _run, progress=False)
    before = model.bn1.running_mean.clone()
    model.train()
    model(x).sum().backward()
    assert not torch.equal(model.bn1.running_mean, before)
    assert model.conv1.weight.grad is not None and model.bn1.weight.grad is not None


def test_range_tracking_in_training_until_frozen() -> None:
    model, x = _demo(), _images()
    quantize_model(model, uniform_bitmap(quantizable_layers(model), 8, 8))
    calibrate(model, [x], _run, progress=False)
    act = model.conv1.input_quant
    assert act.mode == "frozen"  # the default: fixed ranges
    calibrate(model, [x], _run, progress=False, track_in_training=True)
    assert act.mode == "tracking"
    s0 = float(act.scale)
    model(3 * x)  # eval: ranges never move
    assert float(act.scale) == s0
    model.train()
    model(3 * x)  # training: EMA towards the wider batch range (HAWQ-V3 QAT)
    s1 = float(act.scale)
    assert s0 < s1 < 3 * s0
    set_act_calibration(model, False)
    assert act.mode == "frozen"
    model(3 * x)
    assert float(act.scale) == s1


def test_bn_stats_freeze_and_half_precision_activations() -> None:
    model, x = _demo(), _images()
    quantize_model(model, uniform_bitmap(["conv1"], 8, 8), QuantConfig(fold_bn=True))
    calibrate(model, [x], _run, progress=False)
    model.train()
    model.conv1.freeze_bn_stats = True  # fold the running statistics, leave them untouched
    before = model.bn1.running_mean.clone()
    out_train = model.conv1(x)
    assert torch.equal(model.bn1.running_mean, before)
    model.eval()
    assert torch.allclose(out_train, model.conv1(x))
    act = model.conv1.input_quant
    half = act(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), act(x.to(torch.bfloat16).float()).to(torch.bfloat16).float())
