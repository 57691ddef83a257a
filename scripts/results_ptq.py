"""Issue 16, sections 2 and 3: sensitivity criteria compared under one ILP, and the quadratic model checked.

Criteria (:mod:`hawq.sensitivity.criteria`): ``hessian`` (trace, HAWQ-V2/V3, the default),
``eigen`` (top eigenvalue of each layer's Hessian block, HAWQ-V1), ``fisher`` (trace of the Fisher
with model-sampled labels = Gauss-Newton trace in expectation), ``empirical_fisher`` (squared
per-example gradients with the data labels), ``qerror`` (no curvature), ``alpha`` (data-free
heavy-tailed self-regularization exponent) and ``random`` (random maximal maps, as in
results_fashion.py). Each gives per-layer ``s_l``; the same ILP (same options, pins and size budget)
turns them into bit maps. Budgets are the sizes of uniform N-bit weights (``2.5`` = halfway between
the 2- and 3-bit sizes); ``uniform`` is the widest uniform map that fits. Activations are 8-bit.

Cells, one JSON object per line of ``<out>/<model>.jsonl`` (appended and flushed as each finishes;
a rerun skips the keys already there, so an interrupted run resumes):

* ``seed<s>/sens/<criterion>``: the per-layer ``s_l`` and the wall/CPU seconds it took;
* ``seed<s>/b<budget>/<method>/<rounding>/ptq``: the map, its size and the metric without finetuning;
* ``seed<s>/b<budget>/<method>/<rounding>/ft``: the same after a short finetune (``--finetune-epochs``,
  first rounding only);
* ``quad/map<i>``: a random bit map (weights only quantized, activations float) and its measured loss
  increase over FP32 on the fixed evaluation set; ``quad/fp32`` the FP32 loss. The report ranks
  ``sum_l s_l / n_l ||Q(W_l) - W_l||^2`` (seed 0's ``s_l``) against it (Spearman).

    python scripts/results_ptq.py --model fashion --seeds 3 --test-subset 2000 --threads 1
    python scripts/results_ptq.py --model minilm --seeds 3 --threads 1
    python scripts/results_ptq.py --report-only      # tables (results_ptq.md) and plots from the .jsonl files
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
for p in (str(REPO), str(SCRIPTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from results_fashion import _seed_run, build_config, evaluate_cell, random_allocation  # noqa: E402

from hawq import HawqError  # noqa: E402
from hawq.bitmap import FLOAT_BITS, BitMap, LayerBits, bitmap_to_dict  # noqa: E402
from hawq.config import Config  # noqa: E402
from hawq.keys import config_key  # noqa: E402
from hawq.quant.stage import quantized_copy  # noqa: E402
from hawq.run import Run, build_model_and_data, digest, example_forward, seed_everything  # noqa: E402
from hawq.search import (  # noqa: E402
    SearchProblem,
    build_search_problem,
    layer_costs,
    model_size_mb,
    solve_problem,
    weight_perturbations,
)
from hawq.search.allocate import resolve_budgets  # noqa: E402
from hawq.search.stage import effective_pins  # noqa: E402
from hawq.sensitivity import criteria as C  # noqa: E402

log = logging.getLogger("hawq.results_ptq")

CRITERIA = ("hessian", "eigen", "fisher", "empirical_fisher", "qerror", "alpha", "random")
METHODS = ("uniform", *CRITERIA)
MODELS = {"fashion": "configs/fashion_resnet.yaml", "minilm": "configs/minilm_sentence.yaml"}
ROUNDINGS = ("nearest", "gptq")


# ---------------------------------------------------------------------------------------------
# the cell file


class CellFile:
    """``{key: cell}`` backed by a JSON-lines file: the first line holds the settings, each further
    line one finished cell. A torn last line (killed mid-write) is ignored and overwritten."""

    def __init__(self, path: Path, settings: Mapping[str, Any]) -> None:
        self.path = path
        self.cells: dict[str, dict[str, Any]] = {}
        key = digest(settings)
        if path.exists():
            lines = path.read_text().splitlines()
            good: list[str] = []
            for i, line in enumerate(lines):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:
                        break  # torn last line
                    raise HawqError(f"{path}: line {i + 1} is not JSON") from None
                good.append(line)
                if i == 0:
                    if obj.get("settings_digest") != key:
                        raise HawqError(f"{path} was written with other settings; pass another --out or delete it")
                else:
                    self.cells[obj["key"]] = obj
            if len(good) != len(lines):
                path.write_text("".join(g + "\n" for g in good))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"settings_digest": key, "settings": settings})

    def _append(self, obj: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(obj, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __contains__(self, key: str) -> bool:
        return key in self.cells

    def add(self, key: str, cell: Mapping[str, Any]) -> dict[str, Any]:
        obj = {"key": key, **cell}
        self._append(obj)
        self.cells[key] = obj
        return obj


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_cells(path: Path) -> dict[str, dict[str, Any]]:
    """The cells of a ``.jsonl`` file (for the report), without checking settings."""
    cells = {}
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines[1:], start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        cells[obj["key"]] = obj
    return cells


# ---------------------------------------------------------------------------------------------
# budgets and maps


def budget_label(b: float) -> str:
    return f"{b:g}"


def size_budget(problem: SearchProblem, search_cfg: Any, bits: float) -> dict[str, float]:
    """The size budget of uniform ``bits`` weights; a fraction interpolates the two neighbours' sizes."""
    lo, hi = math.floor(bits), math.ceil(bits)

    def at(n: int) -> float:
        cfg = dataclasses.replace(search_cfg, budget=dataclasses.replace(
            search_cfg.budget, size_uniform_bits=n, size_mb=None, bops_uniform_bits=None, bops_g=None,
            latency_ms=None))
        return resolve_budgets(problem, cfg)["size_mb"]

    size = at(lo) if lo == hi else at(lo) + (bits - lo) * (at(hi) - at(lo))
    return {"size_mb": size}


def uniform_map(layers: Sequence[str], pins: Mapping[str, Mapping[str, int]], weight: int,
                activation: int = 8) -> BitMap:
    return {n: LayerBits(pins[n].get("weight", weight), pins[n].get("activation", activation)) if n in pins
            else LayerBits(weight, activation) for n in layers}


def random_bit_map(layers: Sequence[str], pins: Mapping[str, Mapping[str, int]], weight_bits: Sequence[int],
                   rng: np.random.Generator, activation: int = FLOAT_BITS) -> BitMap:
    """A random map for the quadratic-model check: each map draws its own mix of widths (Dirichlet),
    then every free layer its width from that mix, so the maps span small to large sizes."""
    mix = rng.dirichlet(np.ones(len(weight_bits)))
    out = {}
    for n in layers:
        if n in pins and "weight" in pins[n]:
            out[n] = LayerBits(pins[n]["weight"], activation)
        else:
            out[n] = LayerBits(int(weight_bits[rng.choice(len(weight_bits), p=mix)]), activation)
    return out


# ---------------------------------------------------------------------------------------------
# the experiment context


@dataclasses.dataclass
class Context:
    name: str
    cfg: Config
    run: Run
    costs: dict[str, Any]
    search_cfg: Any
    pins: dict[str, dict[str, int]]
    free: list[str]
    perturbations: dict[str, dict[int, float]]
    label_free: bool


def build_context(name: str, cfg: Config, work_dir: Path, config_dir: Path | None, progress: bool) -> Context:
    base = copy.deepcopy(cfg)
    base.run = dataclasses.replace(base.run, seed=0, progress=progress)
    run = build_model_and_data(base, work_dir, config_dir)  # data subsets fixed by seed 0
    run.task.bind_reference(run.fp32)
    costs = layer_costs(run.fp32, example_forward(run), run.layers)
    pins = effective_pins(run)
    search_cfg = dataclasses.replace(cfg.search, pins=pins)
    free = [n for n in run.layers if "weight" not in pins.get(n, {})]
    perts = weight_perturbations(run.fp32, run.layers, sorted(set(cfg.search.weight_bits)),
                                 cfg.quant.per_channel, cfg.quant.group_size)
    return Context(name, base, run, costs, search_cfg, pins, free, perts, bool(cfg.sensitivity.label_free))


def compute_sensitivity(ctx: Context, criterion: str, seed: int, eigen_iters: int) -> dict[str, Any]:
    """One criterion's ``s_l`` on the free layers, timed; ``{"sens": None, "why": ...}`` where it does not apply."""
    run, scfg = ctx.run, ctx.cfg.sensitivity
    srun = _seed_run(run, ctx.cfg, seed)
    model = copy.deepcopy(run.fp32)
    model.train(scfg.bn_mode == "train")
    if criterion == "empirical_fisher" and ctx.label_free:
        return {"sens": None, "why": "the label-free loss has a zero gradient at the FP32 model (every "
                                     "example's residual is 0), so its empirical Fisher is 0"}
    batches = srun.batches("train", scfg.batches, scfg.batch_size, shuffle=True) \
        if criterion not in ("qerror", "alpha") else []
    if scfg.label_free:
        from hawq.sensitivity import label_free_loss

        loss_fn = label_free_loss(run.task, model)
    else:
        from hawq.sensitivity import task_loss

        loss_fn = task_loss(run.task)
    seed_everything(seed)
    info: Any = None
    t0, c0 = time.perf_counter(), time.process_time()
    if criterion == "hessian":
        kwargs = {k: v for k, v in scfg.hutchinson_kwargs().items() if k != "seed"}
        sens = C.hessian_sensitivity(model, loss_fn, batches, ctx.free, seed=seed + scfg.seed, **kwargs)
    elif criterion == "eigen":
        sens, info = C.eigen_sensitivity(model, loss_fn, batches, ctx.free, seed=seed, max_iter=eigen_iters)
    elif criterion == "fisher":
        sampler = C.sampled_gaussian if ctx.label_free else C.sampled_cross_entropy
        sens = C.fisher_sensitivity(model, run.task.forward, batches, ctx.free, sampler, seed=seed)
    elif criterion == "empirical_fisher":
        sens = C.empirical_fisher_sensitivity(model, loss_fn, batches, ctx.free)
    elif criterion == "qerror":
        sens = C.qerror_sensitivity(model, ctx.free)
    elif criterion == "alpha":
        sens, info = C.alpha_sensitivity(model, ctx.free)
    else:
        raise HawqError(f"unknown criterion '{criterion}'")
    return {"sens": sens, "info": info, "seconds": round(time.perf_counter() - t0, 3),
            "cpu_seconds": round(time.process_time() - c0, 3)}


def problem_for(ctx: Context, sens: Mapping[str, Any] | None) -> SearchProblem:
    # ``random`` needs only the options and sizes: unit sensitivities build the same problem
    traces = sens if sens is not None else {n: {"mean": 1.0, "numel": 1} for n in ctx.free}
    return build_search_problem(ctx.run.fp32, traces, ctx.costs, ctx.search_cfg,
                                per_channel=ctx.cfg.quant.per_channel, group_size=ctx.cfg.quant.group_size,
                                perturbations=ctx.perturbations)


def with_rounding(cfg: Config, rounding: str) -> Config:
    if rounding == "nearest" and not hasattr(cfg.quant, "rounding"):
        return cfg
    if not hasattr(cfg.quant, "rounding"):
        raise HawqError(f"rounding '{rounding}': this hawq has no quant.rounding option")
    out = copy.deepcopy(cfg)
    out.quant = dataclasses.replace(out.quant, rounding=rounding)
    return out


def evaluate_map(ctx: Context, seed: int, bits: BitMap, rounding: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    srun = _seed_run(ctx.run, with_rounding(ctx.cfg, rounding), seed)
    seed_everything(seed)
    model = quantized_copy(srun, bits)
    metrics = srun.evaluate(model, "eval")
    return {"metric": srun.primary(metrics), "metrics": metrics, "seconds": round(time.perf_counter() - t0, 1)}


def label_free_distance(ctx: Context, model: torch.nn.Module) -> float:
    """Mean over the evaluation examples of the label-free loss ``0.5 ||f(x) - f_fp32(x)||^2``."""
    task, total, n = ctx.run.task, 0.0, 0
    with torch.no_grad():
        for batch in ctx.run.eval_batches():
            b = task.batch_size(batch)
            total += float(task.output_distance(task.forward(model, batch), task.forward(ctx.run.fp32, batch))) * b
            n += b
    return total / max(n, 1)


def measure_loss(ctx: Context, bits: BitMap | None) -> dict[str, Any]:
    """The loss of the quantized model (weights only; FP32 if ``bits`` is None) on the evaluation set."""
    t0 = time.perf_counter()
    seed_everything(0)
    if bits is None:
        model = ctx.run.fp32
    else:  # activations stay float (no quantizer to calibrate): the weights' effect alone
        from hawq.quant import quantize_model

        if any(lb.activation < FLOAT_BITS for lb in bits.values()):
            raise HawqError("measure_loss: quantizes weights only (activation bits must be 32)")
        model = quantize_model(copy.deepcopy(ctx.run.fp32), bits, ctx.cfg.quant).eval()
    if ctx.label_free:
        loss = 0.0 if bits is None else label_free_distance(ctx, model)
        metrics = {"loss": loss}
        if bits is not None:
            metrics.update(ctx.run.evaluate(model, "eval"))
    else:
        metrics = ctx.run.evaluate(model, "eval")
    return {"loss": float(metrics["loss"]), "metrics": metrics, "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# the grid


def run_grid(ctx: Context, cells: CellFile, seeds: Sequence[int], budgets: Sequence[float],
             criteria: Sequence[str], roundings: Sequence[str], phases: Sequence[str], quad_maps: int,
             finetune_epochs: float, eigen_iters: int, on_cell: Callable[[str, dict], None] | None = None) -> None:
    """Fill ``cells``: PTQ (first seed and rounding first), the quadratic check, then finetuning."""
    def add(key: str, cell: dict[str, Any]) -> None:
        obj = cells.add(key, cell)
        if on_cell is not None:
            on_cell(key, obj)

    def sensitivity(seed: int, crit: str) -> dict[str, Any]:
        key = f"seed{seed}/sens/{crit}"
        if key not in cells:
            log.info("%s: %s", ctx.name, key)
            add(key, compute_sensitivity(ctx, crit, seed, eigen_iters))
        return cells.cells[key]

    def maps_for(seed: int) -> dict[tuple[float, str], BitMap | None]:
        out: dict[tuple[float, str], BitMap | None] = {}
        unit = problem_for(ctx, None)
        for crit in criteria:
            sens = None if crit == "random" else sensitivity(seed, crit)["sens"]
            if crit != "random" and sens is None:
                out.update({(b, crit): None for b in budgets})
                continue
            problem = unit if crit == "random" else problem_for(ctx, sens)
            for b in budgets:
                limit = size_budget(problem, ctx.search_cfg, b)
                if crit == "random":
                    out[(b, crit)] = random_allocation(problem, limit, seed=1000 * seed + int(round(10 * b)))
                else:
                    out[(b, crit)] = solve_problem(problem, limit).bits
        for b in budgets:
            out[(b, "uniform")] = uniform_map(ctx.run.layers, ctx.pins, math.floor(b),
                                              max(ctx.cfg.search.activation_bits))
        return out

    def map_cells(seed: int, rounding: str, kind: str) -> None:
        maps = maps_for(seed)
        done: dict[str, str] = {}
        for b in budgets:
            limit = size_budget(problem_for(ctx, None), ctx.search_cfg, b)["size_mb"]
            for m in ("uniform", *criteria):
                key = f"seed{seed}/b{budget_label(b)}/{m}/{rounding}/{kind}"
                bits = maps[(b, m)]
                if bits is None:
                    if key not in cells:
                        add(key, {"metric": None, "why": "criterion not applicable (see its sens cell)"})
                    continue
                map_key = digest(bitmap_to_dict(bits))
                if key in cells:
                    done.setdefault(map_key, key)
                    continue
                size = model_size_mb(ctx.run.fp32, bits, ctx.run.layers, ctx.cfg.quant.per_channel,
                                     ctx.cfg.quant.group_size)
                if size > limit * (1 + 1e-9):
                    raise HawqError(f"{key}: map is {size:.6f} MB, over the budget {limit:.6f} MB")
                base = {"bits": {n: lb.weight for n, lb in bits.items()}, "size_mb": size, "budget_mb": limit}
                if map_key in done:  # the same map, seed and rounding: the same deterministic numbers
                    prev = cells.cells[done[map_key]]
                    add(key, {**base, **{k: prev[k] for k in ("metric", "metrics", "before", "seconds")
                                         if k in prev}, "same_map_as": done[map_key]})
                    continue
                log.info("%s: %s", ctx.name, key)
                if kind == "ptq":
                    result = evaluate_map(ctx, seed, bits, rounding)
                else:
                    cfg = with_rounding(ctx.cfg, rounding)
                    cfg.train = dataclasses.replace(cfg.train, epochs=finetune_epochs)
                    srun = _seed_run(ctx.run, cfg, seed)
                    r = evaluate_cell(srun, bits, srun.run_dir / "finetune" / key.replace("/", "_"))
                    result = {"metric": r["after"], "before": r["before"], "metrics": r["after_metrics"],
                              "seconds": r["seconds"]}
                add(key, {**base, **result})
                done[map_key] = key

    # cheapest information first: one seed at the first rounding, the quadratic check, the other
    # seeds, then the other roundings (GPTQ costs far more per map), then finetuning (first rounding)
    if "ptq" in phases:
        map_cells(seeds[0], roundings[0], "ptq")
    if "quad" in phases and quad_maps > 0:
        for crit in criteria:
            if crit != "random":
                sensitivity(seeds[0], crit)
        if "quad/fp32" not in cells:
            add("quad/fp32", measure_loss(ctx, None))
        rng = np.random.default_rng(20261202)
        weight_bits = sorted(set(ctx.cfg.search.weight_bits))
        for i in range(quad_maps):
            bits = random_bit_map(ctx.run.layers, ctx.pins, weight_bits, rng)  # drawn even when done: same stream
            key = f"quad/map{i}"
            if key in cells:
                continue
            r = measure_loss(ctx, bits)
            add(key, {**r, "bits": {n: lb.weight for n, lb in bits.items()},
                      "increase": r["loss"] - cells.cells["quad/fp32"]["loss"]})
    if "ptq" in phases:
        for s in seeds[1:]:
            map_cells(s, roundings[0], "ptq")
        for r in roundings[1:]:
            for s in seeds:
                map_cells(s, r, "ptq")
    if "ft" in phases and finetune_epochs > 0:
        for s in seeds:
            map_cells(s, roundings[0], "ft")


# ---------------------------------------------------------------------------------------------
# report


def mean_spread(values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    if len(x) < 3:
        return math.nan
    return float(spearmanr(x, y).statistic)


def quad_rows(cells: Mapping[str, Any], perturbations: Mapping[str, Mapping[int, float]] | None = None,
              ) -> dict[str, dict[str, Any]]:
    """Per criterion: predicted vs measured loss increase over the quadratic-check maps, and Spearman's rho.

    The perturbations are read from the ``quad/perturbations`` cell unless given.
    """
    perts = perturbations or {n: {int(b): v for b, v in row.items()}
                              for n, row in cells["quad/perturbations"]["perturbations"].items()}
    maps = sorted((k for k in cells if k.startswith("quad/map")), key=lambda k: int(k[len("quad/map"):]))
    seed0 = _first_seed(cells)
    out = {}
    for crit in CRITERIA:
        sens_cell = cells.get(f"seed{seed0}/sens/{crit}")
        if sens_cell is None or sens_cell.get("sens") is None:
            continue
        sens = sens_cell["sens"]
        pred = [C.predicted_loss_increase(sens, perts, {n: b for n, b in cells[k]["bits"].items() if n in sens})
                for k in maps]
        meas = [cells[k]["increase"] for k in maps]
        # weight bits of each map: every criterion shares the "fewer bits, more loss" trend; the
        # partial rank correlation given the size says what the criterion adds beyond it
        size = [sum(sens[n]["numel"] * b for n, b in cells[k]["bits"].items() if n in sens) for k in maps]
        out[crit] = {"predicted": pred, "measured": meas, "rho": spearman(pred, meas),
                     "rho_given_size": partial_spearman(pred, meas, size), "n": len(maps)}
    return out


def partial_spearman(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> float:
    """Spearman's rho of ``x`` and ``y`` with ``z``'s (rank-linear) part removed from both."""
    rxy, rxz, ryz = spearman(x, y), spearman(x, z), spearman(y, z)
    den = math.sqrt(max((1 - rxz**2) * (1 - ryz**2), 0.0))
    return (rxy - rxz * ryz) / den if den > 0 else math.nan


def _first_seed(cells: Mapping[str, Any]) -> int:
    return min((int(k.split("/")[0][4:]) for k in cells if "/sens/" in k), default=0)


def summarize(cells: Mapping[str, Any]) -> dict[str, Any]:
    """Mean/spread per (budget, method, rounding, kind) over seeds, and criterion timings."""
    groups: dict[tuple[str, str, str, str], list[float]] = {}
    missing: dict[tuple[str, str, str, str], int] = {}
    for k, c in cells.items():
        parts = k.split("/")
        if len(parts) != 5 or not parts[1].startswith("b"):
            continue
        g = (parts[1][1:], parts[2], parts[3], parts[4])
        if c.get("metric") is None:
            missing[g] = missing.get(g, 0) + 1
            continue
        groups.setdefault(g, []).append(c["metric"])
    rows = {g: mean_spread(v) for g, v in groups.items()}
    timing: dict[str, dict[str, list[float]]] = {}
    for k, c in cells.items():
        parts = k.split("/")
        if len(parts) == 3 and parts[1] == "sens" and c.get("sens") is not None:
            t = timing.setdefault(parts[2], {"wall": [], "cpu": []})
            t["wall"].append(c["seconds"])
            t["cpu"].append(c["cpu_seconds"])
    return {"rows": rows, "missing": missing,
            "timing": {k: {w: mean_spread(v) for w, v in t.items()} for k, t in timing.items()}}


def fmt(s: Mapping[str, float] | None, digits: int) -> str:
    if s is None:
        return "not measured"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (n=1)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (n={s['n']})"


def tables(model: str, cells: Mapping[str, Any], digits: int) -> str:
    summary = summarize(cells)
    rows, timing = summary["rows"], summary["timing"]
    budgets = sorted({g[0] for g in rows} | {g[0] for g in summary["missing"]}, key=float)
    lines = []
    for kind, what in (("ptq", "no finetuning"), ("ft", "after the short finetune")):
        for rounding in ROUNDINGS:
            if not any(g[2] == rounding and g[3] == kind for g in rows):
                continue
            lines += [f"**{model}, rounding {rounding}, {what}** (mean ± std over seeds)", "",
                      "| method | " + " | ".join(f"size of uniform {b}-bit" for b in budgets) + " |",
                      "|---|" + "---|" * len(budgets)]
            for m in METHODS:
                vals = []
                for b in budgets:
                    g = (b, m, rounding, kind)
                    if g in rows:
                        col = [rows[(b, o, rounding, kind)]["mean"] for o in METHODS if (b, o, rounding, kind) in rows]
                        text = fmt(rows[g], digits)  # bold: the best of two or more measured
                        vals.append(f"**{text}**" if len(col) > 1 and rows[g]["mean"] == max(col) else text)
                    elif g in summary["missing"]:
                        vals.append("not applicable")
                    else:
                        vals.append("not measured")
                lines.append(f"| {m} | " + " | ".join(vals) + " |")
            lines.append("")
    if timing:
        lines += [f"**{model}, time per criterion** (s, 1 thread, mean ± std over seeds)", "",
                  "| criterion | CPU seconds | wall seconds (shared machine) |", "|---|---|---|"]
        lines += [f"| {k} | {fmt(v['cpu'], 2)} | {fmt(v['wall'], 2)} |" for k, v in timing.items()]
        lines.append("")
    return "\n".join(lines)


def compact_table(model: str, cells: Mapping[str, Any], digits: int, phase: str = "ptq") -> str | None:
    """One row per method, one column per (budget, rounding) measured in ``phase`` (``ptq``: no finetuning,
    ``ft``: after the short finetune): mean ± std over seeds, best in bold; None when it has no cells."""
    summary = summarize(cells)
    rows = summary["rows"]
    cols = sorted({(g[0], g[2]) for g in rows if g[3] == phase}, key=lambda c: (float(c[0]), ROUNDINGS.index(c[1])))
    if not cols:
        return None
    head = " | ".join(f"{b}-bit size, {r}" for b, r in cols)
    title = model if phase == "ptq" else f"{model}, after the short finetune"
    lines = [f"| {title} | {head} |", "|---|" + "---|" * len(cols)]
    for m in METHODS:
        vals = []
        for b, r in cols:
            g = (b, m, r, phase)
            if g not in rows:
                vals.append("n/a" if g in summary["missing"] else "not measured")
                continue
            col = [rows[(b, o, r, phase)]["mean"] for o in METHODS if (b, o, r, phase) in rows]
            st = rows[g]
            text = f"{st['mean']:.{digits}f}" + (f" ± {st['std']:.{digits}f}" if st["n"] > 1 else " (n=1)")
            vals.append(f"**{text}**" if len(col) > 1 and st["mean"] == max(col) else text)
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot_ptq(all_cells: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Bars per budget and method (mean ± std over seeds), one row per rounding measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(all_cells)
    summaries = {m: summarize(all_cells[m])["rows"] for m in models}
    roundings = [r for r in ROUNDINGS if any(g[2] == r and g[3] == "ptq" for rows in summaries.values() for g in rows)]
    if not roundings:  # a file of finetuned cells only (``--phases ft``): its tables say it all
        return
    fig, axes = plt.subplots(len(roundings), len(models), figsize=(6.5 * len(models), 4.0 * len(roundings)),
                             squeeze=False)
    for ri, rounding in enumerate(roundings):
        for ax, model in zip(axes[ri], models):
            rows = summaries[model]
            budgets = sorted({g[0] for g in rows if g[3] == "ptq"}, key=float)
            width = 0.8 / len(METHODS)
            for i, m in enumerate(METHODS):
                xs, ys, es = [], [], []
                for j, b in enumerate(budgets):
                    r = rows.get((b, m, rounding, "ptq"))
                    if r is None:
                        continue
                    xs.append(j + (i - (len(METHODS) - 1) / 2) * width)
                    ys.append(r["mean"])
                    es.append(r["std"])
                ax.bar(xs, ys, width, yerr=es, capsize=2, label=m, color=f"C{i}")
            ax.set_xticks(range(len(budgets)), [f"size of uniform {b}-bit" for b in budgets])
            ax.set_title(f"{model}: post-training, rounding {rounding}")
            ax.set_ylabel("top-1 (%)" if model == "fashion" else "mean cosine to FP32")
            vals = [r["mean"] for g, r in rows.items() if g[3] == "ptq"]
            if vals:
                span = max(vals) - min(vals) + 1e-9
                ax.set_ylim(min(vals) - 0.1 * span, max(vals) + 0.05 * span)
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(METHODS), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quad(quads: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in quads if quads[m]]
    crits = [c for c in CRITERIA if any(c in quads[m] for m in models)]
    if not models or not crits:
        return
    fig, axes = plt.subplots(len(models), len(crits), figsize=(2.6 * len(crits), 2.5 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        for j, c in enumerate(crits):
            ax = axes[i][j]
            q = quads[m].get(c)
            if q is None:
                ax.set_axis_off()
                ax.set_title(f"{m}: {c}\nnot applicable", fontsize=8)
                continue
            pred, meas = np.array(q["predicted"]), np.array(q["measured"])
            ax.scatter(pred, meas, s=8)
            if np.all(pred > 0):
                ax.set_xscale("log")
            if np.all(meas > 0):
                ax.set_yscale("log")
            ax.set_title(f"{m}: {c}\nSpearman rho = {q['rho']:.3f}", fontsize=8)
            ax.tick_params(labelsize=6)
            if j == 0:
                ax.set_ylabel("measured loss increase", fontsize=7)
            if i == len(models) - 1:
                ax.set_xlabel("predicted (sum s/n ||dW||^2)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, docs_dir: Path | None) -> str:
    all_cells = {m: read_cells(out_dir / f"{m}.jsonl") for m in MODELS if (out_dir / f"{m}.jsonl").exists()}
    if not all_cells:
        raise HawqError(f"--report-only: no <model>.jsonl in {out_dir}")
    parts = ["# results_ptq", ""]
    quads = {}
    for m, cells in all_cells.items():
        fp32 = cells.get("fp32", {}).get("metric")
        parts.append(f"FP32 {m}: {fp32:.4f}" if fp32 is not None else f"FP32 {m}: not measured")
        parts.append("")
        parts.append(tables(m, cells, 2 if m == "fashion" else 4))
        if "quad/perturbations" in cells and any(k.startswith("quad/map") for k in cells):
            quads[m] = quad_rows(cells)
    if quads:
        parts += ["**Quadratic model: Spearman rho between predicted and measured loss increase** "
                  "(random bit maps, weights only; in parentheses the partial rho given the map's weight bits)",
                  "",
                  "| criterion | " + " | ".join(f"{m} (n={next(iter(q.values()))['n']})" for m, q in quads.items()
                                                if q) + " |",
                  "|---|" + "---|" * len([q for q in quads.values() if q])]
        for c in CRITERIA:
            if c == "random":
                continue
            row = []
            for m, q in quads.items():
                if not q:
                    continue
                sens = all_cells[m].get(f"seed{_first_seed(all_cells[m])}/sens/{c}")
                row.append(f"{q[c]['rho']:.3f} ({q[c]['rho_given_size']:.3f})" if c in q else
                           "not applicable" if sens is not None else "not measured")
            parts.append(f"| {c} | " + " | ".join(row) + " |")
        parts.append("")
    md = "\n".join(parts)
    (out_dir / "results_ptq.md").write_text(md)
    compact = [t for m, c in all_cells.items() for ph in ("ptq", "ft")
               if (t := compact_table(m, c, 2 if m == "fashion" else 4, ph)) is not None]
    (out_dir / "results_ptq_compact.md").write_text("\n\n".join(compact) + "\n")
    target = docs_dir or out_dir
    target.mkdir(parents=True, exist_ok=True)
    plot_ptq(all_cells, target / "results_ptq.png")
    if quads:
        plot_quad(quads, target / "results_ptq_quadratic.png")
    return md


# ---------------------------------------------------------------------------------------------
# CLI


def parse_list(text: str, kind: Callable[[str], Any], what: str) -> list[Any]:
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HawqError(f"{what}: cannot parse {text!r}") from None
    if not values:
        raise HawqError(f"{what}: empty list")
    return values


def run_model(model: str, cfg: Config, out_dir: Path, seeds: Sequence[int], budgets: Sequence[float],
              criteria: Sequence[str], roundings: Sequence[str], phases: Sequence[str], quad_maps: int,
              finetune_epochs: float, eigen_iters: int, config_dir: Path | None = None, progress: bool = False,
              on_cell: Callable[[str, dict], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run (or resume) one model's grid into ``out_dir/<model>.jsonl``; return its cells."""
    for c in criteria:
        if c not in CRITERIA:
            raise HawqError(f"--criteria: unknown criterion '{c}' (choose from {', '.join(CRITERIA)})")
    for r in roundings:
        if r not in ROUNDINGS:
            raise HawqError(f"--rounding: unknown rounding '{r}' (choose from {', '.join(ROUNDINGS)})")
        with_rounding(cfg, r)  # fails now when this hawq lacks the option
    widths = sorted(set(cfg.search.weight_bits))
    for b in budgets:
        if not (widths[0] <= b <= widths[-1]) or math.floor(b) not in widths or math.ceil(b) not in widths:
            raise HawqError(f"--budgets: {b} needs uniform {math.floor(b)}- and {math.ceil(b)}-bit weights "
                            f"in search.weight_bits {widths}")
    keep = {k: v for k, v in config_key(cfg).items() if k in ("model", "data", "sensitivity", "quant", "search")}
    # the rounding is part of each cell's key, so its options (a later hawq's) do not void the file
    keep["quant"] = {k: v for k, v in keep["quant"].items() if k != "rounding" and not k.startswith("gptq")}
    # likewise a later option at the value that reproduces the files' behaviour before it existed
    if keep["sensitivity"].get("curvature") == "hessian":
        del keep["sensitivity"]["curvature"]
    settings = {"model": model, "config": keep, "eigen_iters": eigen_iters,
                "train": config_key(cfg.train) if finetune_epochs > 0 else None,
                "finetune_epochs": finetune_epochs}
    cells = CellFile(out_dir / f"{model}.jsonl", settings)
    ctx = build_context(model, cfg, out_dir / "work" / model, config_dir, progress)

    def add(key: str, cell: dict[str, Any]) -> None:
        obj = cells.add(key, cell)
        if on_cell is not None:
            on_cell(key, obj)

    if "fp32" not in cells:
        metrics = ctx.run.evaluate(ctx.run.fp32, "eval fp32")
        add("fp32", {"metric": ctx.run.primary(metrics), "metrics": metrics,
                     "size_mb": model_size_mb(ctx.run.fp32, FLOAT_BITS)})
    if "quad/perturbations" not in cells:
        add("quad/perturbations", {"perturbations": ctx.perturbations})
    run_grid(ctx, cells, seeds, budgets, criteria, roundings, phases, quad_maps, finetune_epochs, eigen_iters,
             on_cell)
    return cells.cells


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="fashion")
    p.add_argument("--config", default=None, help="default: configs/fashion_resnet.yaml or minilm_sentence.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budgets", default="2.5,3,4", help="sizes of uniform N-bit weights (N may be fractional)")
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--rounding", default="nearest", help="nearest and/or gptq, comma-separated")
    p.add_argument("--phases", default="ptq,quad,ft")
    p.add_argument("--quad-maps", type=int, default=60, help="random bit maps for the quadratic-model check")
    p.add_argument("--finetune-epochs", type=float, default=0.0, help="ft cells: this many epochs (0 = none)")
    p.add_argument("--eigen-iters", type=int, default=20, help="power iterations per layer (eigen)")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on N test examples (fixed subset)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/results_ptq")
    p.add_argument("--docs", default=None, help="write the plots here (default: --out)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--report-only", action="store_true", help="tables and plots from the .jsonl files")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out_dir = Path(args.out)
    try:
        if args.report_only:
            print(write_report(out_dir, Path(args.docs) if args.docs else None))
            return 0
        if args.seeds < 1:
            raise HawqError(f"--seeds must be >= 1, got {args.seeds}")
        budgets = parse_list(args.budgets, float, "--budgets")
        criteria = parse_list(args.criteria, str, "--criteria")
        roundings = parse_list(args.rounding, str, "--rounding")
        phases = parse_list(args.phases, str, "--phases")
        bad = [ph for ph in phases if ph not in ("ptq", "quad", "ft")]
        if bad:
            raise HawqError(f"--phases: unknown phase '{bad[0]}' (ptq, quad, ft)")
        if args.quad_maps < 0:
            raise HawqError(f"--quad-maps must be >= 0, got {args.quad_maps}")
        config = args.config or str(REPO / MODELS[args.model])
        cfg = build_config(config, args.set, 0.0, args.test_subset, None, None, args.threads)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)

        def show(key: str, c: dict) -> None:
            m = c.get("metric", c.get("increase", c.get("loss")))
            print(f"{args.model} {key}: {m} ({c.get('seconds')}s)", flush=True)

        run_model(args.model, cfg, out_dir, list(range(args.seeds)), budgets, criteria, roundings, phases,
                  args.quad_maps, args.finetune_epochs, args.eigen_iters, Path(config).resolve().parent,
                  progress=args.progress, on_cell=show)
        print(write_report(out_dir, Path(args.docs) if args.docs else None))
    except HawqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
