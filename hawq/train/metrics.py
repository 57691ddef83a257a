"""Per-epoch training history: ``run_dir/metrics.json`` and a training-curve PNG."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from hawq import HawqError
from hawq.bitmap import atomic_write_text


def read_metrics(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        return {"rows": []}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise HawqError(f"{path} is not valid JSON ({e}); delete it to start a fresh history") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows", []), list):
        raise HawqError(f"{path}: expected {{\"rows\": [...]}}")
    data.setdefault("rows", [])
    return data


def write_history(path: str | os.PathLike, tag: str, history: Sequence[dict]) -> None:
    """Replace the rows of ``tag`` in ``metrics.json`` with ``history`` (other tags' rows are kept).

    Rewriting a tag's rows as a whole keeps the file free of duplicates when a run resumes.
    """
    data = read_metrics(path)
    rows = [r for r in data["rows"] if r.get("tag") != tag]
    rows.extend({**row, "tag": tag} for row in history)
    data["rows"] = rows
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def plot_history(history: Sequence[dict], png_path: str | os.PathLike, title: str | None = None) -> Path:
    """Training curve: mean train loss per epoch (left axis) and every other numeric metric (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise HawqError("plot_history: the history is empty (no epoch finished)")
    x = [row.get("epoch_float", row.get("epoch", i + 1)) for i, row in enumerate(history)]
    skip = {"tag", "epoch", "epoch_float", "step", "loss", "lr", "time_s", "n"}
    metric_keys = [k for k in history[-1] if k not in skip and isinstance(history[-1][k], (int, float))
                   and not isinstance(history[-1][k], bool)]
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, [row.get("loss", math.nan) for row in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    handles, labels = ax.get_legend_handles_labels()
    if metric_keys:
        ax2 = ax.twinx()
        for i, key in enumerate(metric_keys):
            ax2.plot(x, [row.get(key, math.nan) for row in history], "s--", color=f"C{i + 1}", label=key)
        ax2.set_ylabel(", ".join(metric_keys))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="center right", fontsize="small")
    ax.set_title(title or f"training: {history[-1].get('tag', '')}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path
