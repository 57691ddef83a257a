"""The search stage: the bit map (``bits.yaml``, ``search.json``) from the traces and the costs.

Each layer ``l`` at ``b`` bits adds ``tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2`` to the objective (the
second-order loss increase, HAWQ-V2/V3); an ILP picks one option per layer under the budgets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hawq.bitmap import (
    BitMap,
    LayerBits,
    bitmap_from_dict,
    bitmap_to_dict,
    load_bitmap,
    save_bitmap,
)
from hawq.keys import config_key
from hawq.report import quantized_size_mb
from hawq.run import Artifact, Run, cached, digest, example_forward, json_key, read_json, write_json
from hawq.search import (
    build_search_problem,
    layer_costs,
    pareto_sweep,
    solve_problem,
    uniform_points,
    write_pareto,
)

BITS_FILE, INFO_FILE = "bits.yaml", "search.json"


def _save(run_dir: Path, value: tuple[dict, dict[str, Any]], key: str) -> None:
    bits_dict, info = value
    save_bitmap(bitmap_from_dict(bits_dict), run_dir / BITS_FILE)
    write_json(run_dir / INFO_FILE, info)  # the key lands last: a cut-short save is a miss


def search_artifact(layers: list[str]) -> Artifact[tuple[dict, dict[str, Any]]]:
    """``bits.yaml`` plus ``search.json`` (its solver summary and key), read against ``layers``."""
    return Artifact("search", json_key(INFO_FILE, BITS_FILE),
                    lambda run_dir: (bitmap_to_dict(load_bitmap(run_dir / BITS_FILE, layers)),
                                     read_json(run_dir / INFO_FILE)),
                    _save)


def stage_search(run: Run, traces: dict[str, Any]) -> tuple[BitMap, dict[str, Any]]:
    """The bit allocation, solved on rank 0 and broadcast (as bits.yaml's JSON) to every process."""
    costs = run_costs(run)  # every process needs the costs (report, uniform baseline)
    search_cfg = dataclasses.replace(run.cfg.search, pins=effective_pins(run))
    traces_key = digest({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                         for k, v in traces.items()})
    key = digest(config_key(search_cfg), traces_key, config_key(run.cfg.quant))
    bits_dict, info = cached(run, search_artifact(run.layers), key,
                             lambda: _solve(run, traces, costs, search_cfg, key), where="main")
    return bitmap_from_dict(bits_dict, run.layers), info


def _solve(run: Run, traces: dict[str, Any], costs: dict[str, Any], search_cfg: Any,
           key: str) -> tuple[dict, dict[str, Any]]:
    problem = build_search_problem(run.fp32, traces, costs, search_cfg, per_channel=run.cfg.quant.per_channel,
                                   group_size=run.cfg.quant.group_size, progress=run.progress)
    alloc = solve_problem(problem)
    if search_cfg.pareto_points > 0:
        # the whole size/perturbation front from the same traces: cheap, and shows where the budget sits
        rows = pareto_sweep(problem, n_points=search_cfg.pareto_points, keep_other_budgets=False,
                            progress=run.progress)
        write_pareto(rows, run.run_dir / "pareto.csv", run.run_dir / "pareto.png", uniform_points(problem))
    info = {"key": key, "objective": alloc.objective, "usage": alloc.usage, "budgets": alloc.budgets,
            "status": alloc.status, "solve_time_s": alloc.solve_time_s, "notes": alloc.notes}
    return bitmap_to_dict(alloc.bits), info


def run_costs(run: Run) -> dict[str, Any]:
    """Per-layer params/MACs from one traced forward pass (computed once per run)."""
    if "costs" not in run.results:
        run.results["costs"] = layer_costs(run.fp32, example_forward(run), run.layers)
    return run.results["costs"]


def check_budgets(run: Run) -> None:
    """Fail fast: an infeasible budget, or pins/ties naming unknown layers, is reported before the
    (expensive) sensitivity stage. Feasibility does not depend on the traces, so unit ones do."""
    costs = run_costs(run)
    search_cfg = dataclasses.replace(run.cfg.search, pins=effective_pins(run))
    unit = {name: {"mean": 1.0, "numel": 1} for name in costs}
    flat = {name: dict.fromkeys(run.cfg.search.weight_bits, 1.0) for name in costs}
    problem = build_search_problem(run.fp32, unit, costs, search_cfg, per_channel=run.cfg.quant.per_channel,
                                   group_size=run.cfg.quant.group_size, perturbations=flat)
    solve_problem(problem)


def effective_pins(run: Run) -> dict[str, dict[str, int]]:
    """The family's default pins, overridden layer by layer by the config's."""
    return {**run.spec.default_pins, **run.cfg.search.pins}


def uniform_bits_same_size(run: Run, bits: BitMap) -> tuple[int, BitMap]:
    """The uniform-precision map the HAWQ map is compared against: same budget, same pins.

    With ``size_uniform_bits: N`` (or ``bops_uniform_bits``) it is uniform N-bit; otherwise the
    largest uniform weight precision whose size fits in the HAWQ map's size.
    """
    b = run.cfg.search.budget
    w = b.size_uniform_bits or b.bops_uniform_bits
    if w is None:
        target = quantized_size_mb(run.fp32, bits, run.layers, run.cfg.quant)
        fitting = [o for o in sorted(run.cfg.search.weight_bits)
                   if quantized_size_mb(run.fp32, _uniform(run, bits, o), run.layers, run.cfg.quant) <= target * 1.0001]
        w = fitting[-1] if fitting else min(run.cfg.search.weight_bits)
    return w, _uniform(run, bits, w)


def _uniform(run: Run, bits: BitMap, w: int) -> BitMap:
    pins = effective_pins(run)
    a = max(run.cfg.search.activation_bits)
    # A pin fixes only the widths it names: an activation-only pin leaves the weight uniform.
    return {name: LayerBits(pins[name].get("weight", w), pins[name].get("activation", a)) if name in pins
            else LayerBits(w, a) for name in run.layers}

