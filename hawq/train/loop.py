"""The training loop: QAT finetuning with distillation, resumable checkpoints and torchrun support.

Resumption is exact: a run interrupted at any step and restarted with the same arguments ends
with the same weights as an uninterrupted run (same model, optimizer, scheduler, GradScaler and RNG
state, and the same batches, since the shuffle order of each epoch is seeded by ``(seed, epoch)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import itertools
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hawq import HawqError, bars_off
from hawq.choices import check_literals
from hawq.models.tasks import Task
from hawq.train import distributed as D
from hawq.train.checkpoint import (
    MODEL_PREFIX,
    checkpoint_paths,
    flatten_optimizer_state,
    get_rng_states,
    load_checkpoint,
    remove_orphan_temp_files,
    save_checkpoint,
    set_rng_states,
    split_prefix,
    unflatten_optimizer_state,
)
from hawq.train.config import TrainConfig
from hawq.train.data import describe_source, epoch_seed, is_map_dataset, make_train_loader, steps_per_epoch
from hawq.train.metrics import write_history

# config fields that do not change the result, so a run may resume after changing them
_HASH_EXEMPT = {"checkpoint_every_steps", "num_workers"}
# A loss this many times its value at the first step (or at 1, when that was smaller) has diverged:
# ordinary training moves it by less than 10x either way, a step size far too large by many decades.
DIVERGENCE_FACTOR = 1000.0


def validate_config(cfg: TrainConfig) -> None:
    if not (isinstance(cfg.epochs, (int, float)) and 0 < cfg.epochs < math.inf):
        raise HawqError(f"train.epochs must be a finite number > 0, got {cfg.epochs!r}")
    check_literals(cfg, "train")  # optimizer, schedule, amp_dtype: a TrainConfig built in code
    if not 0 < cfg.lr < math.inf:
        raise HawqError(f"train.lr must be a finite number > 0, got {cfg.lr!r}")
    for name in ("momentum", "weight_decay", "min_lr"):
        if not 0 <= getattr(cfg, name) < math.inf:
            raise HawqError(f"train.{name} must be a finite number >= 0, got {getattr(cfg, name)!r}")
    if not all(0 <= b < 1 for b in cfg.adam_betas):
        raise HawqError(f"train.adam_betas must both be in [0, 1), got {list(cfg.adam_betas)}")
    if cfg.batch_size < 1:
        raise HawqError(f"train.batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.warmup_steps < 0:
        raise HawqError(f"train.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise HawqError(f"train.grad_clip must be > 0 or null, got {cfg.grad_clip!r}")
    if cfg.checkpoint_every_steps < 0:
        raise HawqError(f"train.checkpoint_every_steps must be >= 0 (0 = epoch ends only), got "
                        f"{cfg.checkpoint_every_steps}")
    if not 0.0 <= cfg.distill.alpha <= 1.0:
        raise HawqError(f"train.distill.alpha must be in [0, 1], got {cfg.distill.alpha!r}")
    if not cfg.distill.temperature > 0:
        raise HawqError(f"train.distill.temperature must be > 0, got {cfg.distill.temperature!r}")
    for name in ("freeze_bn_after_epochs", "freeze_act_after_epochs"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise HawqError(f"train.{name} must be >= 0 or null, got {value!r}")


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate of (0-based) optimizer step ``step``: linear warmup, then cosine or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise HawqError("train: the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)


def config_hash(cfg: TrainConfig, **extra: Any) -> str:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _HASH_EXEMPT}
    blob = json.dumps({"train": fields, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _set_act_calibration(model: nn.Module, enabled: bool) -> bool:
    """Call ``hawq.quant.set_act_calibration`` when the quantization package provides it."""
    try:
        quant = importlib.import_module("hawq.quant")
    except ImportError:
        return False
    fn = getattr(quant, "set_act_calibration", None)
    if fn is None:
        return False
    fn(model, enabled)
    return True


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclasses.dataclass
class _Position:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # 0-based epoch in progress
    batch_in_epoch: int = 0  # batches of that epoch already consumed
    loss_sum: float = 0.0  # of the epoch in progress, for the history row
    loss_n: int = 0
    start_loss: float | None = None  # at the first step of the run: the divergence reference


def train(model: nn.Module, task: Task, train_loader: Iterable | Dataset, cfg: TrainConfig, *,
          teacher: nn.Module | None = None, device: torch.device | str = "cpu",
          run_dir: Path | str | None = None,
          seed: int = 0, progress: bool = True, eval_fn: Callable[[nn.Module], dict] | None = None,
          tag: str = "finetune", collate_fn: Callable | None = None) -> list[dict]:
    """Train ``model`` in place; return one history row per (possibly partial) epoch.

    ``train_loader`` is a map-style Dataset (batched with ``cfg.batch_size`` and ``collate_fn``), a
    DataLoader (its dataset, batch size and collate function are reused; the order is re-seeded by
    ``(seed, epoch)``), or any other re-iterable with ``len()`` (resumed by skipping batches; exact
    only if it yields the same batches every epoch). With ``run_dir``, checkpoints go to
    ``run_dir/checkpoints/<tag>_last.*`` and the history to ``run_dir/metrics.json``; an existing
    checkpoint of ``tag`` is resumed. Under torchrun the model is wrapped in DDP and only rank 0
    writes files.
    """
    validate_config(cfg)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        raise HawqError(f"train: tag must be letters, digits, '_', '.' or '-' (it names files), got {tag!r}")
    device = torch.device(device)
    rank, world = D.init_distributed()
    main = rank == 0
    source, collate, global_batch, num_workers = describe_source(train_loader, collate_fn, cfg.batch_size,
                                                                 cfg.num_workers)
    indexable = is_map_dataset(source)
    if indexable:
        n_examples = len(source)
        spe = steps_per_epoch(n_examples, global_batch, cfg.drop_last or world > 1)
        if spe == 0:
            raise HawqError(f"train: the training set has {n_examples} examples, fewer than one batch of "
                            f"{global_batch}; lower train.batch_size")
    else:
        if world > 1:
            raise HawqError("train: under torchrun pass a Dataset or a DataLoader so it can be sharded")
        try:
            spe = len(source)  # type: ignore[arg-type]
        except TypeError:
            raise HawqError("train: the training batches must have a length (a Dataset, a DataLoader or a "
                            "list of batches)") from None
        if spe == 0:
            raise HawqError("train: the training loader yields no batches")
        n_examples = None
    total_steps = max(1, round(cfg.epochs * spe))
    n_epochs = -(-total_steps // spe)

    def step_of(epochs: float | None) -> int | None:
        return None if epochs is None else round(epochs * spe)

    bn_freeze_step = step_of(cfg.freeze_bn_after_epochs)
    act_freeze_step = step_of(cfg.freeze_act_after_epochs)

    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    use_distill = teacher is not None and cfg.distill.enabled and cfg.distill.alpha > 0
    optimizer = build_optimizer(model, cfg)
    amp_on = bool(cfg.amp) and device.type == "cuda"
    amp_dtype = torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_on and amp_dtype == torch.float16)

    chash = config_hash(cfg, seed=seed, world=world, examples=n_examples, steps_per_epoch=spe,
                        batch=global_batch, tag=tag, distill=use_distill)
    run_dir = Path(run_dir) if run_dir is not None else None
    ckpt_dir = run_dir / "checkpoints" if run_dir is not None else None
    pos = _Position()
    history: list[dict] = []
    last_good: Path | None = None

    if main and ckpt_dir is not None:
        remove_orphan_temp_files(ckpt_dir, tag)
    loaded = load_checkpoint(ckpt_dir, tag) if ckpt_dir is not None else None
    if loaded is not None:
        tensors, meta = loaded
        json_path = checkpoint_paths(ckpt_dir, tag)["json"]
        start_over = f"delete {ckpt_dir} to start {tag} over"
        missing = [k for k in ("config_hash", "optimizer", "rng", "position", "history") if k not in meta]
        if missing:
            raise HawqError(f"checkpoint {json_path} is unreadable (no '{missing[0]}'); {start_over}")
        if meta.get("config_hash") != chash:
            raise HawqError(f"checkpoint {json_path} was written with a different training setup (config "
                            f"hash {meta.get('config_hash')} != {chash}); delete {ckpt_dir} or change run.name")
        try:
            model.load_state_dict(split_prefix(tensors, MODEL_PREFIX), strict=True)
        except RuntimeError as e:
            raise HawqError(f"checkpoint {json_path} does not fit this model "
                            f"({str(e).splitlines()[0]}); delete {ckpt_dir} or change run.name") from None
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
        if scaler.is_enabled() and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        rng = meta["rng"]
        set_rng_states(rng[rank] if rank < len(rng) else rng[0])
        pos = _Position(**meta["position"])
        history = list(meta["history"])
        last_good = json_path
        if main and progress:
            tqdm.write(f"[{tag}] resuming from {json_path} at step {pos.step}/{total_steps}")
    else:
        _seed_everything(epoch_seed(seed, 10**6) + rank)

    net: nn.Module = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]

    def checkpoint() -> None:
        nonlocal last_good
        if ckpt_dir is None:
            return
        rng_all = D.all_gather_object(get_rng_states())
        error = None
        state = model.state_dict()
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()] if main else []
        if bad:  # never keep (or name as good) a checkpoint that a resume would hit the same NaN from
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
            error = (f"training diverged: '{bad[0]}' ({len(bad)} tensors) is not finite at step {pos.step} "
                     f"(epoch {pos.epoch + 1}); {where}; lower train.lr (now {cfg.lr:g})")
        elif main:
            opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
            tensors = {f"{MODEL_PREFIX}{k}": v for k, v in state.items()}
            tensors.update(opt_tensors)
            meta = {"step": pos.step, "total_steps": total_steps, "steps_per_epoch": spe,
                    "position": dataclasses.asdict(pos), "config_hash": chash,
                    "config": dataclasses.asdict(cfg), "seed": seed, "world_size": world,
                    "scheduler": {"kind": cfg.schedule, "step": pos.step,
                                  "last_lr": optimizer.param_groups[0]["lr"]},
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "rng": rng_all, "history": history, "optimizer": opt_meta}
            try:
                last_good = save_checkpoint(ckpt_dir, tag, tensors, meta)
            except OSError as e:
                prev = (f"the previous checkpoint {last_good} is intact" if last_good
                        else "no earlier checkpoint")
                error = f"could not write checkpoint in {ckpt_dir} at step {pos.step} ({e}); {prev}"
        error = D.broadcast_object(error)
        if error:
            raise HawqError(error)

    def batches_of(epoch: int, start: int) -> Iterator[Any]:
        if indexable:
            return iter(make_train_loader(source, global_batch, seed, epoch, collate, start_batch=start,
                                          rank=rank, world=world, drop_last=cfg.drop_last,
                                          num_workers=num_workers, pin_memory=device.type == "cuda"))
        return itertools.islice(iter(source), start, None)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device_type="cuda", dtype=amp_dtype) if amp_on else contextlib.nullcontext()

    alpha, temperature = cfg.distill.alpha, cfg.distill.temperature

    if main and run_dir is not None and history:
        write_history(run_dir / "metrics.json", tag, history)

    warned_act = False
    for epoch in range(pos.epoch, n_epochs):
        epoch_start_step = epoch * spe
        epoch_end_step = min(epoch_start_step + spe, total_steps)
        start = pos.batch_in_epoch
        model.train()
        bn_frozen = act_frozen = False
        t0 = time.perf_counter()
        bar = tqdm(total=epoch_end_step - epoch_start_step, initial=start, leave=False,
                   desc=f"{tag} epoch {epoch + 1}/{n_epochs}", disable=bars_off(progress and main))
        lr = optimizer.param_groups[0]["lr"]
        it = batches_of(epoch, start)
        while pos.step < epoch_end_step:
            # the freezes depend on the step alone, so a resumed run freezes at the same point
            if bn_freeze_step is not None and not bn_frozen and pos.step >= bn_freeze_step:
                _freeze_bn(model)
                bn_frozen = True
            if act_freeze_step is not None and not act_frozen and pos.step >= act_freeze_step:
                if not _set_act_calibration(model, False) and main and not warned_act:
                    warnings.warn("train.freeze_act_after_epochs is set but hawq.quant has no "
                                  "set_act_calibration(model, enabled): activation ranges keep adapting",
                                  stacklevel=2)
                    warned_act = True
                act_frozen = True
            try:
                batch = next(it)
            except StopIteration:
                raise HawqError(f"train: the loader ran out after {pos.batch_in_epoch} batches of epoch "
                                f"{epoch + 1}; it reported {spe} per epoch") from None
            lr = lr_at(pos.step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = task.to_device(batch, device)
            with autocast():
                outputs = task.forward(net, batch)
                loss = task.loss_from_outputs(outputs, batch)
                if use_distill:
                    with torch.no_grad():
                        teacher_out = task.forward(teacher, batch)
                    loss = (1.0 - alpha) * loss + alpha * task.distill_loss(outputs, teacher_out, temperature)
            reported = D.all_reduce_mean(loss.detach().float().clone())
            loss_value = reported.item()
            if pos.start_loss is None:
                pos.start_loss = loss_value
            if not math.isfinite(loss_value) or loss_value > DIVERGENCE_FACTOR * max(pos.start_loss, 1.0):
                where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
                kind = f"{loss_value:.3g}, over {DIVERGENCE_FACTOR:g}x its first value {pos.start_loss:.3g}," \
                    if math.isfinite(loss_value) else "NaN" if math.isnan(loss_value) else "inf"
                raise HawqError(f"training diverged: loss is {kind} at step {pos.step + 1} (epoch {epoch + 1}); "
                                f"{where}; lower train.lr (now {cfg.lr:g})")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            pos.step += 1
            pos.batch_in_epoch += 1
            pos.loss_sum += loss_value
            pos.loss_n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", refresh=False)
            if (cfg.checkpoint_every_steps and pos.step % cfg.checkpoint_every_steps == 0
                    and pos.step < epoch_end_step):
                checkpoint()
        bar.close()
        row: dict[str, Any] = {"tag": tag, "epoch": epoch + 1, "epoch_float": round(pos.step / spe, 6),
                               "step": pos.step, "loss": pos.loss_sum / max(pos.loss_n, 1), "lr": lr,
                               "time_s": round(time.perf_counter() - t0, 3)}
        if eval_fn is not None:
            metrics = eval_fn(model) if main else None
            metrics = D.broadcast_object(metrics)
            row.update(metrics or {})
        history.append(row)
        pos = _Position(step=pos.step, epoch=epoch + 1, start_loss=pos.start_loss)
        checkpoint()
        if main and run_dir is not None:
            write_history(run_dir / "metrics.json", tag, history)
        if main and progress:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                              if k not in ("tag", "epoch_float", "time_s"))
            tqdm.write(f"[{tag}] {shown}")
    D.barrier()
    return history
