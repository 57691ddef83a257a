"""The training stages: FP32 pretraining (when no weights are given) and quantization-aware
finetuning with distillation from the FP32 model.

Both run under DDP when torchrun started several processes; rank 0's model is kept at the end.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from safetensors.torch import load_file, save_file
from torch import nn

from hawq import HawqError
from hawq.bitmap import BitMap, bitmap_to_dict
from hawq.keys import config_key
from hawq.run import (
    Artifact,
    Run,
    cached,
    claim_resumable,
    digest,
    json_key,
    seed_everything,
    state_dict_digest,
    write_json,
)
from hawq.train import distributed as D
from hawq.train.loop import train

FP32_FILE, FP32_KEY_FILE = "fp32.safetensors", "fp32.json"


def pretrain_if_needed(run: Run) -> None:
    """Without a checkpoint, train the FP32 model first (and keep it in the run folder)."""
    m = run.cfg.model
    if m.checkpoint is not None or m.weights is not None or m.pretrain_epochs <= 0:
        return
    key = digest(config_key(run.cfg.model), config_key(run.cfg.data), run.cfg.run.seed)

    def load(run_dir: Path) -> Literal["loaded"]:
        run.fp32.load_state_dict(load_file(str(run_dir / FP32_FILE), device=str(run.device)))
        return "loaded"

    def save(run_dir: Path, _: str, key: str) -> None:
        path = run_dir / FP32_FILE
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in run.fp32.state_dict().items()}, str(tmp))
        tmp.replace(path)
        write_json(run_dir / FP32_KEY_FILE, {"key": key})

    fp32 = Artifact("pretrain", json_key(FP32_KEY_FILE, FP32_FILE), load, save)
    if cached(run, fp32, key, lambda: _pretrain(run)) == "loaded":
        D.broadcast_module(run.fp32)  # rank 0 read the file; the others take its weights


def _pretrain(run: Run) -> Literal["trained"]:
    m = run.cfg.model
    train_cfg = dataclasses.replace(run.cfg.train, epochs=m.pretrain_epochs, lr=m.pretrain_lr,
                                    weight_decay=m.pretrain_weight_decay,
                                    distill=dataclasses.replace(run.cfg.train.distill, enabled=False))
    seed_everything(run.cfg.run.seed)
    run.fp32.train()
    train(run.fp32, run.task, run.data.train, train_cfg, device=run.device, run_dir=run.run_dir,
          seed=run.cfg.run.seed, progress=run.progress, tag="pretrain", collate_fn=run.data.collate_fn)
    run.fp32.eval()
    # DDP keeps the weights equal, but each process updated its BatchNorm statistics on its own
    # shard after the last broadcast: take rank 0's, the model that is saved
    D.broadcast_module(run.fp32)
    return "trained"


def stage_finetune(run: Run, model: nn.Module, bits: BitMap) -> list[dict]:
    """Quantization-aware finetuning of ``model`` (in place); returns the per-epoch history.

    Its artifact is the training checkpoint folder: it resumes only if it finetuned the same
    quantized model (same bit map, quant and train settings, FP32 weights and seed).
    """
    if run.cfg.train.epochs <= 0:
        return []
    key = digest(bitmap_to_dict(bits), config_key(run.cfg.quant), config_key(run.cfg.train),
                 state_dict_digest(run.fp32), run.cfg.run.seed)
    claim_resumable(run, "checkpoints", "finetune.key", key, "finetune_*")
    seed_everything(run.cfg.run.seed)
    model.train()
    history = train(model, run.task, run.data.train, run.cfg.train, teacher=run.fp32, device=run.device,
                    run_dir=run.run_dir, seed=run.cfg.run.seed, progress=run.progress, tag="finetune",
                    collate_fn=run.data.collate_fn,
                    eval_fn=lambda m: {f"test_{k}": v for k, v in run.evaluate(m, "eval").items()})
    model.eval()
    # DDP keeps the weights equal; BatchNorm statistics and activation ranges are per process:
    # every process keeps rank 0's (the model that was evaluated and is exported)
    D.broadcast_module(model)
    return history


def check_not_at_chance(run: Run, before: dict[str, float], after: dict[str, float]) -> None:
    """Finetuning that takes a model from clearly above chance down to chance top-1 has diverged."""
    classes = run.data.num_classes
    if run.task.primary_metric != "top1" or not classes or classes < 2:
        return
    chance = 100.0 / classes
    top1_before, top1_after = run.primary(before), run.primary(after)
    if top1_before >= 2 * chance and top1_after <= 1.5 * chance:
        raise HawqError(f"finetuning diverged: top-1 fell from {top1_before:.1f}% to {top1_after:.1f}% (chance is "
                        f"{chance:.1f}%); lower train.lr (now {run.cfg.train.lr:g})")
