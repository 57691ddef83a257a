"""One tiny end-to-end pipeline run per family (random weights, generated data, minimal settings).

Marked slow: each run pays the pipeline's fixed costs (reports, plots), about 5-20 s per family on one core.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from hawq.config import load_config
from hawq.data.coco import make_fake_coco
from hawq.data.image_folder import make_fake_image_folder
from hawq.data.text import write_fake_glue
from hawq.pipeline import run_pipeline

pytestmark = pytest.mark.slow

TINY_BERT = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}
FAST = ["run.progress=false", "run.threads=1", "model.pretrain_epochs=0",
        "sensitivity.batches=1", "sensitivity.batch_size=4", "sensitivity.max_probes=2", "sensitivity.min_probes=2",
        "search.weight_bits=[4,8]", "search.budget.size_uniform_bits=6", "quant.calib_batches=1",
        "data.batch_size=4", "data.eval_batch_size=8"]


@pytest.fixture(autouse=True)
def _offline_and_restore_threads(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(tmp_path, overrides: list[str], stages: str = "[sensitivity,search,quantize]") -> dict:
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'runs'}", "run.name=e2e", f"run.stages={stages}",
                             *FAST, *overrides])
    report = run_pipeline(cfg)
    run_dir = tmp_path / "runs" / "e2e"
    traces = json.loads((run_dir / "traces.json").read_text())["layers"]
    # Hutchinson spends >= 1 probe; exact traces spend one backward per non-zero direction of the loss
    # Hessian in the outputs (none when a random-init network saturates its softmax: the trace is 0)
    assert traces and all(t["n"] >= 1 or t["estimator"] == "gauss_newton" for t in traces.values())
    assert all(math.isfinite(t["mean"]) for t in traces.values())
    assert (run_dir / "bits.yaml").is_file()
    return report


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_fake_image_folder(tmp_path_factory.mktemp("imgs"), classes=3, per_class=4, size=32)


def test_resnet18_all_stages(tmp_path, images):
    report = _run(tmp_path, ["model.name=resnet18", "data.name=imagenet_folder", f"data.root={images}",
                             "data.image_size=32", "train.epochs=0.5", "train.batch_size=4",
                             "export.onnx=false"], stages="[sensitivity,search,quantize,finetune,export]")
    assert 0.0 <= report["quant_top1_after_finetune"] <= 100.0
    assert (tmp_path / "runs" / "e2e" / "model.safetensors").is_file()


@pytest.mark.parametrize("overrides", [
    ["model.name=squeezenext", "model.kwargs={variant: 1.0-SqNxt-23v5}", "data.image_size=32"],
    ["model.name=inception_v3", "model.kwargs={aux_logits: false}", "data.image_size=75"],
], ids=["squeezenext", "inception_v3"])
def test_image_families(tmp_path, images, overrides):
    report = _run(tmp_path, [*overrides, "data.name=imagenet_folder", f"data.root={images}", "export.onnx=false"],
                  stages="[sensitivity,search,quantize,export]")
    assert 0.0 <= report["quant_top1_before_finetune"] <= 100.0
    assert "top5" not in report["quant_before_finetune"]  # 3 classes: every label is in the top 5
    # the integer-only model (Inception: padded average pools, branch concatenations) is written and
    # onnxruntime computes it bit for bit like the PyTorch integer model
    integer = report["export"]["onnx_integer"]
    assert integer.get("path") == "model_int.onnx", integer
    assert integer["check"]["verdict"] == "pass" and integer["check"]["exact_fraction"] == 1.0, integer
    assert (tmp_path / "runs" / "e2e" / "model_int.onnx").is_file()


def test_bert_sst2(tmp_path):
    root = write_fake_glue(tmp_path / "sst2", "sst2", n_train=16, n_dev=8)
    report = _run(tmp_path, ["model.name=bert", f"model.kwargs={{config: {json.dumps(TINY_BERT)}}}",
                             "data.name=glue_tsv", f"data.root={root}", "data.task=sst2", "data.tokenizer=minilm",
                             "data.max_length=16"], stages="[sensitivity,search,quantize,export]")
    assert "accuracy" in report["quant_before_finetune"]
    # a classifier with labels: softmax attention, LayerNorm and GELU leave the encoder to Hutchinson, with
    # independent probes per sample (the samples are independent in the loss)
    meta = json.loads((tmp_path / "runs" / "e2e" / "traces.json").read_text())["meta"]
    assert any(n.endswith("layer.0.intermediate.dense") for n in meta["per_sample_layers"]), meta
    assert "independent probes per sample" in (tmp_path / "runs" / "e2e" / "report.md").read_text()
    # the QDQ export of the logits (inputs ids / mask / token types) is written and passes its check
    assert report["export"]["onnx"]["check"]["verdict"] == "pass", report["export"]["onnx"]
    assert (tmp_path / "runs" / "e2e" / "model.onnx").is_file()


def test_bert_ibert_finetunes_and_writes_the_integer_transformer(tmp_path):
    """quant.transformer=ibert through the pipeline: QAT of the traced I-BERT model, then model_int.onnx with
    the three text inputs, bit-identical to the PyTorch integer model of the finetuned model."""
    root = write_fake_glue(tmp_path / "sst2", "sst2", n_train=16, n_dev=8)
    report = _run(tmp_path, ["model.name=bert", f"model.kwargs={{config: {json.dumps(TINY_BERT)}}}",
                             "data.name=glue_tsv", f"data.root={root}", "data.task=sst2", "data.tokenizer=minilm",
                             "data.max_length=16", "quant.transformer=ibert", "train.epochs=1", "train.batch_size=4",
                             "export.onnx=false"],  # the QDQ file of an I-BERT model: tests/test_deploy.py
                  stages="[sensitivity,search,quantize,finetune,export]")
    assert "accuracy" in report["quant_after_finetune"]
    integer = report["export"]["onnx_integer"]
    assert integer["check"]["verdict"] == "pass" and integer["check"]["exact_fraction"] == 1.0, integer
    import onnx

    graph = onnx.load(str(tmp_path / "runs" / "e2e" / "model_int.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]


def test_bert_encoder_label_free(tmp_path):
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(f"sentence number {i} is about {w}" for i, w in
                                   enumerate(["cats", "rain", "trains", "music", "bread", "stars"] * 2)))
    report = _run(tmp_path, ["model.name=bert_encoder", f"model.kwargs={{config: {json.dumps(TINY_BERT)}}}",
                             "data.name=sentences", f"data.root={sentences}", "data.tokenizer=minilm",
                             "sensitivity.label_free=true"])
    assert report["fp32"]["cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < report["quant_before_finetune"]["cosine_mean"] <= 1.0 + 1e-6


def test_retinanet(tmp_path):
    root = make_fake_coco(tmp_path / "coco", n_train=4, n_val=2, size=64)
    report = _run(tmp_path, ["model.name=retinanet_resnet50_fpn", "model.kwargs={min_size: 64, max_size: 64}",
                             "data.name=coco", f"data.root={root}", "train.distill.enabled=false",
                             "sensitivity.batch_size=2"])
    assert "map" in report["quant_before_finetune"]
