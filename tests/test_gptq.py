"""GPTQ rounding (hawq.quant.gptq): beats round-to-nearest on its calibration data; every export carries its codes."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from hawq import HawqError
from hawq.bitmap import LayerBits
from hawq.config import load_config
from hawq.export import load_quantized, save_quantized
from hawq.export.onnx_qdq import compare_onnx_integer, export_onnx, export_onnx_integer
from hawq.layers import quantizable_layers
from hawq.models.fashion import fashion_resnet
from hawq.quant import calibrate, gptq_codes, gptq_round_, integer_layers, quantize_model, set_act_quant, to_integer
from hawq.quant.config import QuantConfig
from hawq.quant.quantizers import qmax_signed

pytestmark = pytest.mark.filterwarnings("ignore")


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs with correlated features (as real activations have): where second-order rounding pays off."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5 + 0.3


def _output_error(model: nn.Module, reference: nn.Module, batches: list[torch.Tensor]) -> float:
    set_act_quant(model, False)
    with torch.no_grad():
        return sum(float(((model(x) - reference(x)) ** 2).sum()) for x in batches)


def _round_both(reference: nn.Module, bits: int, cfg: QuantConfig, batches: list[torch.Tensor], **kw):
    near = quantize_model(copy.deepcopy(reference), {"0": LayerBits(bits, 8)}, cfg).eval()
    gptq = quantize_model(copy.deepcopy(reference), {"0": LayerBits(bits, 8)}, cfg).eval()
    report = gptq_round_(gptq, batches, lambda m, x: m(x), **kw)
    return near, gptq, report


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("cfg", [QuantConfig(), QuantConfig(group_size=16)], ids=["per_channel", "group16"])
def test_linear_gptq_output_error_at_most_nearest(bits, cfg):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(48, 24)).eval()
    batches = [_correlated(64, 48, s) for s in range(3)]
    near, gptq, report = _round_both(reference, bits, cfg, batches)
    e_near, e_gptq = _output_error(near, reference, batches), _output_error(gptq, reference, batches)
    assert e_gptq < 0.9 * e_near, (e_gptq, e_near)
    # the report's Hessian form is the same quantity, relative to the output energy
    assert report["0"]["error_gptq"] < report["0"]["error_nearest"]
    codes, _ = gptq[0].int_weight()
    assert int(codes.abs().max()) == qmax_signed(bits)  # in range, and every unit keeps its peak code


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_gptq_output_error_at_most_nearest(bits, groups):
    torch.manual_seed(1)
    reference = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=groups)).eval()
    smooth = nn.AvgPool2d(3, 1, 1)  # neighbouring pixels correlate, like images
    batches = [smooth(torch.randn(16, 4, 10, 10)) + 0.2 for _ in range(2)]
    near, gptq, _ = _round_both(reference, bits, QuantConfig(), batches, act_order=True)
    assert _output_error(gptq, reference, batches) < 0.9 * _output_error(near, reference, batches)


def test_asymmetric_gptq_compensates_activation_and_prefix_error():
    """With 4-bit activations, the FP32 target (asymmetric) beats plain GPTQ end to end, which beats nearest."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8)).eval()
    bits = {"0": LayerBits(3, 4), "2": LayerBits(3, 4)}
    batches = [_correlated(128, 32, s) for s in range(3)]
    errors = {}
    for mode in ("nearest", "gptq", "asymmetric"):
        model = quantize_model(copy.deepcopy(reference), bits).eval()
        if mode == "asymmetric":
            with pytest.raises(HawqError, match="calibrated activation quantizers"):
                gptq_round_(model, batches, lambda m, x: m(x), asymmetric=True)
            calibrate(model, batches, lambda m, x: m(x), progress=False)
        if mode != "nearest":
            gptq_round_(model, batches, lambda m, x: m(x), asymmetric=mode == "asymmetric")
        calibrate(model, batches, lambda m, x: m(x), progress=False)
        with torch.no_grad():
            errors[mode] = sum(float(((model(x) - reference(x)) ** 2).sum()) for x in batches)
    assert errors["asymmetric"] < 0.9 * errors["gptq"] < 0.9 * errors["nearest"], errors


def test_gptq_codes_pins_range_and_exact_matrix():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 12, generator=g)
    x = _correlated(200, 12, 3)
    h = 2 * x.T @ x / x.shape[0]
    step = (w.abs().amax(1, keepdim=True) / 3).expand_as(w)
    forced = torch.full_like(w, float("nan"))
    forced[0, 0] = -3.0
    for block in (1, 4, 128):  # lazy blocking does not change the result
        codes = gptq_codes(w, h, step, 3, forced, block_size=block)
        assert codes[0, 0] == -3 and codes.abs().max() <= 3 and torch.equal(codes, codes.round())
        if block == 1:
            first = codes
        assert torch.equal(codes, first)
    # an identity Hessian decouples the columns: GPTQ is round-to-nearest
    eye_codes = gptq_codes(w, torch.eye(12), step, 3, damp=1e-6)
    assert torch.equal(eye_codes, torch.clamp(torch.round(w / step), -3, 3))


def _bn_resnet() -> nn.Module:
    """The demo ResNet (width 8) with non-trivial BatchNorm statistics, the same for every seed-3 call."""
    torch.manual_seed(3)
    model = fashion_resnet(width=8).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _gptq_resnet(cfg: QuantConfig) -> tuple[nn.Module, dict, torch.Tensor, dict]:
    model = _bn_resnet()
    names = quantizable_layers(model)
    bits = {n: LayerBits((2, 3, 4)[i % 3], 8) for i, n in enumerate(names)}
    quantize_model(model, bits, cfg)
    x = torch.randn(32, 1, 28, 28)
    gptq_round_(model, [x[:16], x[16:]], lambda m, b: m(b), act_order=True, clip_search=True)
    calibrate(model, [x], lambda m, b: m(b), progress=False)
    codes = {n: model.get_submodule(n).int_weight()[0] for n in names}
    return model.eval(), bits, x, codes


@pytest.mark.parametrize("fold", [False, True])
def test_gptq_codes_travel_unchanged_through_integer_onnx_and_files(tmp_path, fold):
    cfg = QuantConfig(fold_bn=fold)
    model, bits, x, codes = _gptq_resnet(cfg)
    # the codes are GPTQ's, not the nearest rounding of the original weights
    assert any(not torch.equal(c, model.get_submodule(n).int_weight()[0]) for n, c in
               _nearest_codes(bits, cfg).items())
    # integer-only model: the same codes; its ONNX file: bit-identical outputs
    int_model = to_integer(model, x[:2])
    for name, layer in integer_layers(int_model).items():
        assert torch.equal(layer.weight_codes.to(torch.int32), codes[name].to(torch.int32)), name
    path = export_onnx_integer(int_model, x[:2], tmp_path / "int.onnx")
    result = compare_onnx_integer(int_model, path, torch.randn(8, 1, 28, 28))
    assert result["exact_fraction"] == 1.0 and result["max_abs_diff"] == 0.0, result
    # QDQ ONNX: its weight initializers are the codes
    qdq = export_onnx(model, x[:2], tmp_path / "qdq.onnx")
    proto = onnx.load(str(qdq))
    inits = {t.name: t for t in proto.graph.initializer}
    stored = {node.input[0].split(".weight_codes")[0]: numpy_helper.to_array(inits[node.input[0]])
              for node in proto.graph.node if node.op_type == "DequantizeLinear" and ".weight_codes" in node.input[0]}
    assert set(stored) == set(codes)
    for name, c in codes.items():
        got = torch.from_numpy(stored[name].astype("int32")).reshape(c.shape)
        assert torch.equal(got, c.to(torch.int32)), name
    # save / load: the rebuilt fake-quant model has the same codes and the same outputs
    f = tmp_path / "m.safetensors"
    save_quantized(model, bits, f, {"name": "fashion_resnet", "kwargs": {"width": 8}}, cfg)
    loaded = load_quantized(f, build=lambda info: fashion_resnet(**info["kwargs"]))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    for name, c in codes.items():
        assert torch.equal(loaded.get_submodule(name).int_weight()[0], c), name


def _nearest_codes(bits: dict, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    model = _bn_resnet()
    quantize_model(model, bits, cfg)
    return {n: model.get_submodule(n).int_weight()[0] for n in bits}


def test_gptq_restores_activation_modes_and_rejects_bad_input():
    model = quantize_model(nn.Sequential(nn.Linear(8, 4)), {"0": LayerBits(4, 8)})
    x = torch.randn(16, 8)
    calibrate(model, [x], lambda m, b: m(b), progress=False)
    gptq_round_(model, [x], lambda m, b: m(b))
    assert model[0].input_quant.mode == "frozen"
    with pytest.raises(HawqError, match="no calibration batches"):
        gptq_round_(model, [], lambda m, b: m(b))
    with pytest.raises(HawqError, match="damp"):
        gptq_round_(model, [x], lambda m, b: m(b), damp=0.0)
    with pytest.raises(HawqError, match="'nope' is not a quantized"):
        gptq_round_(model, [x], lambda m, b: m(b), layers=["nope"])


@pytest.mark.parametrize("override, match", [
    ("quant.rounding=gptqq", "quant.rounding must be 'nearest' or 'gptq', got 'gptqq'"),
    ("quant.gptq_damp=0", "quant.gptq_damp"),
    ("quant.gptq_block_size=0", "quant.gptq_block_size"),
    ("quant.gptq_batches=0", "quant.gptq_batches"),
])
def test_rounding_config_is_validated_up_front(override, match):
    with pytest.raises(HawqError, match=match):
        load_config(None, [override])
    assert load_config(None, ["quant.rounding=gptq"]).quant.rounding == "gptq"


def test_cli_exits_2_on_a_bad_rounding(capsys):
    from hawq.quantize import main

    assert main(["--config", "configs/fashion_resnet.yaml", "--set", "quant.rounding=best"]) == 2
    err = capsys.readouterr().err
    assert "quant.rounding" in err and len(err.strip().splitlines()) == 1


def test_pipeline_rounds_with_gptq_and_exports_those_codes(tmp_path):
    """``quant.rounding=gptq`` through the CLI: the saved model holds codes that nearest rounding does not give."""
    from hawq.data.fashion_mnist import make_fake_fashion_mnist
    from hawq.models.checkpoint import load_checkpoint
    from hawq.quantize import main
    from tests.test_pipeline import REPO, tiny_overrides

    data = make_fake_fashion_mnist(tmp_path / "fmnist", n_train=128, n_test=64)
    over = [*tiny_overrides(data, tmp_path / "runs", "g"), "run.stages=[sensitivity,search,quantize,export]",
            "quant.rounding=gptq", "export.onnx=false", "model.pretrain_epochs=1", "sensitivity.max_probes=3",
            "sensitivity.min_probes=2", "sensitivity.density_iter=0", "sensitivity.top_eigen=0"]
    assert main(["--config", str(REPO / "configs/fashion_resnet.yaml"), *sum((["--set", o] for o in over), [])]) == 0
    run = tmp_path / "runs" / "g"
    loaded = load_quantized(run / "model.safetensors")
    fp32 = fashion_resnet(width=4)
    load_checkpoint(fp32, run / "fp32.safetensors")
    bits = {n: LayerBits(loaded.get_submodule(n).weight_bits, 8) for n in quantizable_layers(fp32)
            if hasattr(loaded.get_submodule(n), "int_weight")}
    nearest = quantize_model(fp32, bits, QuantConfig())
    differ = [n for n in bits if not torch.equal(nearest.get_submodule(n).int_weight()[0],
                                                   loaded.get_submodule(n).int_weight()[0])]
    assert differ


def test_results_script_rejects_an_unknown_variant(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "results_gptq.py"
    spec = importlib.util.spec_from_file_location("results_gptq", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--variants", "nearest,gptqq"]) == 2
    assert "unknown 'gptqq'" in capsys.readouterr().err


def test_layers_with_distinct_inputs_are_never_grouped():
    """Layers share a pass only when they read the very same tensor: a freed input's address, reused
    by the next layer's input, used to group them by chance of the allocator (GPTQ codes then
    differed between runs)."""
    from hawq.quant.gptq import _discover, gptq_layers

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.ReLU())])
    qmodel = quantize_model(model, {f"{2 * i}": LayerBits(4, 8) for i in range(6)})
    set_act_quant(qmodel, False)  # as gptq_round_ runs it
    with torch.no_grad():  # as in gptq_round_: each freed input's memory is free for the next one
        order, passes, repeated = _discover(qmodel, gptq_layers(qmodel), torch.randn(32, 64), lambda m, b: m(b))
    assert order == [f"{2 * i}" for i in range(6)] and not repeated
    assert passes == [[n] for n in order]
