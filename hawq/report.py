"""The run report: ``report.json`` (machine-readable), ``report.md`` and plots (for people).

``report.json`` always has ``primary_metric`` (e.g. ``top1``) and the generic keys
``fp32_score``, ``quant_score_before_finetune``, ``quant_score_after_finetune`` and
``uniform_score_same_size``; for classification the same values also appear as ``fp32_top1``,
``quant_top1_before_finetune``, ``quant_top1_after_finetune`` and ``uniform_top1_same_size``
(percent). Sizes are MB (2**20 bytes), BOPS in G (1e9).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from hawq.bitmap import BitMap, atomic_write_text
from hawq.run import Run, write_json
from hawq.search import bops_g, model_size_mb
from hawq.train import plot_history

SCORE_KEYS = {
    "fp32_top1": "fp32_score",
    "quant_top1_before_finetune": "quant_score_before_finetune",
    "quant_top1_after_finetune": "quant_score_after_finetune",
    "uniform_top1_same_size": "uniform_score_same_size",
}


# Metrics in percent (two decimals are 1e-4 of the range); the others (cosine similarity, Matthews
# correlation) live in [-1, 1], where two decimals hide the differences that matter.
PERCENT_METRICS = frozenset({"top1", "top5", "accuracy", "f1", "map", "map50", "map75",
                             "map_small", "map_medium", "map_large"})


def score_digits(metric: str) -> int:
    """Decimals the summary prints for ``metric``: 2 for percentages, 4 otherwise."""
    return 2 if metric in PERCENT_METRICS else 4


def quantized_size_mb(model: Any, bits: BitMap | int, layers: list[str], quant_config: Any) -> float:
    """The model size in MB with the scales the quantizer really stores (per channel, per tensor or
    per group), the same figure the bit search budgets and reports in ``search.json``."""
    return model_size_mb(model, bits, layers, per_channel=quant_config.per_channel,
                         group_size=quant_config.group_size)


def _trace_fields(t: Any) -> dict[str, float]:
    d = dataclasses.asdict(t) if dataclasses.is_dataclass(t) else dict(t)
    return {k: d[k] for k in ("mean", "std_err", "n", "numel") if k in d}


def build_report(run: Run, partial: dict[str, Any], traces: dict[str, Any] | None,
                 bits: BitMap | None) -> dict[str, Any]:
    """Combine the stage results into the report dictionary (pure: writes nothing)."""
    report: dict[str, Any] = {"run": run.cfg.run.name, "model": run.spec.name, "task": run.spec.task,
                              "primary_metric": run.task.primary_metric}
    metric = run.task.primary_metric
    for top1_key, score_key in SCORE_KEYS.items():
        if top1_key in partial:
            report[score_key] = partial[top1_key]
            if metric == "top1":
                report[top1_key] = partial[top1_key]
    report.update({k: v for k, v in partial.items() if k not in SCORE_KEYS})

    costs = run.results.get("costs")
    layers = []
    for name in run.layers:
        row: dict[str, Any] = {"name": name}
        if costs and name in costs:
            c = costs[name]
            row.update(kind=c.kind, params=c.params, macs=c.macs)
        if traces and name in traces:
            row["trace"] = _trace_fields(traces[name])
        if bits and name in bits:
            row.update(weight_bits=bits[name].weight, activation_bits=bits[name].activation)
        layers.append(row)
    report["layers"] = layers
    meta = run.results.get("sensitivity_meta")
    if meta:
        report["sensitivity"] = {k: v for k, v in meta.items() if k not in ("key", "density")}
        if "density" in meta:
            report["sensitivity"]["density_trace_estimate"] = meta["density"]["trace_estimate"]
    report["fp32_size_mb"] = model_size_mb(run.fp32, 32, run.layers)
    if costs:
        report["fp32_bops_g"] = bops_g(run.fp32, 32, costs=costs)
    if bits:
        report["bits"] = {n: b.as_dict() for n, b in bits.items()}
        report["size_mb"] = quantized_size_mb(run.fp32, bits, run.layers, run.cfg.quant)
        if costs:
            report["bops_g"] = bops_g(run.fp32, bits, costs=costs)
    return report


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e5):
            return f"{x:.3e}"
        return f"{x:.{digits}f}"
    return str(x)


def summary_table(report: dict[str, Any]) -> str:
    """The per-layer table plus totals, as printed at the end of a run and embedded in report.md."""
    rows = [("layer", "trace", "+-", "W bits", "A bits", "params")]
    for r in report["layers"]:
        t = r.get("trace", {})
        rows.append((r["name"], _fmt(t.get("mean")), _fmt(t.get("std_err")), _fmt(r.get("weight_bits")),
                     _fmt(r.get("activation_bits")), _fmt(r.get("params"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    metric = report.get("primary_metric", "score")
    d = score_digits(metric)
    totals = [
        ("size MB (fp32 -> quantized)", f"{_fmt(report.get('fp32_size_mb'), 4)} -> {_fmt(report.get('size_mb'), 4)}"),
        ("BOPS G (fp32 -> quantized)", f"{_fmt(report.get('fp32_bops_g'), 3)} -> {_fmt(report.get('bops_g'), 3)}"),
        (f"fp32 {metric}", _fmt(report.get("fp32_score"), d)),
        (f"uniform {report.get('uniform_weight_bits', '?')}-bit {metric} (same size, no finetune)",
         _fmt(report.get("uniform_score_same_size"), d)),
        (f"hawq {metric} before finetune", _fmt(report.get("quant_score_before_finetune"), d)),
        (f"hawq {metric} after finetune", _fmt(report.get("quant_score_after_finetune"), d)),
    ]
    width = max(len(k) for k, _ in totals)
    lines.append("")
    lines += [f"{k.ljust(width)}  {v}" for k, v in totals]
    return "\n".join(lines)


def plot_traces_and_bits(report: dict[str, Any], path: Path) -> None:
    """Per-layer trace (log scale bars) with the chosen weight bits on a second axis."""
    # local: the headless backend must be chosen before pyplot loads, and only a plot needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r for r in report["layers"] if "trace" in r]
    if not layers:
        return
    names = [r["name"] for r in layers]
    per_param = [max(r["trace"]["mean"] / max(r["trace"].get("numel", 1), 1), 1e-12) for r in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.2))
    ax.bar(range(len(names)), per_param, color="#4c72b0", label="Hessian trace / parameter")
    ax.set_yscale("log")
    ax.set_ylabel("trace / #params (log)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    if any("weight_bits" in r for r in layers):
        ax2 = ax.twinx()
        ax2.plot(range(len(names)), [r.get("weight_bits", math.nan) for r in layers], "o-", color="#dd8452",
                 label="weight bits")
        ax2.set_ylabel("weight bits")
        ax2.set_ylim(0, 9)
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
        ax.legend(lines, labels, loc="upper right", fontsize=8)
    ax.set_title(f"{report.get('model')}: sensitivity and bit allocation")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def markdown_report(report: dict[str, Any]) -> str:
    search = report.get("search") or {}
    parts = [
        f"# hawq report: {report.get('run')}",
        "",
        f"Model `{report.get('model')}` ({report.get('task')}), metric `{report.get('primary_metric')}`.",
        "",
        *(["**The FP32 model was never trained** (no checkpoint, no weights, `model.pretrain_epochs: 0`): its "
           "sensitivities and bit map carry no information.", ""] if report.get("fp32_weights") == "untrained"
          else []),
        "```",
        summary_table(report),
        "```",
        "",
    ]
    sens = report.get("sensitivity") or {}
    if sens:
        exact = sens.get("exact_layers") or []
        sampled = sens.get("sampled_layers") or []
        curvature = sens.get("curvature", "hessian")
        what = "Gauss-Newton traces" if curvature == "gauss_newton" else "Hessian traces"
        parts += ["## Sensitivity", "",
                  f"- {what} (curvature: {curvature}): {sens.get('batches')} batch(es) of {sens.get('batch_size')}, "
                  + (f"BN in {sens['bn_mode']} mode, " if sens.get("bn_mode") else "")
                  + f"{sens.get('seconds')} s on {sens.get('device')}"]
        if exact:
            why = ("" if curvature == "gauss_newton"
                   else ", the Gauss-Newton identity: the network is piecewise linear in the layer")
            parts.append(f"- exact{why}: {len(exact)} layer(s), {sens.get('backward_passes')} backward pass(es) "
                         "in all")
        if sampled:
            parts.append(f"- sampled output-space probes (estimator gn_sampled, unbiased, tol {sens.get('tol')}): "
                         f"{len(sampled)} layer(s), {sens.get('backward_passes')} backward pass(es) in all")
        choice = sens.get("output_space") or {}
        if choice.get("mode") and (exact or sampled):
            parts.append(f"- output space: {choice['mode']} ({choice.get('why') or 'the only option'})")
        for name, note in (sens.get("curvature_notes") or {}).items():
            parts.append(f"- `{name}`: {note}")
        if sens.get("hvps", 0) or not exact:
            parts.append(f"- Hutchinson: tol {sens.get('tol')}, at most {sens.get('max_probes')} probes per layer "
                         f"({sens.get('hvps', '?')} Hessian-vector products in all, variance reduction "
                         f"{sens.get('variance_reduction', 'none')})")
            per_sample = sens.get("per_sample_layers") or []
            if per_sample:
                parts.append(f"- independent probes per sample (the samples are independent in the loss): "
                             f"{len(per_sample)} layer(s)")
        if sens.get("top_eigenvalues"):
            parts.append(f"- top Hessian eigenvalues: {', '.join(_fmt(v, 4) for v in sens['top_eigenvalues'])}")
        if sens.get("density_trace_estimate") is not None:
            parts.append(f"- whole-model trace from the SLQ density: {_fmt(sens['density_trace_estimate'], 3)}")
        parts.append("")
    if search:
        parts += ["## Search", "",
                  f"- solver status: {search.get('status')}, objective {_fmt(search.get('objective'), 6)}, "
                  f"{_fmt(search.get('solve_time_s'), 3)} s",
                  f"- budgets: {search.get('budgets')}", f"- used: {search.get('usage')}"]
        parts += [f"- note: {n}" for n in search.get("notes") or []]
        parts.append("")
    export = report.get("export") or {}
    if export:
        parts += ["## Export", ""]
        if "safetensors" in export:
            st = export["safetensors"]
            parts.append(f"- `{st.get('path')}`: " + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in st.items()
                                                                if k != "path" and not isinstance(v, (dict, list))))
        for key, what in (("onnx", "ONNX QDQ vs the PyTorch fake-quant model"),
                          ("onnx_integer", "integer-only ONNX vs the PyTorch integer model")):
            item = export.get(key)
            if not item:
                continue
            if "path" in item:
                check = item.get("check") or {}
                if "check_error" in item:
                    parts.append(f"- `{item['path']}` ({what}): written; **check failed**: {item['check_error']}")
                    continue
                verdict = check.get("verdict")
                head = f"**{verdict.upper()}** ({check.get('verdict_reason')}); " if verdict else ""
                checks = ", ".join(f"{k} {_fmt(v, 4)}" for k, v in check.items()
                                   if k not in ("verdict", "verdict_reason"))
                parts.append(f"- `{item['path']}` ({what}): {head}{checks}")
            else:
                parts.append(f"- {key}: not written ({item.get('error') or item.get('skipped')})")
        parts.append("")
    if report.get("timings_s"):
        parts += ["## Timings (s)", "", "| stage | seconds |", "|---|---|"]
        parts += [f"| {k} | {v} |" for k, v in report["timings_s"].items()]
        parts.append("")
    plots = report.get("plots") or []
    if plots:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(parts)


def write_report(run: Run, report: dict[str, Any], traces: dict[str, Any] | None, bits: BitMap | None) -> None:
    """Write plots, metrics, report.md and, last, report.json (its presence marks a finished run)."""
    out = run.run_dir
    plots = []
    if traces:
        plot_traces_and_bits(report, out / "traces_bits.png")
        plots.append("traces_bits.png")
    if (out / "density.png").exists():
        plots.append("density.png")
    if (out / "pareto.png").exists():
        plots.append("pareto.png")
    history = report.get("history")
    if history:
        try:
            plot_history(history, out / "training.png")
            plots.append("training.png")
        except ImportError:
            pass
    report["plots"] = plots
    metrics = {k: report.get(k) for k in ("fp32", "quant_before_finetune", "uniform_same_size",
                                           "quant_after_finetune", "history")}
    write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", markdown_report(report))
    write_json(out / "report.json", report)
