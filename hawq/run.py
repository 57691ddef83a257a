"""The run: its context (:class:`Run`), its folder and the artifact cache every stage resumes from.

A run folder ``runs/<name>/`` holds one artifact per stage. Each artifact records a key: the
:func:`digest` of the inputs it was computed from (the config sections that matter plus the
upstream artifact). :func:`cached` is the one resume rule: with ``run.resume`` and a stored key
equal to the new one the artifact is loaded, otherwise it is computed and written atomically.

Under torchrun only rank 0 reads and writes the folder; every process gets rank 0's answer.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hawq import HawqError
from hawq.bitmap import atomic_write_text
from hawq.config import Config
from hawq.data import DataBundle, build_data
from hawq.data.checks import check_compatible, configure_task
from hawq.models import ModelSpec, Task, get_model_spec, get_task
from hawq.models.compat import build_model
from hawq.models.registry import shipped_tokenizer
from hawq.train import distributed as D

log = logging.getLogger("hawq")
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# small utilities


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto``/``cuda`` is this process's GPU (``cuda:LOCAL_RANK`` under torchrun), else the CPU."""
    device = _resolve_device(name)
    if device.type == "cpu" and D.is_distributed() and dist.get_backend() == "nccl":
        raise HawqError(f"run.device is '{name}' (CPU) but the process group uses NCCL, which reduces GPU "
                        "tensors only; create the group with gloo for a CPU run (hawq.quantize does so "
                        "when run.device is cpu)")
    return device


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return D.local_device() if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HawqError(f"run.device is '{name}' but no CUDA device is available (use 'cpu' or 'auto')")
    if name == "cuda":
        return D.local_device()
    if name.startswith("cuda:") and D.is_distributed():
        raise HawqError(f"run.device '{name}' names one GPU for all {D.get_world_size()} processes; use "
                        "'cuda' or 'auto' (each process takes cuda:LOCAL_RANK)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise HawqError(f"run.device: unknown device '{name}'") from None


def digest(*parts: Any) -> str:
    """A stable hash of JSON-able parts (config sections, upstream hashes)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def state_dict_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resolve_path(path: str | None, config_dir: Path | None) -> str | None:
    """A relative path is looked up in the working directory, then next to the config file."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or config_dir is None:
        return str(p)
    for base in (config_dir, config_dir.parent):
        if (base / p).exists():
            return str(base / p)
    return str(p)


# ---------------------------------------------------------------------------------------------
# the run context


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    device: torch.device
    spec: ModelSpec
    task: Task
    data: DataBundle
    fp32: nn.Module
    layers: list[str]
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def main(self) -> bool:
        """This process writes the run folder (rank 0, or the only process)."""
        return D.is_main()

    @property
    def progress(self) -> bool:
        return self.cfg.run.progress and self.main

    def batches(self, split: str, n: int | None, batch_size: int, shuffle: bool = False,
                to_device: bool = True) -> list[Any]:
        """The first ``n`` batches of a split (seeded order), moved to the device.

        The list is the same on every process; :func:`hawq.train.distributed.shard` splits it.
        """
        loader = self.data.loader(split, batch_size, shuffle=shuffle, seed=self.cfg.run.seed)
        out = []
        for i, batch in enumerate(loader):
            if n is not None and i >= n:
                break
            out.append(self.task.to_device(batch, self.device) if to_device else batch)
        return out

    def eval_batches(self) -> Any:
        return (self.task.to_device(b, self.device)
                for b in self.data.loader("test", self.cfg.data.eval_batch_size))

    def evaluate(self, model: nn.Module, desc: str) -> dict[str, float]:
        return self.task.evaluate(model, self.eval_batches(), self.device, progress=self.progress, desc=desc)

    def primary(self, metrics: dict[str, float]) -> float:
        return float(metrics[self.task.primary_metric])


def example_forward(run: Run) -> Callable[[nn.Module], Any]:
    """``forward(model)`` on two test examples, without gradients (cost tracing)."""
    example = run.batches("test", 1, 2)[0]

    def forward(model: nn.Module) -> Any:
        with torch.no_grad():
            return run.task.forward(model, example)

    return forward


def build_model_and_data(cfg: Config, run_dir: Path, config_dir: Path | None) -> Run:
    """The first stage: the device, the data, the FP32 model and its quantizable layers, checked
    against each other (a mismatch is bad input, reported before the run folder exists)."""
    device = resolve_device(cfg.run.device)
    get_model_spec(cfg.model.name)  # an unknown model name fails before any data is read
    data_cfg = copy.deepcopy(cfg.data)
    data_cfg.root = resolve_path(data_cfg.root, config_dir)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.checkpoint = resolve_path(model_cfg.checkpoint, config_dir)
    if data_cfg.tokenizer is not None and shipped_tokenizer(data_cfg.tokenizer) is None:
        data_cfg.tokenizer = resolve_path(data_cfg.tokenizer, config_dir)
    data = build_data(data_cfg, seed=cfg.run.seed)
    spec, model = build_model(model_cfg, data.num_classes)
    task = get_task(spec.task)
    configure_task(task, data)
    model.to(device).eval()
    layers = spec.layers(model)
    if not layers:
        raise HawqError(f"model '{spec.name}' has no quantizable layers")
    check_compatible(spec, model, data)
    run = Run(cfg, run_dir, device, spec, task, data, model, layers)
    kwargs = dict(model_cfg.kwargs)
    num_classes = model_cfg.num_classes or data.num_classes
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    run.results["model_info"] = {"name": spec.name, "kwargs": kwargs, "checkpoint": model_cfg.checkpoint}
    return run


# ---------------------------------------------------------------------------------------------
# the artifact cache


@dataclass(frozen=True)
class Artifact(Generic[T]):
    """A stage's product in the run folder and the key it was computed from.

    ``stored_key(run_dir)`` reads the recorded key (None when the files are missing or unreadable);
    ``load(run_dir)`` reads the product; ``save(run_dir, value, key)`` writes it (each file
    atomically, the key last or alongside, so a cut-short write never leaves a matching key).
    """

    name: str
    stored_key: Callable[[Path], str | None]
    load: Callable[[Path], T]
    save: Callable[[Path, T, str], None]


def json_key(file: str, *required: str) -> Callable[[Path], str | None]:
    """``stored_key`` for an artifact whose key is ``file``'s top-level ``"key"`` (and which is only
    complete when ``required`` files exist too)."""
    def stored_key(run_dir: Path) -> str | None:
        if not all((run_dir / r).exists() for r in required):
            return None
        data = read_json(run_dir / file)
        return data.get("key") if isinstance(data, dict) else None

    return stored_key


def cached(run: Run, artifact: Artifact[T], key: str, compute: Callable[[], T],
           where: Literal["everywhere", "main"] = "everywhere") -> T:
    """``key -> load, or compute and write atomically``: the resume rule of every stage.

    Rank 0 looks in the run folder (a hit needs ``run.resume`` and an equal stored key) and every
    process gets its answer. On a miss ``compute`` runs on every process (``where="everywhere"``:
    stages with collectives inside) or on rank 0 only (``"main"``; the result is broadcast), and
    rank 0 saves the result.
    """
    run_dir = run.run_dir

    def lookup() -> tuple[bool, T | None]:
        if run.cfg.run.resume and artifact.stored_key(run_dir) == key:
            log.info("%s: reusing %s", artifact.name, run_dir)
            return True, artifact.load(run_dir)
        return False, None

    hit, value = D.run_on_main(lookup)
    if hit:
        return value  # type: ignore[return-value]
    value = D.run_on_main(compute) if where == "main" else compute()
    D.run_on_main(artifact.save, run_dir, value, key)
    return value


def claim_resumable(run: Run, folder: str, key_name: str, key: str, pattern: str) -> None:
    """For a stage that resumes from its own partial files (training checkpoints in ``folder``):
    rank 0 deletes them when they were written for other inputs (or ``run.resume`` is off), then
    records ``key``. Every process waits, so none looks for a checkpoint before the check."""
    ckpt_dir = run.run_dir / folder
    key_file = ckpt_dir / key_name

    def prepare() -> None:
        if key_file.exists() and (key_file.read_text().strip() != key or not run.cfg.run.resume):
            for old in ckpt_dir.glob(pattern):
                old.unlink()
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(key_file, key + "\n")

    # the run folder must be on a filesystem every process sees: one node, or shared storage
    D.run_on_main(prepare)
