"""The export stage (hawq.export.deploy): verdicts, text models, CPU copies, deployable checkpoints,
and the report figures around it (size with per-group scales, top-5, score digits)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from hawq.bitmap import LayerBits
from hawq.export import compare_onnx, export_onnx, load_quantized, read_quantized_file
from hawq.export.config import ExportConfig
from hawq.export.deploy import (
    check_qdq,
    cpu_copy,
    export_artifacts,
    integer_verdict,
    save_deployable,
)
from hawq.layers import quantizable_layers
from hawq.models.fashion import fashion_resnet
from hawq.quant import QuantConfig, calibrate, quantize_model
from hawq.report import markdown_report, quantized_size_mb, summary_table

pytestmark = pytest.mark.filterwarnings("ignore")

TINY_BERT = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _fashion(bits_of=lambda i: 8, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = fashion_resnet(width=4)
    bits = {n: LayerBits(bits_of(i), 8) for i, n in enumerate(quantizable_layers(model))}
    quantize_model(model, bits, QuantConfig())
    x = torch.randn(16, 1, 28, 28)
    calibrate(model, [x], lambda m, b: m(b), progress=False)
    return model.eval(), x


# ---------------------------------------------------------------------------------------------
# ONNX checks and verdicts


def test_all_zero_outputs_are_checked_not_reported_unwritten(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    quantize_model(model, {"0": LayerBits(8, 8)}, QuantConfig())
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every output below zero: the ReLU makes them all 0
    x = torch.randn(8, 4)
    calibrate(model, [x], lambda m, b: m(b), progress=False)
    model.eval()
    path = export_onnx(model, x, tmp_path / "zero.onnx")
    check = compare_onnx(model, path, x)  # divided by a zero step before
    assert check["step"] == 0.0 and check["max_abs_diff"] == 0.0 and check["max_diff_in_steps"] == 0.0

    out = export_artifacts(model, {"0": LayerBits(8, 8)}, tmp_path, ExportConfig(safetensors=False),
                           {"name": "x", "kwargs": {}}, QuantConfig(), (x, None))
    assert out["onnx"]["path"] == "model.onnx" and (tmp_path / "model.onnx").is_file()
    assert out["onnx"]["check"]["verdict"] == "pass", out["onnx"]
    assert out["onnx_integer"]["check"]["verdict"] == "pass", out["onnx_integer"]


def test_list_inputs_are_recorded_not_fatal(tmp_path):
    """A list of images for a model that is no detector (detectors export DetectionHeads, tested in
    test_models_detection.py): no ONNX export, recorded as such (the run goes on)."""
    model, x = _fashion()
    batch = ([x[0], x[1]], [{}, {}])
    out = export_artifacts(model, {}, tmp_path, ExportConfig(safetensors=False), {"name": "x", "kwargs": {}},
                           QuantConfig(), batch)
    assert "error" in out["onnx"] and not (tmp_path / "model.onnx").exists()
    assert "takes tensor inputs" in out["onnx_integer"]["skipped"]


def test_qdq_verdict_passes_a_faithful_export_and_fails_a_broken_one(tmp_path):
    model, x = _fashion(lambda i: 4 if i % 2 else 8)
    path = export_onnx(model, x[:2], tmp_path / "model.onnx", int4=False)
    good = check_qdq(model, path, (x,), logits=True)
    assert good["verdict"] == "pass", good
    assert good["tolerance"] >= 2 * good["fp32_fp64_max_abs_diff"] and good["tolerance"] >= good["step"]
    # a wrong weight scale in one layer (an exporter bug) must not pass
    proto = onnx.load(str(path))
    scale = next(t for t in proto.graph.initializer if t.name.endswith("layer2.0.conv1.weight_scale"))
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.5), scale.name))
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    bad = check_qdq(model, tmp_path / "broken.onnx", (x,), logits=True)
    assert bad["verdict"] == "fail" and "tolerance" in bad["verdict_reason"], bad


def test_integer_verdict_is_bit_identity():
    exact = {"max_abs_diff": 0.0, "max_diff_in_steps": 0.0, "exact_fraction": 1.0}
    assert integer_verdict(exact)["verdict"] == "pass"
    off = {"max_abs_diff": 0.1, "max_diff_in_steps": 1.0, "exact_fraction": 0.999}
    assert integer_verdict(off)["verdict"] == "fail"


def test_report_md_shows_verdicts_and_written_files_whose_check_failed():
    report = {"layers": [], "primary_metric": "top1", "export": {
        "onnx": {"path": "model.onnx", "check_error": "ValueError: boom"},
        "onnx_integer": {"path": "model_int.onnx", "check": {"exact_fraction": 1.0, "verdict": "pass",
                                                             "verdict_reason": "bit-identical"}}}}
    md = markdown_report(report)
    assert "`model.onnx` (ONNX QDQ vs the PyTorch fake-quant model): written; **check failed**: ValueError" in md
    assert "**PASS** (bit-identical)" in md and "not written" not in md


# ---------------------------------------------------------------------------------------------
# text models: QDQ export of the logits, inputs ids / mask / token types


def test_bert_qdq_export_of_the_logits_with_verdict(tmp_path):
    from hawq.models.compat import build_model
    from hawq.models.config import ModelConfig

    torch.manual_seed(0)
    spec, model = build_model(ModelConfig(name="bert", kwargs={"config": TINY_BERT}), 2)
    bits = {n: LayerBits(4 if i % 2 else 8, 8) for i, n in enumerate(spec.layers(model))}
    quantize_model(model, bits, QuantConfig())
    ids = torch.randint(1000, 3000, (8, 12))
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "labels": torch.zeros(8, dtype=torch.long)}
    calibrate(model, [batch], lambda m, b: m(**{k: v for k, v in b.items() if k != "labels"}).logits, progress=False)
    model.eval()
    out = export_artifacts(model, bits, tmp_path, ExportConfig(safetensors=False), {"name": "bert", "kwargs": {}},
                           QuantConfig(), batch, logits=True)
    assert out["onnx"]["path"] == "model.onnx", out["onnx"]
    check = out["onnx"]["check"]
    assert check["verdict"] == "pass" and check["argmax_agreement"] == 1.0, check
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert list(graph.output[0].type.tensor_type.shape.dim)[1].dim_value == 2  # the logits
    assert "skipped" in out["onnx_integer"]


# ---------------------------------------------------------------------------------------------
# devices: ONNX and integer work on CPU copies; the run's model stays where it is


class _MovesLogged(nn.Linear):
    """A layer that logs which instance is moved to the CPU (and stays put: its tensors are on the
    meta device, standing in for a GPU on a machine without one)."""

    moved: list[nn.Module] = []

    def cpu(self) -> nn.Module:
        _MovesLogged.moved.append(self)
        return self


def test_cpu_copy_copies_a_model_on_another_device_and_never_moves_it():
    model, _ = _fashion()
    assert cpu_copy(model) is model  # already on the CPU: nothing copied, nothing moved
    elsewhere = _MovesLogged(3, 2, device="meta")
    _MovesLogged.moved.clear()
    copied = cpu_copy(elsewhere)
    assert copied is not elsewhere and _MovesLogged.moved == [copied]  # the copy went to the CPU
    assert elsewhere.weight.device.type == "meta" and elsewhere.training  # the run's model: untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_runs_every_stage_on_cuda(tmp_path):
    from pathlib import Path

    from hawq.data.fashion_mnist import make_fake_fashion_mnist
    from hawq.quantize import main

    root = make_fake_fashion_mnist(tmp_path / "fm", n_train=128, n_test=64)
    repo = Path(__file__).resolve().parents[1]
    sets = [f"run.out_dir={tmp_path / 'runs'}", "run.name=gpu", "run.device=cuda", "run.progress=false",
            "model.checkpoint=null", "model.pretrain_epochs=1", "model.kwargs.width=4", f"data.root={root}",
            "data.batch_size=32", "sensitivity.batches=1", "sensitivity.batch_size=32", "sensitivity.max_probes=2",
            "sensitivity.min_probes=2", "quant.calib_batches=1", "train.epochs=0.5", "train.batch_size=32"]
    assert main(["--config", str(repo / "configs/fashion_resnet.yaml"), *sum((["--set", s] for s in sets), [])]) == 0
    report = json.loads((tmp_path / "runs" / "gpu" / "report.json").read_text())
    assert report["export"]["onnx"]["check"]["verdict"] == "pass", report["export"]["onnx"]
    assert report["export"]["onnx_integer"]["check"]["verdict"] == "pass", report["export"]["onnx_integer"]


# ---------------------------------------------------------------------------------------------
# deployable checkpoint: Inception-V3 without its training-only auxiliary head


def test_inception_checkpoint_leaves_out_the_aux_head_and_loads(tmp_path):
    from hawq.models import get_model_spec

    torch.manual_seed(0)
    spec = get_model_spec("inception_v3")
    model = spec.builder(num_classes=4)
    assert model.AuxLogits is not None
    layers = spec.layers(model)
    bits = {n: LayerBits(8, 8) for n in layers}
    quantize_model(model, bits, QuantConfig())
    x = torch.randn(2, 3, 75, 75)
    model.eval()
    calibrate(model, [x], lambda m, b: m(b), progress=False)
    summary = save_deployable(model, bits, tmp_path / "model.safetensors", {"name": "inception_v3",
                              "kwargs": {"num_classes": 4}}, QuantConfig(), integer=False,
                              training_only=spec.training_only, deploy_kwargs=spec.deploy_kwargs)
    assert model.AuxLogits is not None  # put back
    tensors, meta = read_quantized_file(tmp_path / "model.safetensors")
    assert not [k for k in tensors if "AuxLogits" in k]
    assert meta["model_info"]["kwargs"] == {"num_classes": 4, "aux_logits": False}
    aux_bytes = sum(p.numel() * 4 for p in model.AuxLogits.parameters())
    assert summary["other_tensor_bytes"] < aux_bytes  # the aux head alone was more than the rest
    loaded = load_quantized(tmp_path / "model.safetensors")
    assert loaded.AuxLogits is None
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------------------------
# report figures


def test_report_size_counts_per_group_scales_like_the_search():
    from hawq.search import SearchConfig, build_search_problem, layer_costs, solve_problem

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 24), nn.Flatten(), nn.Linear(24 * 5, 16), nn.ReLU(), nn.Linear(16, 3))
    layers = ["0", "2", "4"]
    ids = torch.randint(0, 50, (2, 5))
    costs = layer_costs(model, lambda m: m(ids), layers)
    traces = {n: {"mean": 1.0, "numel": costs[n].weight_numel} for n in layers}
    quant = QuantConfig(group_size=8)
    cfg = SearchConfig(weight_bits=[4, 8], activation_bits=[8])
    cfg.budget.size_uniform_bits = 6
    alloc = solve_problem(build_search_problem(model, traces, costs, cfg, per_channel=quant.per_channel,
                                               group_size=quant.group_size))
    size = quantized_size_mb(model, alloc.bits, layers, quant)
    assert size == pytest.approx(alloc.usage["size_mb"], rel=1e-12)
    # per-group scales are a visible part of this model: the per-channel figure is smaller
    assert quantized_size_mb(model, alloc.bits, layers, QuantConfig()) < size * 0.95


def test_top5_only_with_more_than_five_classes():
    from hawq.models.tasks import ClassificationTask

    task = ClassificationTask()
    for classes, has_top5 in ((4, False), (5, False), (6, True)):
        model = nn.Linear(3, classes)
        batches = [(torch.randn(8, 3), torch.randint(0, classes, (8,)))]
        assert ("top5" in task.evaluate(model, batches, progress=False)) == has_top5, classes


def test_summary_prints_cosine_with_four_decimals():
    report = {"layers": [], "primary_metric": "cosine_mean", "fp32_score": 1.0, "quant_score_after_finetune": 0.98765}
    table = summary_table(report)
    assert "0.9877" in table and "1.0000" in table
    report = {"layers": [], "primary_metric": "top1", "fp32_score": 91.234}
    assert "91.23" in summary_table(report) and "91.234" not in summary_table(report)


def test_bert_ibert_exports_integer_onnx_with_named_inputs(tmp_path):
    """quant.transformer=ibert: model_int.onnx takes ids / mask / token types, bit-identical; the QDQ file
    (float kernels at the I-BERT grids) passes against that reference; the checkpoint loads back."""
    from hawq.models.compat import build_model
    from hawq.models.config import ModelConfig

    torch.manual_seed(0)
    spec, model = build_model(ModelConfig(name="bert", kwargs={"config": TINY_BERT}), 2)
    bits = {n: LayerBits(4 if i % 2 else 8, 8) for i, n in enumerate(spec.layers(model))}
    cfg = QuantConfig(transformer="ibert")
    model = quantize_model(model, bits, cfg)
    ids = torch.randint(1000, 3000, (8, 12))
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "labels": torch.zeros(8, dtype=torch.long)}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    calibrate(model, [batch], lambda m, b: m(**{k: v for k, v in b.items() if k != "labels"}), progress=False)
    model.eval()
    info = {"name": "bert", "kwargs": {"config": TINY_BERT, "num_classes": 2}}
    out = export_artifacts(model, bits, tmp_path, ExportConfig(), info, cfg, batch, logits=True)
    integer = out["onnx_integer"]
    assert integer["path"] == "model_int.onnx" and integer["check"]["verdict"] == "pass", integer
    graph = onnx.load(str(tmp_path / "model_int.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert {"MatMulInteger", "Gather"} <= {n.op_type for n in graph.node}
    assert not {"Erf", "Softmax", "LayerNormalization", "Tanh", "Sqrt"} & {n.op_type for n in graph.node}
    check = out["onnx"]["check"]
    assert check["verdict"] == "pass" and "I-BERT grids" in check["reference"], check
    loaded = load_quantized(tmp_path / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))
