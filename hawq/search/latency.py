"""Per-layer latency tables (built by scripts/build_latency_table.py) for the ILP's latency budget.

JSON layout::

    {"device": "cpu: <model name>", "torch": "2.x", "cpu_info": {...}, "threads": 1,
     "notes": [...], "layers": {"conv1": {"fp32": 0.12, "w8a8": 0.05, "w4a8": 0.05, ...}}}

Times are milliseconds per example (batch 1). A layer's entry for option ``(w, a)`` is the key
``w{w}a{a}``; options wider than 8 bits fall back to ``fp32`` when no exact key exists (no integer
kernels above 8 bits on CPU).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hawq import HawqError

INT_KERNEL_MAX_BITS = 8


def latency_key(weight_bits: int, activation_bits: int) -> str:
    return f"w{weight_bits}a{activation_bits}"


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def current_device(device: str = "cpu") -> str:
    """The identity a table is checked against: kind plus the processor's model name."""
    if device.startswith("cuda"):
        import torch

        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model_name()}"


@dataclass
class LatencyTable:
    device: str
    layers: dict[str, dict[str, float]]
    torch_version: str = ""
    cpu_info: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    path: str | None = None

    def layer_ms(self, layer: str, weight_bits: int, activation_bits: int) -> float:
        where = self.path or "the table"
        if layer not in self.layers:
            raise HawqError(f"search.latency_table: no entry for layer '{layer}' in {where}")
        row = self.layers[layer]
        key = latency_key(weight_bits, activation_bits)
        if key in row:
            return float(row[key])
        if max(weight_bits, activation_bits) > INT_KERNEL_MAX_BITS and "fp32" in row:
            return float(row["fp32"])
        raise HawqError(f"search.latency_table: no '{key}' entry for layer '{layer}' in {where}")

    def to_dict(self) -> dict:
        return {"device": self.device, "torch": self.torch_version, "cpu_info": self.cpu_info,
                "notes": self.notes, "layers": self.layers}


def latency_table_from_dict(data: Mapping, path: str | None = None) -> LatencyTable:
    where = f"latency table {path}" if path else "latency table"
    if not isinstance(data, Mapping) or not isinstance(data.get("layers"), Mapping):
        raise HawqError(f"{where}: expected a JSON object with 'device' and 'layers'")
    if not isinstance(data.get("device"), str):
        raise HawqError(f"{where}: missing 'device'")
    layers: dict[str, dict[str, float]] = {}
    for name, row in data["layers"].items():
        if not isinstance(row, Mapping):
            raise HawqError(f"{where}: layer '{name}' must map precision keys to milliseconds")
        clean = {}
        for key, ms in row.items():
            if isinstance(ms, bool) or not isinstance(ms, (int, float)) or ms < 0:
                raise HawqError(f"{where}: layer '{name}' key '{key}' must be a number >= 0, got {ms!r}")
            clean[str(key)] = float(ms)
        layers[str(name)] = clean
    return LatencyTable(device=data["device"], layers=layers, torch_version=str(data.get("torch", "")),
                        cpu_info=dict(data.get("cpu_info", {}) or {}),
                        notes=list(data.get("notes", []) or []), path=path)


def load_latency_table(path: str | os.PathLike, device: str | None = None,
                       check_device: bool = True) -> LatencyTable:
    """Read a table and check it was measured on this device (``device`` defaults to this CPU)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HawqError(f"search.latency_table: file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise HawqError(f"search.latency_table: {path} is not valid JSON "
                        f"({e.msg} at line {e.lineno})") from None
    table = latency_table_from_dict(data, str(path))
    if check_device:
        here = device if device is not None else current_device()
        if table.device != here:
            raise HawqError(f"search.latency_table: {path} was measured on '{table.device}', "
                            f"this device is '{here}' (rebuild it with scripts/build_latency_table.py)")
    return table
