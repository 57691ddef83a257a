"""The run configuration: one dataclass per stage, loaded from YAML plus ``--set a.b=c`` overrides.

Every key is checked: an unknown key is an error naming the key and the closest valid one, and a
value of the wrong type is an error naming the key and the expected type. The resolved config is
saved into the run folder, so a run documents exactly what it did.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from hawq import HawqError
from hawq.data.config import DataConfig
from hawq.export.config import ExportConfig
from hawq.models.config import ModelConfig
from hawq.quant.config import QuantConfig, check_rounding
from hawq.search.config import SearchConfig
from hawq.sensitivity.config import SensitivityConfig
from hawq.train.config import TrainConfig


@dataclass
class RunConfig:
    name: str = "demo"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1"
    threads: int | None = None  # torch intra-op threads; None = torch's default
    progress: bool = True
    resume: bool = True  # reuse finished stages of an earlier run with the same config
    stages: list[str] = field(
        default_factory=lambda: ["sensitivity", "search", "quantize", "finetune", "export"])


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# ---------------------------------------------------------------------------------------------
# dataclass <-> plain data, with type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# YAML 1.2 core schema floats that YAML 1.1 leaves as strings (no dot: 1e-3, 5E4)
_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (after YAML parsing) and convert where lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:  # an enum setting: one of the listed values, checked before any work
        allowed = typing.get_args(tp)
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise HawqError(f"config key '{key}': expected one of {', '.join(repr(a) for a in allowed)}, "
                        f"got {value!r}{hint}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except HawqError as e:
                errors.append(e)
        raise HawqError(f"config key '{key}': expected {' or '.join(_type_name(a) for a in args)}, "
                        f"got {value!r}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise HawqError(f"config key '{key}': expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise HawqError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise HawqError(f"config key '{key}': expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise HawqError(f"config key '{key}': expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise HawqError(f"config key '{key}': expected a mapping, got {value!r}")
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise HawqError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise HawqError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 1e-3 as a string; YAML 1.2 as a float
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise HawqError(f"config key '{key}': expected a finite number, got {value!r}")
            return float(value)
        raise HawqError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise HawqError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{(prefix + '.' if prefix else '') + close[0]}'?)" if close else ""
            valid = ", ".join(names)
            raise HawqError(f"unknown config key '{full}'{hint}; valid keys here: {valid}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# overrides


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise HawqError(f"--set expects key=value (e.g. search.budget.size_mb=0.05), got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise HawqError(f"--set expects key=value, got '{item}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # a plain string such as a path with a colon
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` into the nested dict (YAML syntax for the value: 3, 0.5, [2,4], true, null)."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise HawqError(f"--set {item}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _check_paths_exist(data: dict, overrides: list[str]) -> None:
    """--set must name a key that exists in the schema, even if the YAML left it out."""
    for item in overrides:
        path, _ = _parse_override(item)
        cls: Any = Config
        walked: list[str] = []
        for part in path:
            if not _is_dataclass_type(cls):
                # free-form mappings (pins, kwargs) accept any key below them
                break
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                prefix = ".".join(walked)
                close = difflib.get_close_matches(part, names, n=1)
                hint = f" (did you mean '{(prefix + '.' if prefix else '') + close[0]}'?)" if close else ""
                raise HawqError(f"--set: unknown config key '{'.'.join(path)}'{hint}")
            walked.append(part)
            tp = typing.get_type_hints(cls)[part]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            cls = args[0] if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1 else tp


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    overrides = overrides or []
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise HawqError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise HawqError(f"config {p}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise HawqError(f"config {p}: invalid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise HawqError(f"config {p}: expected a mapping of sections (run, model, data, ...)")
    _check_paths_exist(data, overrides)
    data = apply_overrides(data, overrides)
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


# Ranges of single keys, checked before any model is built: (key, what it must be, test of the value).
_RANGES: list[tuple[str, str, Callable[[Any], bool]]] = [
    ("run.threads", "an integer >= 1 or null", lambda v: v is None or v >= 1),
    ("data.batch_size", "an integer >= 1", lambda v: v >= 1),
    ("data.eval_batch_size", "an integer >= 1", lambda v: v >= 1),
    ("data.train_subset", "an integer >= 1 or null (all examples)", lambda v: v is None or v >= 1),
    ("data.test_subset", "an integer >= 1 or null (all examples)", lambda v: v is None or v >= 1),
    ("data.num_workers", "an integer >= 0", lambda v: v >= 0),
    ("data.max_length", "an integer >= 1", lambda v: v >= 1),
    ("data.image_size", "an integer >= 1 or null", lambda v: v is None or v >= 1),
    ("model.num_classes", "an integer >= 1 or null (the data set's)", lambda v: v is None or v >= 1),
    ("model.pretrain_epochs", ">= 0", lambda v: v >= 0),
    ("model.pretrain_lr", "> 0", lambda v: v > 0),
    ("quant.group_size", "an integer >= 1 or null (per-channel)", lambda v: v is None or v >= 1),
    ("quant.act_percentile", "in (0, 100]", lambda v: 0 < v <= 100),
    ("quant.ema_decay", "in [0, 1)", lambda v: 0 <= v < 1),
    ("quant.calib_batches", "an integer >= 1", lambda v: v >= 1),
    ("search.time_limit_s", "> 0", lambda v: v > 0),
    ("sensitivity.tol", ">= 0", lambda v: v >= 0),
    ("sensitivity.min_probes", "an integer >= 2", lambda v: v >= 2),
    ("sensitivity.density_iter", "an integer >= 0", lambda v: v >= 0),
    ("sensitivity.top_eigen", "an integer >= 0", lambda v: v >= 0),
    ("search.pareto_points", "an integer >= 0", lambda v: v >= 0),
    ("train.epochs", ">= 0", lambda v: v >= 0),
]


def _value_at(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_run_name(name: str) -> None:
    """A run name is one folder inside ``run.out_dir``: never a path, never the folder itself."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise HawqError(f"run.name must be one folder name inside run.out_dir (no '/', not '.' or '..'), "
                        f"got {name!r}")


def run_folder(cfg: Config) -> Path:
    """``run.out_dir / run.name``, with ``~`` in ``run.out_dir`` expanded."""
    return Path(cfg.run.out_dir).expanduser() / cfg.run.name


def validate(cfg: Config) -> None:
    """Cross-field checks that the types alone do not catch."""
    for key, expected, ok in _RANGES:
        value = _value_at(cfg, key)
        if not ok(value):
            raise HawqError(f"{key} must be {expected}, got {value!r}")
    check_run_name(cfg.run.name)
    if cfg.sensitivity.max_probes < cfg.sensitivity.min_probes:
        raise HawqError(f"sensitivity.max_probes ({cfg.sensitivity.max_probes}) must be >= sensitivity.min_probes "
                        f"({cfg.sensitivity.min_probes})")
    stages = set(cfg.run.stages)
    from hawq.train.loop import validate_config  # the trainer's own checks, now rather than mid-run

    if cfg.train.epochs > 0 and "finetune" in stages:
        validate_config(cfg.train)
    m = cfg.model
    if m.checkpoint is None and m.weights is None and m.pretrain_epochs > 0:  # the pipeline's pretraining
        validate_config(dataclasses.replace(cfg.train, epochs=m.pretrain_epochs, lr=m.pretrain_lr))
    if "export" in stages and (cfg.export.onnx or cfg.export.onnx_integer):
        from hawq.export.config import check_opset

        check_opset(cfg.export.onnx_opset, "export.onnx_opset")
    if cfg.sensitivity.bn_mode not in ("eval", "train"):
        raise HawqError(f"sensitivity.bn_mode must be 'eval' or 'train', got '{cfg.sensitivity.bn_mode}'")
    if cfg.sensitivity.estimator not in ("auto", "hutchinson"):
        raise HawqError(f"sensitivity.estimator must be 'auto' or 'hutchinson', got '{cfg.sensitivity.estimator}'")
    directions = cfg.sensitivity.exact_directions
    if directions is not None and (isinstance(directions, bool) or not isinstance(directions, int) or directions < 1):
        raise HawqError(f"sensitivity.exact_directions must be null or an integer >= 1, got {directions!r}")
    if cfg.sensitivity.variance_reduction not in ("nystrom", "gauss_newton", "none"):
        raise HawqError("sensitivity.variance_reduction must be 'nystrom', 'gauss_newton' or 'none', "
                        f"got '{cfg.sensitivity.variance_reduction}'")
    if cfg.sensitivity.hvp_method not in ("auto", "autograd", "finite_difference"):
        raise HawqError("sensitivity.hvp_method must be 'auto', 'autograd' or 'finite_difference', "
                        f"got '{cfg.sensitivity.hvp_method}'")
    if cfg.sensitivity.normalize not in ("per_param", "none"):
        raise HawqError(f"sensitivity.normalize must be 'per_param' or 'none', got '{cfg.sensitivity.normalize}'")
    for key in ("batches", "batch_size", "spectrum_batches"):  # probes: _RANGES and max >= min above
        if getattr(cfg.sensitivity, key) < 1:
            raise HawqError(f"sensitivity.{key} must be >= 1")
    check_rounding(cfg.quant)
    if cfg.train.optimizer not in ("sgd", "adamw"):
        raise HawqError(f"train.optimizer must be 'sgd' or 'adamw', got '{cfg.train.optimizer}'")
    valid_stages = ["sensitivity", "search", "quantize", "finetune", "export"]
    for s in cfg.run.stages:
        if s not in valid_stages:
            close = difflib.get_close_matches(s, valid_stages, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise HawqError(f"run.stages: unknown stage '{s}'{hint}")
    for name, value in vars(cfg.search.budget).items():
        if value is not None and value <= 0:
            raise HawqError(f"search.budget.{name} must be positive, got {value}")
    if "search" in cfg.run.stages:
        from hawq.search.allocate import validate_search_config

        validate_search_config(cfg.search, None)  # pins and ties name layers: checked once the model exists


def save_config(cfg: Config, path: str | Path) -> None:
    from hawq.bitmap import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
