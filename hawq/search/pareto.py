"""Pareto sweep: the ILP re-solved over a range of one budget, written as CSV + PNG."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from hawq import HawqError, bars_off
from hawq.bitmap import atomic_write_text
from hawq.search.allocate import SearchProblem, solve_problem
from hawq.search.ilp import InfeasibleBudget, evaluate, minimum_usage

CSV_COLUMNS = ("kind", "label", "budget_resource", "budget", "perturbation", "size_mb", "bops_g", "latency_ms",
               "mean_weight_bits", "mean_activation_bits", "status", "solve_time_s")


def _row(problem: SearchProblem, choice: Mapping, kind: str, label: str, resource: str, budget: float | None,
         status: str, solve_time_s: float) -> dict:
    usage = problem.usage(choice)
    total = sum(problem.weight_numel[n] for n in problem.layers) or 1
    return {
        "kind": kind, "label": label, "budget_resource": resource, "budget": budget,
        "perturbation": evaluate(problem.objective, choice),
        "size_mb": usage.get("size_mb"), "bops_g": usage.get("bops_g"), "latency_ms": usage.get("latency_ms"),
        # parameter-weighted means: what the size axis actually sees
        "mean_weight_bits": sum(choice[n][0] * problem.weight_numel[n] for n in problem.layers) / total,
        "mean_activation_bits": sum(choice[n][1] for n in problem.layers) / len(problem.layers),
        "status": status, "solve_time_s": solve_time_s,
    }


def pareto_sweep(problem: SearchProblem, n_points: int = 20, resource: str = "size_mb",
                 keep_other_budgets: bool = True, progress: bool = True) -> list[dict]:
    """Solve ``problem`` at ``n_points`` budgets of ``resource`` evenly spaced from its smallest
    reachable value to its value at top precision; the problem's other budgets stay in force
    unless ``keep_other_budgets=False`` (then the rows trace the front of ``resource`` alone).

    Returns one row per point (columns :data:`CSV_COLUMNS`); a point that the other budgets make
    infeasible gets ``status="infeasible"`` and no usage.
    """
    if resource not in problem.resources:
        raise HawqError(f"pareto_sweep: unknown resource '{resource}' (have {', '.join(problem.resources)})")
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
        raise HawqError(f"pareto_sweep: n_points must be an integer >= 2, got {n_points!r}")
    lo = minimum_usage(problem.objective, {resource: problem.resources[resource]}, problem.offsets,
                       problem.ties)[resource]
    hi = problem.usage(problem.top_choice())[resource]
    rows = []
    for i in tqdm(range(n_points), desc=f"pareto {resource}", disable=bars_off(progress)):
        budget = lo + (hi - lo) * i / (n_points - 1)
        budgets = {**(problem.budgets if keep_other_budgets else {}), resource: budget}
        try:
            alloc = solve_problem(problem, budgets)
        except InfeasibleBudget:
            rows.append({c: None for c in CSV_COLUMNS} | {"kind": "ilp", "label": f"point {i}",
                                                          "budget_resource": resource, "budget": budget,
                                                          "status": "infeasible"})
            continue
        choice = {n: (b.weight, b.activation) for n, b in alloc.bits.items()}
        rows.append(_row(problem, choice, "ilp", f"point {i}", resource, budget, alloc.status, alloc.solve_time_s))
    return rows


def uniform_points(problem: SearchProblem, weight_bits: Sequence[int] | None = None) -> list[dict]:
    """Every free layer at ``w`` weight bits and its widest activation option at that width (``w``
    itself with ``couple_activation``); pinned layers keep their pins. Default: every weight option."""
    options = {n: list(problem.objective[n]) for n in problem.layers}
    all_w = sorted({w for opts in options.values() for w, _ in opts})
    rows = []
    for w in (all_w if weight_bits is None else weight_bits):
        choice = {}
        for n, opts in options.items():
            if len(opts) == 1:
                choice[n] = opts[0]
                continue
            at_w = [o for o in opts if o[0] == w]
            if not at_w:
                break
            choice[n] = max(at_w)
        if len(choice) != len(options):
            continue  # w is not an option of every free layer
        a = sorted({choice[n][1] for n in options if len(options[n]) > 1})
        label = f"W{w}A{a[0]}" if len(a) == 1 else f"W{w}"
        rows.append(_row(problem, choice, "uniform", label, "", None, "uniform", 0.0))
    return rows


def write_pareto(rows: Sequence[Mapping], csv_path: str | os.PathLike, png_path: str | os.PathLike | None = None,
                 uniform_points: Sequence[Mapping] = ()) -> None:
    """CSV of the sweep (and the uniform points, ``kind=uniform``) plus a two-panel plot:
    perturbation vs size (MB) and vs BOPS (G), uniform-precision points marked on both."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in [*rows, *uniform_points]:
        writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in CSV_COLUMNS})
    atomic_write_text(csv_path, buf.getvalue())
    if png_path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solved = sorted((r for r in rows if r.get("perturbation") is not None), key=lambda r: r["size_mb"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, xlabel in ((axes[0], "size_mb", "model size (MB)"), (axes[1], "bops_g", "BOPS (G)")):
        pts = sorted(solved, key=lambda r, key=key: r[key])
        swept = sorted({r["budget_resource"] for r in pts})
        ax.plot([r[key] for r in pts], [r["perturbation"] for r in pts], "o-", ms=3,
                label=f"ILP mixed precision ({', '.join(swept)} sweep)")
        for u in uniform_points:
            ax.plot(u[key], u["perturbation"], "s", color="tab:red", ms=6)
            ax.annotate(u["label"], (u[key], u["perturbation"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        if uniform_points:
            ax.plot([], [], "s", color="tab:red", label="uniform precision")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("sum trace/numel * ||Q(W)-W||^2")
        values = [r["perturbation"] for r in solved] + [u["perturbation"] for u in uniform_points]
        if values and min(values) > 0:  # perturbations span decades between 2 and 8 bits
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Hessian-weighted perturbation vs budget")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=png_path.parent, prefix=f".{png_path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


