"""Results table of issue 7: uniform vs random vs HAWQ bit maps on Fashion-MNIST, over seeds.

For each size budget (the size of uniform N-bit weights, N in --budgets) and each seed, three weight
bit maps of the same size are quantized (activations 8 bits), evaluated, finetuned with the same
budget (--finetune-epochs) and evaluated again:

* uniform: every layer at N bits;
* random:  a bit map drawn uniformly among the *maximal* maps that meet the budget (no layer can be
  widened without breaking it), so it uses the budget about as fully as the ILP's answer does;
* hawq:    the HAWQ-V3 ILP on Hessian traces (computed once per seed, shared by every budget).

Every stage is the pipeline's own (hawq.pipeline.STAGES). Each finished (seed, budget, method) cell is
written to ``results_fashion.json`` at once and skipped when the script runs again, so an
interrupted run resumes. The table goes to stdout and to ``results_fashion.md``; the bar chart to
``results_fashion.png``.

    python scripts/results_fashion.py --seeds 3 --budgets 2,3,4 --finetune-epochs 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hawq import HawqError  # noqa: E402
from hawq.bitmap import BitMap, LayerBits, bitmap_to_dict  # noqa: E402
from hawq.config import Config, load_config  # noqa: E402
from hawq.keys import config_key  # noqa: E402
from hawq.quant.stage import quantized_copy  # noqa: E402
from hawq.run import (  # noqa: E402
    Run,
    build_model_and_data,
    digest,
    example_forward,
    read_json,
    seed_everything,
    write_json,
)
from hawq.search import SearchProblem, build_search_problem, layer_costs, solve_problem  # noqa: E402
from hawq.search.allocate import resolve_budgets  # noqa: E402
from hawq.search.ilp import tie_groups  # noqa: E402
from hawq.search.stage import uniform_bits_same_size  # noqa: E402
from hawq.sensitivity.stage import stage_sensitivity  # noqa: E402
from hawq.train.stage import stage_finetune  # noqa: E402

log = logging.getLogger("hawq.results")

METHODS = ("uniform", "random", "hawq")
# Above this many candidate maps the random allocation fills greedily instead of enumerating.
MAX_ENUMERATED_MAPS = 2**21


# ---------------------------------------------------------------------------------------------
# random allocation at a budget


def random_allocation(problem: SearchProblem, budgets: Mapping[str, float], seed: int) -> BitMap:
    """A random bit map meeting ``budgets``, drawn among the maximal ones (none can be widened).

    With at most ``MAX_ENUMERATED_MAPS`` candidate maps (one option per tie group) every map is
    enumerated and one is drawn uniformly among the feasible maximal ones. Above that, layers are
    widened one random step at a time while the budgets hold (also maximal, not exactly uniform).
    Raises ``HawqError`` when no map meets the budgets.
    """
    groups = tie_groups(problem.layers, problem.ties)
    options = []
    for g in groups:
        common = set(problem.objective[g[0]]).intersection(*(problem.objective[n] for n in g[1:]))
        options.append(sorted(common))
    names = list(budgets)
    # usage[r][gi][oi]: what option oi of group gi adds to resource r
    usage = [[np.array([sum(problem.resources[r][n][o] for n in g) for o in opts]) for g, opts in
              zip(groups, options, strict=True)] for r in names]
    limit = np.array([budgets[r] - problem.offsets.get(r, 0.0) for r in names])
    tol = 1e-9 * np.maximum(np.abs(np.array([budgets[r] for r in names])), 1.0)
    rng = np.random.default_rng(seed)
    n_maps = int(np.prod([len(o) for o in options], dtype=np.float64))
    if n_maps <= MAX_ENUMERATED_MAPS:
        picks = _enumerate_maximal(usage, limit, tol, [len(o) for o in options])
        if len(picks) == 0:
            raise HawqError(f"random allocation: no bit map meets the budgets {dict(budgets)}")
        choice_idx = picks[rng.integers(len(picks))]
    else:
        choice_idx = _greedy_fill(usage, limit, tol, [len(o) for o in options], rng)
    bits: BitMap = {}
    for g, opts, oi in zip(groups, options, choice_idx, strict=True):
        w, a = opts[int(oi)]
        bits.update({n: LayerBits(w, a) for n in g})
    return {n: bits[n] for n in problem.layers}


def _enumerate_maximal(usage: list[list[np.ndarray]], limit: np.ndarray, tol: np.ndarray,
                       sizes: list[int]) -> np.ndarray:
    idx = np.indices(sizes, dtype=np.int8).reshape(len(sizes), -1)  # (groups, maps): every combination
    slack = np.empty((len(usage), idx.shape[1]))  # (resources, maps): budget left by each map
    for ri, u in enumerate(usage):
        slack[ri] = limit[ri] - sum(u[gi][idx[gi]] for gi in range(len(sizes)))
    keep = np.all(slack >= -tol[:, None], axis=0)
    idx, slack = idx[:, keep], slack[:, keep]
    maximal = np.ones(idx.shape[1], dtype=bool)
    for gi, s in enumerate(sizes):
        # Options are sorted by (weight, activation) bits: a map is not maximal when some wider
        # option of one group fits in what the map leaves of every budget.
        for oi in range(1, s):
            wider = idx[gi] < oi
            fits = np.all([u[gi][oi] - u[gi][idx[gi]] <= slack[ri] + tol[ri] for ri, u in enumerate(usage)],
                          axis=0)
            maximal &= ~(wider & fits)
    return idx[:, maximal].T


def _greedy_fill(usage: list[list[np.ndarray]], limit: np.ndarray, tol: np.ndarray, sizes: list[int],
                 rng: np.random.Generator) -> list[int]:
    choice = [0] * len(sizes)

    def total() -> np.ndarray:
        return np.array([sum(u[gi][choice[gi]] for gi in range(len(sizes))) for u in usage])

    if np.any(total() > limit + tol):
        raise HawqError("random allocation: no bit map meets the budgets (even the narrowest overflows)")
    while True:
        cur = total()
        movable = [gi for gi in range(len(sizes)) if choice[gi] + 1 < sizes[gi] and np.all(
            cur - np.array([u[gi][choice[gi]] for u in usage])
            + np.array([u[gi][choice[gi] + 1] for u in usage]) <= limit + tol)]
        if not movable:
            return choice
        choice[movable[int(rng.integers(len(movable)))]] += 1


# ---------------------------------------------------------------------------------------------
# statistics and formatting


def mean_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std (0 for one value), min and max."""
    vals = [float(v) for v in values]
    if not vals:
        raise HawqError("mean_spread: no values")
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt_stat(s: Mapping[str, float] | None, digits: int = 2) -> str:
    if s is None:
        return "—"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (n=1)"
    return (f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} "
            f"({s['min']:.{digits}f}..{s['max']:.{digits}f}, n={s['n']})")


def _seed_run(run: Run, base: Config, seed: int, budget_bits: int | None = None) -> Run:
    """``run`` with its config's seed (and size budget) replaced; data and FP32 model are shared."""
    cfg = copy.deepcopy(base)
    cfg.run = dataclasses.replace(cfg.run, seed=seed)
    if budget_bits is not None:
        cfg.search = dataclasses.replace(cfg.search, budget=dataclasses.replace(
            cfg.search.budget, size_uniform_bits=budget_bits, size_mb=None))
    return dataclasses.replace(run, cfg=cfg, results=dict(run.results), timings={})


def evaluate_cell(run: Run, bits: BitMap, work_dir: Path) -> dict[str, Any]:
    """Quantize, evaluate, finetune (``run.cfg.train``) and evaluate again one bit map."""
    t0 = time.perf_counter()
    seed_everything(run.cfg.run.seed)
    model = quantized_copy(run, bits)
    before = run.evaluate(model, "eval before")
    after = None
    if run.cfg.train.epochs > 0:
        cell_run = dataclasses.replace(run, run_dir=work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        history = stage_finetune(cell_run, model, bits)
        # the loop evaluated the final model on the test split after its last (partial) epoch
        after = {k[len("test_"):]: float(v) for k, v in history[-1].items() if k.startswith("test_")}
        shutil.rmtree(work_dir, ignore_errors=True)  # only the numbers are kept
    return {"before": run.primary(before), "after": None if after is None else run.primary(after),
            "before_metrics": before, "after_metrics": after, "seconds": round(time.perf_counter() - t0, 1)}


def settings_key(cfg: Config) -> dict[str, Any]:
    """What every cell depends on apart from its seed, budget and method."""
    keep = {k: v for k, v in config_key(cfg).items() if k in ("model", "data", "sensitivity", "quant",
                                                                   "train")}
    keep["search"] = {k: v for k, v in config_key(cfg.search).items() if k not in ("budget", "pareto_points")}
    # whole-model spectrum summaries do not change the traces, hence no cell
    keep["sensitivity"] = {k: v for k, v in keep["sensitivity"].items()
                           if k not in ("top_eigen", "density_iter", "spectrum_batches")}
    return {"digest": digest(keep), "config": keep}


def run_results(cfg: Config, seeds: Sequence[int], budgets: Sequence[int], out_dir: Path,
                name: str = "results_fashion", progress: bool = True,
                on_cell: Callable[[str, dict], None] | None = None,
                config_dir: Path | None = None) -> dict[str, Any]:
    """Fill ``out_dir/<name>.json`` with every (seed, budget, method) cell; return its content.

    Cells already in the file are skipped when the file was written with the same settings
    (``settings_key``); with other settings it raises ``HawqError`` (use another ``out_dir``).
    """
    if not seeds or not budgets:
        raise HawqError("results: need at least one seed and one budget")
    for b in budgets:
        if b not in cfg.search.weight_bits:
            raise HawqError(f"results: budget {b} bits is not one of search.weight_bits {cfg.search.weight_bits}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    key = settings_key(cfg)
    data = read_json(path) if path.exists() else None
    if data is not None and data.get("settings", {}).get("digest") != key["digest"]:
        raise HawqError(f"{path} was written with other settings; pass another --out folder or delete it")
    if data is None:
        data = {"settings": key, "fp32": None, "cells": {}, "bits": {}, "sizes_mb": {}}

    base = copy.deepcopy(cfg)
    base.run = dataclasses.replace(base.run, seed=0, progress=progress)
    # Data subsets and the FP32 model are built once (seed 0): every seed is tested on the same images.
    run = build_model_and_data(base, out_dir / "work", config_dir)
    run.task.bind_reference(run.fp32)
    if data["fp32"] is None:
        data["fp32"] = run.primary(run.evaluate(run.fp32, "eval fp32"))
        write_json(path, data)
    from hawq.search import model_size_mb

    data["fp32_size_mb"] = model_size_mb(run.fp32, 32)
    for seed in seeds:
        seed_dir = out_dir / "work" / f"seed{seed}"
        todo = [(b, m) for b in budgets for m in METHODS if f"seed{seed}/w{b}/{m}" not in data["cells"]]
        if not todo:
            continue
        srun = _seed_run(run, base, seed, budgets[0])
        srun.run_dir = seed_dir
        seed_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(seed)
        traces = stage_sensitivity(srun)  # traces.json in seed_dir: reused when the run resumes
        costs = layer_costs(run.fp32, example_forward(srun), run.layers)
        problem = build_search_problem(run.fp32, traces, costs, srun.cfg.search,
                                       per_channel=cfg.quant.per_channel, group_size=cfg.quant.group_size,
                                       progress=progress)
        done_maps: dict[str, str] = {}  # digest of a bit map -> the cell that already measured it
        for b in budgets:
            brun = _seed_run(run, base, seed, b)
            budget_values = resolve_budgets(problem, brun.cfg.search)
            hawq_bits = solve_problem(problem, budget_values).bits
            maps = {"hawq": hawq_bits, "uniform": uniform_bits_same_size(brun, hawq_bits)[1],
                    "random": random_allocation(problem, budget_values, seed=1000 * seed + b)}
            for m in METHODS:
                cell = f"seed{seed}/w{b}/{m}"
                bits = maps[m]
                size = model_size_mb(run.fp32, bits, run.layers, cfg.quant.per_channel, cfg.quant.group_size)
                if size > budget_values["size_mb"] * (1 + 1e-9):
                    raise HawqError(f"results: {cell} map is {size:.6f} MB, over the budget "
                                    f"{budget_values['size_mb']:.6f} MB")
                data["bits"][cell] = {n: lb.weight for n, lb in bits.items()}
                data["sizes_mb"][cell] = {"size_mb": size, "budget_mb": budget_values["size_mb"]}
                map_key = digest(bitmap_to_dict(bits))
                if cell in data["cells"]:
                    done_maps.setdefault(map_key, cell)
                    continue
                if map_key in done_maps:  # same map, same seed: the same (deterministic) numbers
                    result = {**data["cells"][done_maps[map_key]], "same_map_as": done_maps[map_key]}
                else:
                    log.info("results: %s", cell)
                    result = evaluate_cell(brun, bits, seed_dir / f"w{b}_{m}")
                    done_maps[map_key] = cell
                data["cells"][cell] = result
                write_json(path, data)
                if on_cell is not None:
                    on_cell(cell, result)
    return data


# ---------------------------------------------------------------------------------------------
# summary: table, claims, chart


def summarize(data: Mapping[str, Any], seeds: Sequence[int], budgets: Sequence[int]) -> dict[str, Any]:
    """Per (budget, method): mean/spread of before/after over ``seeds`` and the mean size."""
    rows = {}
    for b in budgets:
        for m in METHODS:
            cells = [data["cells"][f"seed{s}/w{b}/{m}"] for s in seeds if f"seed{s}/w{b}/{m}" in data["cells"]]
            if not cells:
                continue
            afters = [c["after"] for c in cells if c["after"] is not None]
            sizes = [data["sizes_mb"][f"seed{s}/w{b}/{m}"]["size_mb"] for s in seeds
                     if f"seed{s}/w{b}/{m}" in data["cells"]]
            rows[f"w{b}/{m}"] = {"budget_bits": b, "method": m, "size_mb": statistics.fmean(sizes),
                                 "budget_mb": data["sizes_mb"][f"seed{seeds[0]}/w{b}/{m}"]["budget_mb"]
                                 if f"seed{seeds[0]}/w{b}/{m}" in data["sizes_mb"] else None,
                                 "before": mean_spread([c["before"] for c in cells]),
                                 "after": mean_spread(afters) if afters else None}
    return rows


def markdown_table(data: Mapping[str, Any], rows: Mapping[str, Any]) -> str:
    size = f" (size {data['fp32_size_mb']:.4f} MB)" if data.get("fp32_size_mb") else ""
    lines = [f"FP32 top-1: {data['fp32']:.2f}{size}", "",
             "| size budget | method | size (MB) | top-1 before finetune | top-1 after finetune |",
             "|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| uniform {r['budget_bits']}-bit ({r['budget_mb']:.4f} MB) | {r['method']} | "
                     f"{r['size_mb']:.4f} | {fmt_stat(r['before'])} | {fmt_stat(r['after'])} |")
    return "\n".join(lines)


def check_claims(data: Mapping[str, Any], rows: Mapping[str, Any], budgets: Sequence[int],
                 tolerance: float = 0.5) -> list[tuple[bool, str]]:
    """Issue 7's claims on the means: HAWQ > uniform and > random before finetuning at every budget;
    HAWQ after finetuning within ``tolerance`` points of FP32 at the 3-bit budget."""
    out = []
    for b in budgets:
        h, u, r = (rows.get(f"w{b}/{m}") for m in ("hawq", "uniform", "random"))
        if h is None or u is None or r is None:
            out.append((False, f"budget {b}-bit: cells missing"))
            continue
        hb, ub, rb = h["before"]["mean"], u["before"]["mean"], r["before"]["mean"]
        same = (f" (identical maps: only uniform {b}-bit meets this budget)"
                if all(data["bits"][f"seed{s}/w{b}/hawq"] == data["bits"][f"seed{s}/w{b}/uniform"]
                       == data["bits"][f"seed{s}/w{b}/random"] for s in _seeds_of(data, b)) else "")
        out.append((hb > ub and hb > rb, f"budget {b}-bit, before finetune: HAWQ {hb:.2f} vs uniform "
                                         f"{ub:.2f}, random {rb:.2f}{same}"))
    h3 = rows.get("w3/hawq")
    if h3 is not None and h3["after"] is not None:
        gap = data["fp32"] - h3["after"]["mean"]
        out.append((gap <= tolerance, f"budget 3-bit, after finetune: HAWQ {h3['after']['mean']:.2f} vs FP32 "
                                      f"{data['fp32']:.2f} (gap {gap:.2f}, allowed {tolerance})"))
    else:
        out.append((False, "budget 3-bit after finetune: not measured (3 not in --budgets or no finetune)"))
    return out


def _seeds_of(data: Mapping[str, Any], b: int) -> list[int]:
    return sorted({int(k.split("/")[0][4:]) for k in data["cells"] if k.split("/")[1] == f"w{b}"})


def plot(rows: Mapping[str, Any], fp32: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget_bits"] for r in rows.values()})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    width = 0.8 / len(METHODS)
    for ax, phase in zip(axes, ("before", "after"), strict=True):
        for i, m in enumerate(METHODS):
            xs, ys, es = [], [], []
            for j, b in enumerate(budgets):
                r = rows.get(f"w{b}/{m}")
                if r is None or r[phase] is None:
                    continue
                xs.append(j + (i - (len(METHODS) - 1) / 2) * width)
                ys.append(r[phase]["mean"])
                es.append(r[phase]["std"])
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=m)
        ax.axhline(fp32, color="k", ls="--", lw=1, label="FP32")
        ax.set_xticks(range(len(budgets)), [f"size of uniform {b}-bit" for b in budgets])
        ax.set_title(f"top-1 {phase} finetuning")
        ax.grid(axis="y", alpha=0.3)
    lo = min(r[p]["min"] for r in rows.values() for p in ("before", "after") if r[p] is not None)
    axes[0].set_ylim(max(0.0, lo - 5), min(100.0, fp32 + 3))
    axes[0].set_ylabel("top-1 (%)")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(data: Mapping[str, Any], seeds: Sequence[int], budgets: Sequence[int], out_dir: Path,
                  name: str, command: str, png: bool = True) -> tuple[str, list[tuple[bool, str]]]:
    rows = summarize(data, seeds, budgets)
    claims = check_claims(data, rows, budgets)
    table = markdown_table(data, rows)
    claim_lines = [f"{'PASS' if ok else 'FAIL'}  {text}" for ok, text in claims]
    md = "\n".join([f"# {name}", "", f"`{command}`", "", f"seeds: {list(seeds)}", "", table, "",
                    "Claims (on the means):", "", *[f"- {c}" for c in claim_lines], ""])
    (out_dir / f"{name}.md").write_text(md)
    write_json(out_dir / f"{name}_summary.json", {"fp32": data["fp32"], "rows": rows,
                                                  "claims": [{"pass": ok, "text": t} for ok, t in claims]})
    if png:
        plot(rows, data["fp32"], out_dir / f"{name}.png")
    return table, claims


# ---------------------------------------------------------------------------------------------
# CLI


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HawqError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise HawqError(f"{what}: empty list")
    return values


def build_config(config: str, overrides: Sequence[str], finetune_epochs: float, test_subset: int | None,
                 train_subset: int | None, max_probes: int | None, threads: int | None) -> Config:
    # The whole-model spectrum (eigenvalues, density) is not used by any table here: off unless --set.
    over = ["sensitivity.top_eigen=0", "sensitivity.density_iter=0", *overrides]
    if test_subset is not None:
        over.append(f"data.test_subset={test_subset}")
    if train_subset is not None:
        over.append(f"data.train_subset={train_subset}")
    if max_probes is not None:
        over += [f"sensitivity.max_probes={max_probes}",
                 f"sensitivity.min_probes={min(max_probes, 16)}"]
    if threads is not None:
        over.append(f"run.threads={threads}")
    cfg = load_config(config, over)
    if finetune_epochs < 0:
        raise HawqError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    cfg.train = dataclasses.replace(cfg.train, epochs=finetune_epochs)
    cfg.run = dataclasses.replace(cfg.run, device="cpu" if cfg.run.device == "auto" and
                                  not torch.cuda.is_available() else cfg.run.device)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs/fashion_resnet.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--budgets", default="2,3,4", help="size budgets as uniform weight bits, e.g. 2,3,4")
    p.add_argument("--finetune-epochs", type=float, default=1.0, help="same for every method; 0 = none")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on N test images (fixed subset)")
    p.add_argument("--train-subset", type=int, default=None, help="finetune/calibrate on N training images")
    p.add_argument("--max-probes", type=int, default=None, help="Hutchinson probes per trace (sensitivity)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/results_fashion")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the table/claims/chart from the cells already in the JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        if args.seeds < 1:
            raise HawqError(f"--seeds must be >= 1, got {args.seeds}")
        budgets = parse_int_list(args.budgets, "--budgets")
        cfg = build_config(args.config, args.set, args.finetune_epochs, args.test_subset, args.train_subset,
                           args.max_probes, args.threads)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        seeds = list(range(args.seeds))
        out_dir = Path(args.out)

        def show(cell: str, r: dict) -> None:
            after = "—" if r["after"] is None else f"{r['after']:.2f}"
            print(f"{cell}: before {r['before']:.2f} after {after} ({r['seconds']}s)", flush=True)

        if args.report_only:
            data = read_json(out_dir / "results_fashion.json")
            if data is None:
                raise HawqError(f"--report-only: no readable {out_dir / 'results_fashion.json'}")
            seeds = [s for s in seeds if any(k.startswith(f"seed{s}/") for k in data["cells"])]
            if not seeds:
                raise HawqError("--report-only: no finished cell for these seeds")
        else:
            data = run_results(cfg, seeds, budgets, out_dir, progress=not args.no_progress, on_cell=show,
                               config_dir=Path(args.config).resolve().parent)
        # the command that computed the cells (a --report-only rerun just rebuilds the table)
        command = "python scripts/results_fashion.py " + " ".join(
            a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only")
        table, claims = write_outputs(data, seeds, budgets, out_dir, "results_fashion", command)
    except HawqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print()
    for ok, text in claims:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    print(f"\nwrote {out_dir}/results_fashion.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
