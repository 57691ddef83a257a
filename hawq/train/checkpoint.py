"""Pickle-free training checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint of tag ``t`` is the pair ``checkpoints/t_last.safetensors`` + ``checkpoints/t_last.json``.
Both carry the step counter. Writes go to temp files first; then the old tensor file is moved to
``t_prev.safetensors``, the new one takes its place and the JSON is replaced last. A crash at any
point therefore leaves a JSON whose step matches ``t_last`` or ``t_prev``, and :func:`load_checkpoint`
picks the file that agrees with it. An error while writing (e.g. disk full) removes the temp files
and leaves the previous pair untouched.
"""

from __future__ import annotations

import base64
import json
import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hawq import HawqError

FORMAT_VERSION = 1
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"


def checkpoint_paths(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, Path]:
    d = Path(ckpt_dir)
    return {"tensors": d / f"{tag}_last.safetensors", "json": d / f"{tag}_last.json",
            "prev": d / f"{tag}_prev.safetensors"}


# ---------------------------------------------------------------------------------------------- optimizer

def flatten_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors and a JSON-ready rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}state/{pid}/{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = []
    for gi, group in enumerate(state_dict["param_groups"]):
        g = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}group/{gi}/{key}"] = value
                g[key] = {"__tensor__": True}
            elif isinstance(value, tuple):
                g[key] = {"__tuple__": list(value)}
            else:
                g[key] = value
        groups.append(g)
    return tensors, {"state_scalars": scalars, "param_groups": groups}


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(f"{OPTIM_PREFIX}state/"):
            pid, key = name[len(OPTIM_PREFIX) + len("state/"):].split("/", 1)
            state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta["state_scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = []
    for gi, group in enumerate(meta["param_groups"]):
        g = {}
        for key, value in group.items():
            if isinstance(value, dict) and value.get("__tensor__"):
                g[key] = tensors[f"{OPTIM_PREFIX}group/{gi}/{key}"]
            elif isinstance(value, dict) and "__tuple__" in value:
                g[key] = tuple(value["__tuple__"])
            else:
                g[key] = value
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------- RNG

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def get_rng_states() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states as JSON-ready values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(_unb64(states["torch"]))
    n = states["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = states["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = [_unb64(s) for s in states["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------------------------- files

def _write_tensor_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """The one place tensor bytes hit the disk (tests replace it to simulate a full disk)."""
    save_file(tensors, path, metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_text_file(text: str, path: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _tmp_path(directory: Path, name: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def remove_orphan_temp_files(ckpt_dir: str | os.PathLike, tag: str) -> list[Path]:
    """Delete the temp files of ``tag`` that a killed write left behind (no writer is running now)."""
    removed = []
    for name in (f"{tag}_last.safetensors", f"{tag}_last.json"):
        for orphan in Path(ckpt_dir).glob(f".{name}.*.tmp"):
            orphan.unlink(missing_ok=True)
            removed.append(orphan)
    return removed


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone(): safetensors refuses tensors that share storage (tied weights, views)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(ckpt_dir: str | os.PathLike, tag: str, tensors: Mapping[str, torch.Tensor],
                    meta: Mapping[str, Any]) -> Path:
    """Write the checkpoint pair of ``tag`` crash-safely (see the module docstring); return the JSON path.

    ``meta`` must hold an integer ``step``; it is stored in both files.
    """
    paths = checkpoint_paths(ckpt_dir, tag)
    directory = paths["json"].parent
    directory.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    record = {"format": FORMAT_VERSION, "tag": tag, **meta, "step": step}
    text = json.dumps(record, indent=1, sort_keys=False)
    tmp_tensors = _tmp_path(directory, paths["tensors"].name)
    tmp_json = None
    try:
        _write_tensor_file(_cpu_tensors(tensors), tmp_tensors, {"step": str(step), "tag": tag})
        tmp_json = _tmp_path(directory, paths["json"].name)
        _write_text_file(text, tmp_json)
        if paths["tensors"].exists():
            os.replace(paths["tensors"], paths["prev"])
        os.replace(tmp_tensors, paths["tensors"])
        os.replace(tmp_json, paths["json"])
    except BaseException:
        for tmp in (tmp_tensors, tmp_json):
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        raise
    if paths["prev"].exists():
        paths["prev"].unlink()
    _fsync_dir(directory)
    return paths["json"]


def _fsync_dir(directory: Path) -> None:
    """Persist the renames themselves (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tensor_file_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return int(meta["step"])
    except Exception:  # a truncated or foreign file is simply not a candidate
        return None


def load_checkpoint(ckpt_dir: str | os.PathLike,
                    tag: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Return ``(tensors, meta)`` of the checkpoint of ``tag``, or None when there is none.

    Raises HawqError when the JSON exists but no tensor file with the same step does.
    """
    paths = checkpoint_paths(ckpt_dir, tag)
    if not paths["json"].exists():
        return None
    try:
        meta = json.loads(paths["json"].read_text())
        step = int(meta["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise HawqError(f"checkpoint {paths['json']} is unreadable ({e}); "
                        f"delete {paths['json'].parent} to start {tag} over") from None
    if meta.get("format") != FORMAT_VERSION:
        raise HawqError(f"checkpoint {paths['json']} has format {meta.get('format')}, "
                        f"expected {FORMAT_VERSION}")
    for candidate in (paths["tensors"], paths["prev"]):
        if candidate.exists() and _tensor_file_step(candidate) == step:
            return load_file(str(candidate)), meta
    raise HawqError(f"checkpoint {paths['json']} (step {step}) has no matching tensor file; "
                    f"delete {paths['json'].parent} to start {tag} over")


def split_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
