"""Text data: GLUE-style TSV files (``glue_tsv``) and a plain file of sentences (``sentences``).

Examples are tokenized once at build time with the tokenizer of the model checkpoint
(``data.tokenizer``: a folder with the tokenizer files, or ``minilm`` for the packaged MiniLM);
batches are dicts of int64 tensors ``input_ids``, ``attention_mask``, ``token_type_ids`` (and
``labels`` for GLUE), padded to the longest example of the batch.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

import hawq
from hawq import HawqError
from hawq.data import DataBundle
from hawq.data.config import DataConfig
from hawq.models.registry import shipped_tokenizer


@dataclass(frozen=True)
class GlueTask:
    text_a: str | int  # column name (files with a header) or index (CoLA has no header)
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...]  # label strings in class-index order
    metric: str  # the GLUE metric reported as primary
    header: bool = True
    dev_file: str = "dev.tsv"


GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("sentence", None, "label", ("0", "1"), "accuracy"),
    "cola": GlueTask(3, None, 1, ("0", "1"), "matthews", header=False),
    "mrpc": GlueTask("#1 String", "#2 String", "Quality", ("0", "1"), "f1"),
    "qqp": GlueTask("question1", "question2", "is_duplicate", ("0", "1"), "f1"),
    "qnli": GlueTask("question", "sentence", "label", ("entailment", "not_entailment"), "accuracy"),
    "rte": GlueTask("sentence1", "sentence2", "label", ("entailment", "not_entailment"), "accuracy"),
    "wnli": GlueTask("sentence1", "sentence2", "label", ("0", "1"), "accuracy"),
    "mnli": GlueTask("sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"),
                     "accuracy", dev_file="dev_matched.tsv"),
}


def resolve_tokenizer_path(name: str | None) -> Path:
    if not name:
        raise HawqError("data.tokenizer is not set: point it at the model checkpoint folder (or 'minilm')")
    shipped = shipped_tokenizer(name)
    if shipped is not None:  # a model that ships its tokenizer, named by its registry name ("minilm")
        return shipped()
    path = Path(name)
    if not path.is_dir():
        raise HawqError(f"data.tokenizer folder not found: {name}")
    return path


def load_tokenizer(name: str | None) -> Any:
    """A Hugging Face tokenizer from a local folder, never from the network."""
    path = resolve_tokenizer_path(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise HawqError(f"no usable tokenizer in {path} ({str(e).splitlines()[0]})") from None


class TokenizedDataset(Dataset):
    """Pre-tokenized examples: each item is a dict of int lists (plus an int ``labels``)."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: Sequence[int] | None = None,
                 texts: Sequence[str] | None = None) -> None:
        self.encodings = encodings
        self.labels = None if labels is None else list(labels)
        self.texts = None if texts is None else list(texts)

    def __len__(self) -> int:
        return len(self.encodings["input_ids"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {k: v[i] for k, v in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


class PadCollator:
    """Pads a list of tokenized examples to the longest one (picklable, so loader workers can use it)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        length = max(len(it["input_ids"]) for it in items)
        out: dict[str, Tensor] = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key not in items[0]:
                continue
            pad = self.pad_token_id if key == "input_ids" else 0
            out[key] = torch.tensor([it[key] + [pad] * (length - len(it[key])) for it in items], dtype=torch.long)
        if "labels" in items[0]:
            out["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        return out


def _tokenize(tokenizer: Any, a: list[str], b: list[str] | None, max_length: int) -> dict[str, list[list[int]]]:
    enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=False, return_token_type_ids=True)
    return {k: list(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def read_glue_tsv(path: Path, task: GlueTask) -> tuple[list[str], list[str] | None, list[int]]:
    """(first texts, second texts or None, label indices) of one GLUE TSV file."""
    if not path.is_file():
        raise HawqError(f"GLUE file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.header:
        if not rows:
            raise HawqError(f"{path}: empty file")
        header, rows = rows[0], rows[1:]
        cols = {name: i for i, name in enumerate(header)}
        wanted = [c for c in (task.text_a, task.text_b, task.label) if c is not None]
        missing = [c for c in wanted if c not in cols]
        if missing:
            raise HawqError(f"{path}: column '{missing[0]}' missing (header: {', '.join(header)})")
        ia, il = cols[task.text_a], cols[task.label]
        ib = cols[task.text_b] if task.text_b is not None else None
    else:
        ia, il, ib = int(task.text_a), int(task.label), None if task.text_b is None else int(task.text_b)
    a, b, y = [], [] if ib is not None else None, []
    index = {s: i for i, s in enumerate(task.labels)}
    for n, row in enumerate(rows, start=2 if task.header else 1):
        if not row:
            continue
        if len(row) <= max(ia, il, ib or 0):
            raise HawqError(f"{path}:{n}: expected at least {max(ia, il, ib or 0) + 1} tab-separated columns, "
                            f"got {len(row)}")
        if row[il] not in index:
            raise HawqError(f"{path}:{n}: label '{row[il]}' not one of {', '.join(task.labels)}")
        a.append(row[ia])
        if b is not None:
            b.append(row[ib])
        y.append(index[row[il]])
    if not a:
        raise HawqError(f"{path}: no examples")
    return a, b, y


def build_glue_tsv(cfg: DataConfig) -> DataBundle:
    if not cfg.task:
        raise HawqError(f"data.task must name the GLUE task for glue_tsv ({', '.join(GLUE_TASKS)})")
    name = cfg.task.lower().replace("-", "")
    if name not in GLUE_TASKS:
        raise HawqError(f"GLUE task '{cfg.task}' unknown; known: {', '.join(GLUE_TASKS)}")
    task = GLUE_TASKS[name]
    root = Path(cfg.root)
    if not root.is_dir():
        raise HawqError(f"GLUE data folder not found: {root} (expected train.tsv and {task.dev_file})")
    tokenizer = load_tokenizer(cfg.tokenizer)
    splits = []
    for file in ("train.tsv", task.dev_file):
        a, b, y = read_glue_tsv(root / file, task)
        splits.append(TokenizedDataset(_tokenize(tokenizer, a, b, cfg.max_length), y))
    return DataBundle(splits[0], splits[1], len(task.labels), collate_fn=PadCollator(tokenizer.pad_token_id),
                      info={"name": "glue_tsv", "root": str(root), "glue_task": name,
                            "primary_metric": task.metric, "labels": list(task.labels)})


def default_sentences_path() -> Path:
    return Path(hawq.__file__).resolve().parent / "assets" / "sentences.txt"


def read_sentences(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (lines starting with '#' are comments)."""
    p = Path(path)
    if not p.exists() and not p.is_absolute():
        # a repo-relative path (configs use hawq/assets/sentences.txt) works from any working directory
        p = Path(hawq.__file__).resolve().parent.parent / p
    if not p.is_file():
        raise HawqError(f"sentences file not found: {path}")
    lines = [s.strip() for s in p.read_text(encoding="utf-8").splitlines()]
    sentences = [s for s in lines if s and not s.startswith("#")]
    if len(sentences) < 2:
        raise HawqError(f"sentences file {path}: needs at least 2 sentences, found {len(sentences)}")
    return sentences


def build_sentences(cfg: DataConfig, test_every: int = 5) -> DataBundle:
    """Label-free sentences; every ``test_every``-th sentence goes to the evaluation split."""
    sentences = read_sentences(cfg.root)
    tokenizer = load_tokenizer(cfg.tokenizer)
    test = [s for i, s in enumerate(sentences) if i % test_every == test_every - 1]
    train = [s for i, s in enumerate(sentences) if i % test_every != test_every - 1]
    return DataBundle(
        TokenizedDataset(_tokenize(tokenizer, train, None, cfg.max_length), texts=train),
        TokenizedDataset(_tokenize(tokenizer, test, None, cfg.max_length), texts=test),
        None, collate_fn=PadCollator(tokenizer.pad_token_id),
        info={"name": "sentences", "root": str(cfg.root), "n_train": len(train), "n_test": len(test)},
    )


def write_fake_glue(root: str | Path, task: str = "sst2", n_train: int = 32, n_dev: int = 16, seed: int = 0) -> Path:
    """A tiny learnable GLUE-format folder (single-sentence tasks: 'good' words -> 1, 'bad' words -> 0)."""
    import random

    spec = GLUE_TASKS[task]
    rng = random.Random(seed)
    good = ["great", "wonderful", "lovely", "superb", "delightful", "excellent"]
    bad = ["awful", "boring", "dreadful", "terrible", "dull", "poor"]
    nouns = ["film", "story", "acting", "plot", "ending", "music"]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for file, n in (("train.tsv", n_train), (spec.dev_file, n_dev)):
        lines = []
        for _ in range(n):
            y = rng.randrange(2)
            text = f"the {rng.choice(nouns)} was {rng.choice(good if y else bad)}"
            second = f"the {rng.choice(nouns)} felt {rng.choice(good if y else bad)}"
            label = spec.labels[y] if len(spec.labels) == 2 else spec.labels[2 * y]
            if not spec.header:
                lines.append(f"src\t{label}\t\t{text}")
            elif spec.text_b is None:
                lines.append(f"{text}\t{label}")
            else:
                lines.append(f"{text}\t{second}\t{label}")
        if spec.header:
            cols = [spec.text_a] + ([spec.text_b] if spec.text_b is not None else []) + [spec.label]
            lines.insert(0, "\t".join(str(c) for c in cols))
        (root / file).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
