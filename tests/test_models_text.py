"""BERT / MiniLM families, the sequence-classification and encoder tasks, GLUE TSV and sentence data."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import REPO

from hawq import HawqError
from hawq.data import build_data
from hawq.data.checks import check_compatible, configure_task
from hawq.data.config import DataConfig
from hawq.data.text import default_sentences_path, write_fake_glue
from hawq.models import get_model_spec, get_task
from hawq.models.bert import binary_f1, macro_f1, matthews_corrcoef, minilm_path
from hawq.models.compat import build_model
from hawq.models.config import ModelConfig

TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    root = write_fake_glue(tmp_path_factory.mktemp("sst2"), "sst2", n_train=24, n_dev=12)
    return build_data(DataConfig(name="glue_tsv", root=str(root), task="sst2", tokenizer="minilm", max_length=32))


def test_glue_metrics_by_hand():
    pred, y = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0])
    # TP=1 FP=1 TN=2 FN=0: MCC = (1*2 - 1*0) / sqrt(2*1*3*2); F1 = 2 / (2 + 1)
    assert matthews_corrcoef(pred, y, 2) == pytest.approx(2 / 12 ** 0.5)
    assert binary_f1(pred, y) == pytest.approx(2 / 3)
    assert matthews_corrcoef(y, y, 3) == pytest.approx(1.0)
    assert matthews_corrcoef(torch.zeros(4, dtype=torch.long), y, 2) == 0.0
    assert macro_f1(y, y, 2) == pytest.approx(1.0)


def test_bert_sequence_classification_loss_and_evaluate(sst2):
    assert sst2.num_classes == 2 and len(sst2.train) == 24
    torch.manual_seed(0)
    spec, model = build_model(ModelConfig(name="bert", kwargs={"config": TINY}), sst2.num_classes)
    check_compatible(spec, model, sst2)
    task = configure_task(get_task(spec.task), sst2)
    batch = next(iter(sst2.loader("train", 8)))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"][0, 0] == 101
    loss = task.loss(model, batch)
    loss.backward()
    assert loss.item() > 0 and model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    metrics = task.evaluate(model, sst2.loader("test", 5), progress=False)
    assert metrics["n"] == 12 and {"accuracy", "f1", "matthews"} <= set(metrics)
    assert task.primary_metric == "accuracy"
    layers = spec.layers(model)
    assert "bert.embeddings.word_embeddings" in layers and "classifier" in layers
    assert set(spec.default_pins) <= set(layers)


def test_bert_checkpoint_folder_roundtrip_and_errors(tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    _, src = build_model(ModelConfig(name="bert", kwargs={"config": TINY}), 3)
    assert isinstance(src, BertForSequenceClassification)
    src.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    _, dst = build_model(ModelConfig(name="bert", checkpoint=str(tmp_path / "ckpt")), 3)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    assert dst.config._attn_implementation == "eager"  # SDPA has no double backward (Hessian)
    with pytest.raises(HawqError, match="must be a folder"):
        build_model(ModelConfig(name="bert", checkpoint=str(tmp_path / "nope")), 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HawqError, match="no config.json"):
        build_model(ModelConfig(name="bert", checkpoint=str(tmp_path / "empty")), 2)
    with pytest.raises(HawqError, match="model.checkpoint .* or model.kwargs.config"):
        build_model(ModelConfig(name="bert"), 2)


@pytest.mark.parametrize("task_name,primary", [("cola", "matthews"), ("mrpc", "f1"), ("rte", "accuracy")])
def test_glue_formats_and_primary_metric(tmp_path, task_name, primary):
    root = write_fake_glue(tmp_path, task_name, n_train=6, n_dev=4)
    data = build_data(DataConfig(name="glue_tsv", root=str(root), task=task_name, tokenizer="minilm"))
    assert len(data.train) == 6 and len(data.test) == 4
    task = configure_task(get_task("sequence_classification"), data)
    assert task.primary_metric == primary
    if task_name != "cola":  # sentence pairs: segment B gets token type 1
        assert max(data.train[0]["token_type_ids"]) == 1


def test_glue_errors(tmp_path):
    root = write_fake_glue(tmp_path / "g", "sst2", n_train=4, n_dev=2)
    with pytest.raises(HawqError, match="data.task must name the GLUE task"):
        build_data(DataConfig(name="glue_tsv", root=str(root), tokenizer="minilm"))
    with pytest.raises(HawqError, match="GLUE task 'stsb' unknown"):
        build_data(DataConfig(name="glue_tsv", root=str(root), task="stsb", tokenizer="minilm"))
    with pytest.raises(HawqError, match="data.tokenizer is not set"):
        build_data(DataConfig(name="glue_tsv", root=str(root), task="sst2"))
    with pytest.raises(HawqError, match="column 'question' missing"):
        build_data(DataConfig(name="glue_tsv", root=str(root), task="qnli", tokenizer="minilm"))
    (root / "dev.tsv").write_text("sentence\tlabel\nfine film\t7\n")
    with pytest.raises(HawqError, match=r"dev.tsv:2: label '7' not one of 0, 1"):
        build_data(DataConfig(name="glue_tsv", root=str(root), task="sst2", tokenizer="minilm"))
    with pytest.raises(HawqError, match="GLUE data folder not found"):
        build_data(DataConfig(name="glue_tsv", root=str(tmp_path / "none"), task="sst2", tokenizer="minilm"))


def test_encoder_task_against_reference():
    torch.manual_seed(0)
    spec, model = build_model(ModelConfig(name="bert_encoder", kwargs={"config": TINY}))
    model.eval()
    task = get_task(spec.task)
    batch = {"input_ids": torch.randint(1000, 2000, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long),
             "token_type_ids": torch.zeros(3, 7, dtype=torch.long)}
    batch["attention_mask"][0, 4:] = 0
    with pytest.raises(HawqError, match="bind_reference"):
        task.loss(model, batch)
    task.bind_reference(copy.deepcopy(model))
    emb = task.forward(model, batch)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert task.loss(model, batch).item() == pytest.approx(0.0, abs=1e-10)
    same = task.evaluate(model, [batch], progress=False)
    assert same["cosine_mean"] == pytest.approx(1.0, abs=1e-5) and same["n"] == 3
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.add_(0.5 * torch.randn_like(
            model.bert.encoder.layer[0].output.dense.weight))
    moved = task.evaluate(model, [batch], progress=False)
    assert moved["cosine_worst"] <= moved["cosine_mean"] < 0.9999
    loss = task.loss(model, batch)
    loss.backward()
    assert loss.item() > 0 and model.bert.embeddings.word_embeddings.weight.grad is not None
    assert "bert.pooler.dense" not in spec.layers(model)  # mean pooling: no unused pooler layer


def test_minilm_loads_offline_and_embeds_sentences():
    spec = get_model_spec("minilm")
    _, model = build_model(ModelConfig(name="minilm"))
    model.eval()
    assert (minilm_path() / "model.safetensors").is_file()
    assert sum(p.numel() for p in model.parameters()) == 22_565_376  # all-MiniLM-L6-v2 without its pooler
    data = build_data(DataConfig(name="sentences", root="hawq/assets/sentences.txt", tokenizer="minilm"))
    assert len(data.train) + len(data.test) >= 300 and data.num_classes is None
    check_compatible(spec, model, data)
    from hawq.data.text import load_tokenizer

    tok = load_tokenizer("minilm")
    sents = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    with torch.no_grad():
        emb = model(**tok(sents, padding=True, return_tensors="pt"))
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert emb[0] @ emb[1] > 0.5 > emb[0] @ emb[2]  # paraphrases are close, unrelated sentences are not


def test_sentences_data_errors(tmp_path):
    assert default_sentences_path().is_file()
    with pytest.raises(HawqError, match="sentences file not found"):
        build_data(DataConfig(name="sentences", root=str(tmp_path / "none.txt"), tokenizer="minilm"))
    (tmp_path / "one.txt").write_text("# comment\nonly one\n")
    with pytest.raises(HawqError, match="needs at least 2 sentences"):
        build_data(DataConfig(name="sentences", root=str(tmp_path / "one.txt"), tokenizer="minilm"))
    data = build_data(DataConfig(name="sentences", root=str(default_sentences_path()), tokenizer="minilm"))
    spec, model = build_model(ModelConfig(name="bert", kwargs={"config": TINY}), 2)
    with pytest.raises(HawqError, match="needs a labelled data set"):
        check_compatible(spec, model, data)


def test_shipped_weights_are_not_reported_untrained():
    """MiniLM's builder loads the weights its package ships: with no checkpoint and no pretraining the
    run is not "untrained" (no random-weights warning, report.json fp32_weights "shipped")."""
    from hawq.config import load_config
    from hawq.pipeline import fp32_source

    cfg = load_config(str(REPO / "configs/minilm_sentence.yaml"), [])
    assert cfg.model.pretrain_epochs == 0 and cfg.model.checkpoint is None
    assert fp32_source(cfg, get_model_spec("minilm")) == "shipped"
    bare = load_config(None, ["model.name=bert", "model.pretrain_epochs=0"])
    assert fp32_source(bare, get_model_spec("bert")) == "untrained"
