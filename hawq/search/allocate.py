"""Hessian-aware bit allocation (HAWQ-V3): build the ILP from traces and costs, solve it.

Cost of layer ``l`` at option ``(w, a)``::

    Omega_l(w, a) = trace_l / numel_l * ||Q_w(W_l) - W_l||^2            (HAWQ-V3 weight term)
                  + trace_l / numel_l * ||W_l||^2 * eps2(a)              (activation term, only when
                                                                          activation bits vary)

``eps2(a) = 16 / (3 (2^a - 1)^2)`` is the relative noise power of a uniform ``a``-bit quantizer
whose clipping range is +-4 standard deviations of its input (step ``8 sigma / (2^a - 1)``, noise
``step^2 / 12``). Quantizing a layer's input with relative noise ``eps2`` perturbs its output
like a relative weight perturbation of the same power, hence the ``||W||^2`` factor. It is a model,
not a measurement: it only ranks activation widths against weight widths within one layer.

``trace_l`` must not be negative. ``E[dL] ~ tr(H_ll) sigma^2 / 2`` for isotropic weight noise, so a
negative trace would make more noise *lower* the objective and send the layer to the fewest bits --
but a negative trace means an indefinite block (or estimator noise), where the quadratic model says
nothing about the cost of noise. The sensitivity stage therefore replaces a significantly negative
Hessian trace by the layer's Gauss-Newton trace (positive semi-definite; ``TraceEstimate.note`` says
so, and the search repeats the note). Any negative trace that still arrives here (noise around zero,
or a layer without a Gauss-Newton formula) is used at its magnitude ``|trace_l|``: the curvature is
that large in some directions, so the layer costs as much as a layer with that positive trace, never 0.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hawq import HawqError
from hawq.bitmap import FLOAT_BITS, MAX_BITS, MIN_BITS, BitMap, LayerBits, check_bits
from hawq.search.config import BudgetConfig, SearchConfig
from hawq.search.costs import MB, SCALE_BITS, LayerCost, model_size_mb, num_scales, weight_perturbations
from hawq.search.ilp import SOLVERS, IlpSolution, Option, evaluate, solve_bit_allocation, tie_groups
from hawq.search.latency import LatencyTable, load_latency_table

RESOURCES = ("size_mb", "bops_g", "latency_ms")


@dataclass
class Allocation:
    bits: BitMap
    objective: float  # sum of Omega_l over the layers at the chosen bits
    usage: dict[str, float]  # size_mb, bops_g (and latency_ms with a table) of the chosen bits
    budgets: dict[str, float]  # the resolved budgets (uniform-bits budgets turned into numbers)
    status: str  # "optimal", "feasible" (time limit), "top_precision" (everything fits)
    solve_time_s: float
    notes: list[str] = field(default_factory=list)


@dataclass
class SearchProblem:
    """Everything the ILP needs, computed once (a Pareto sweep re-solves it with other budgets)."""

    layers: list[str]
    objective: dict[str, dict[Option, float]]
    resources: dict[str, dict[str, dict[Option, float]]]
    offsets: dict[str, float]
    ties: list[list[str]]
    budgets: dict[str, float]
    solver: str
    time_limit_s: float
    notes: list[str] = field(default_factory=list)
    weight_numel: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    scale_bits: dict[str, int] = field(default_factory=dict)  # fp32 scales of the layer's quantized weight

    def layer_size_mb(self, layer: str, weight_bits: int) -> float:
        if weight_bits == FLOAT_BITS:
            return FLOAT_BITS * self.weight_numel[layer] / 8 / MB
        return (weight_bits * self.weight_numel[layer] + self.scale_bits[layer]) / 8 / MB

    def layer_bops_g(self, layer: str, weight_bits: int, activation_bits: int) -> float:
        return self.macs[layer] * weight_bits * activation_bits / 1e9

    def top_choice(self) -> dict[str, Option]:
        """Every tie group at its widest shared option (weight bits first, then activation bits)."""
        choice = {}
        for g in tie_groups(self.layers, self.ties):
            common = set(self.objective[g[0]]).intersection(*(self.objective[n] for n in g[1:]))
            if not common:
                raise HawqError(f"search.ties: layers {g} share no bit option (check their pins)")
            best = max(common)
            choice.update({n: best for n in g})
        return choice

    def usage(self, choice: Mapping[str, Option]) -> dict[str, float]:
        return {r: self.offsets.get(r, 0.0) + evaluate(t, choice) for r, t in self.resources.items()}


def _check_bit_list(values: Any, where: str) -> list[int]:
    if not isinstance(values, (list, tuple)) or not values:
        raise HawqError(f"{where}: expected a non-empty list of bit widths")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not MIN_BITS <= v <= MAX_BITS:
            raise HawqError(f"{where}: bit options must be integers in {MIN_BITS}..{MAX_BITS}, got {v!r}")
    return sorted(set(values))


def _check_budgets(budget: BudgetConfig) -> None:
    for name in ("size_mb", "bops_g", "latency_ms"):
        v = getattr(budget, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise HawqError(f"search.budget.{name}: must be a positive number, got {v!r}")
    for name in ("size_uniform_bits", "bops_uniform_bits"):
        v = getattr(budget, name)
        if v is not None:
            check_bits(v, f"search.budget.{name}")
    if budget.size_mb is not None and budget.size_uniform_bits is not None:
        raise HawqError("search.budget: set size_mb or size_uniform_bits, not both")
    if budget.bops_g is not None and budget.bops_uniform_bits is not None:
        raise HawqError("search.budget: set bops_g or bops_uniform_bits, not both")


def validate_search_config(cfg: SearchConfig, layers: list[str] | None) -> tuple[list[int], list[int]]:
    """Check the search section; ``layers=None`` (the config alone) skips the layer names of pins and ties."""
    w_opts = _check_bit_list(cfg.weight_bits, "search.weight_bits")
    a_opts = _check_bit_list(cfg.activation_bits, "search.activation_bits")
    if cfg.solver not in SOLVERS:
        raise HawqError(f"search.solver: unknown solver '{cfg.solver}' (choose from {', '.join(SOLVERS)})")
    if not cfg.time_limit_s or cfg.time_limit_s <= 0:
        raise HawqError(f"search.time_limit_s: must be positive, got {cfg.time_limit_s!r}")
    _check_budgets(cfg.budget)
    known = None if layers is None else set(layers)
    for name, spec in cfg.pins.items():
        if known is not None and name not in known:
            raise HawqError(f"search.pins: unknown layer '{name}'")
        if not isinstance(spec, Mapping) or not spec or set(spec) - {"weight", "activation"}:
            raise HawqError(f"search.pins: layer '{name}' must map to {{weight: N, activation: N}}")
        for key, v in spec.items():
            check_bits(v, f"search.pins.{name}.{key}")
    for group in cfg.ties:
        if not isinstance(group, (list, tuple)) or len(group) < 2:
            raise HawqError(f"search.ties: each tie must list at least two layers, got {group!r}")
        for name in group:
            if known is not None and name not in known:
                raise HawqError(f"search.ties: unknown layer '{name}'")
    return w_opts, a_opts


def activation_noise(bits: int) -> float:
    """Relative noise power of a uniform ``bits``-bit quantizer clipped at +-4 sigma (see module doc)."""
    return 0.0 if bits == FLOAT_BITS else 16.0 / (3.0 * (2**bits - 1) ** 2)


def _trace_of(traces: Mapping[str, Any], name: str) -> tuple[float, int | None]:
    if name not in traces:
        raise HawqError(f"traces: no Hessian trace for layer '{name}' (re-run the sensitivity stage)")
    t = traces[name]
    if isinstance(t, Mapping):
        mean, numel = t.get("mean"), t.get("numel")
    else:
        mean, numel = getattr(t, "mean", None), getattr(t, "numel", None)
    if isinstance(mean, bool) or not isinstance(mean, (int, float)):
        raise HawqError(f"traces: layer '{name}' has no numeric 'mean'")
    return float(mean), (int(numel) if numel else None)


def _note_of(traces: Mapping[str, Any], name: str) -> str:
    t = traces[name]
    note = t.get("note") if isinstance(t, Mapping) else getattr(t, "note", None)
    return note if isinstance(note, str) else ""


def _resolve_table(cfg: SearchConfig,
                   latency_table: LatencyTable | str | os.PathLike | None) -> LatencyTable | None:
    if isinstance(latency_table, LatencyTable):
        return latency_table
    if latency_table is not None:
        return load_latency_table(latency_table)
    if cfg.latency_table:
        return load_latency_table(cfg.latency_table)
    return None


def build_search_problem(model: nn.Module, traces: Mapping[str, Any], costs: Mapping[str, LayerCost],
                         cfg: SearchConfig, per_channel: bool = True, group_size: int | None = None,
                         latency_table: LatencyTable | str | os.PathLike | None = None,
                         perturbations: Mapping[str, Mapping[int, float]] | None = None,
                         progress: bool = False) -> SearchProblem:
    """Options, costs (Omega), resources and resolved budgets of the layers in ``costs``."""
    layers = list(costs)
    w_opts, a_opts = validate_search_config(cfg, layers)
    notes: list[str] = []
    if cfg.budget.latency_ms is not None and latency_table is None and not cfg.latency_table:
        raise HawqError("search.budget.latency_ms: needs search.latency_table "
                        "(build one for this device with scripts/build_latency_table.py)")
    table = _resolve_table(cfg, latency_table)

    # Options per layer: the cartesian product, narrowed by pins.
    options: dict[str, list[Option]] = {}
    for n in layers:
        pin = cfg.pins.get(n, {})
        ws = [pin["weight"]] if "weight" in pin else w_opts
        if cfg.couple_activation and "weight" not in pin and "activation" not in pin:
            options[n] = [(w, w) for w in ws]
        else:
            acts = [pin["activation"]] if "activation" in pin else a_opts
            options[n] = list(itertools.product(ws, acts))

    # Objective: per-parameter trace times the weight perturbation (+ activation term).
    if perturbations is None:
        needed = sorted({w for opts in options.values() for w, _ in opts})
        free = [n for n in layers if len(options[n]) > 1]
        perturbations = (weight_perturbations(model, free, needed, per_channel, group_size, progress)
                         if free else {})
    modules = dict(model.named_modules())
    acts_vary = len({a for opts in options.values() for _, a in opts}) > 1
    if acts_vary:
        notes.append("activation bits vary: objective adds trace/numel * ||W||^2 * 16/(3(2^a-1)^2)")
    objective: dict[str, dict[Option, float]] = {}
    negative = []
    for n in layers:
        if len(options[n]) == 1:
            objective[n] = {options[n][0]: 0.0}  # fully pinned: a constant, no trace needed
            continue
        mean, numel = _trace_of(traces, n)
        if _note_of(traces, n):
            notes.append(f"{n}: {_note_of(traces, n)}")
        if mean < 0:  # the module docstring: a negative curvature is not "noise is free"
            negative.append(n)
            mean = -mean
        per_param = mean / (numel or costs[n].weight_numel)
        w_sq = float(modules[n].weight.detach().double().pow(2).sum()) if acts_vary else 0.0
        row = {}
        for w, a in options[n]:
            if n not in perturbations or w not in perturbations[n]:
                raise HawqError(f"search: no weight perturbation for layer '{n}' at {w} bits")
            row[(w, a)] = per_param * (perturbations[n][w] + w_sq * activation_noise(a))
        objective[n] = row
    if negative:
        notes.append(f"negative trace estimates used at their magnitude |trace| (a negative curvature does not "
                     f"make quantization noise free): {', '.join(negative)}")

    # Resources. Size: a quantized weight costs w bits per entry plus 32-bit scales; the rest of the
    # model (BN, biases, non-searched layers) is a constant offset at 32 bits.
    problem = SearchProblem(
        layers=layers, objective=objective, resources={}, offsets={}, ties=[list(g) for g in cfg.ties],
        budgets={}, solver=cfg.solver, time_limit_s=float(cfg.time_limit_s), notes=notes,
        weight_numel={n: costs[n].weight_numel for n in layers}, macs={n: costs[n].macs for n in layers},
        scale_bits={n: SCALE_BITS * num_scales(modules[n].weight.shape, costs[n].kind, per_channel,
                                               group_size) for n in layers})
    resources: dict[str, dict[str, dict[Option, float]]] = {
        "size_mb": {n: {(w, a): problem.layer_size_mb(n, w) for w, a in options[n]} for n in layers},
        "bops_g": {n: {(w, a): problem.layer_bops_g(n, w, a) for w, a in options[n]} for n in layers},
    }
    searched_float = sum(problem.layer_size_mb(n, FLOAT_BITS) for n in layers)
    offsets = {"size_mb": model_size_mb(model, FLOAT_BITS) - searched_float, "bops_g": 0.0}
    if table is not None:
        try:
            resources["latency_ms"] = {n: {o: table.layer_ms(n, *o) for o in options[n]} for n in layers}
            offsets["latency_ms"] = 0.0
        except HawqError:
            if cfg.budget.latency_ms is not None:
                raise
            notes.append("latency table does not cover every layer/option: latency not reported")

    problem.resources, problem.offsets = resources, offsets
    problem.budgets = resolve_budgets(problem, cfg)
    return problem


def resolve_budgets(problem: SearchProblem, cfg: SearchConfig) -> dict[str, float]:
    """Turn ``*_uniform_bits`` into numbers: every free layer at N bits, pinned layers at their pins."""
    b = cfg.budget
    budgets: dict[str, float] = {}
    for name in RESOURCES:
        if getattr(b, name) is not None:
            budgets[name] = float(getattr(b, name))

    def pinned(n: str, key: str, default: int) -> int:
        return cfg.pins.get(n, {}).get(key, default)

    if b.size_uniform_bits is not None:
        N = b.size_uniform_bits
        budgets["size_mb"] = problem.offsets["size_mb"] + sum(
            problem.layer_size_mb(n, pinned(n, "weight", N)) for n in problem.layers)
    if b.bops_uniform_bits is not None:
        N = b.bops_uniform_bits
        budgets["bops_g"] = sum(problem.layer_bops_g(n, pinned(n, "weight", N), pinned(n, "activation", N))
                                for n in problem.layers)
    return budgets


def solve_problem(problem: SearchProblem, budgets: Mapping[str, float] | None = None) -> Allocation:
    """Solve ``problem`` under ``budgets`` (default: its resolved budgets)."""
    budgets = dict(problem.budgets if budgets is None else budgets)
    notes = list(problem.notes)
    top = problem.top_choice()
    top_usage = problem.usage(top)
    if all(top_usage[r] <= limit * (1 + 1e-12) for r, limit in budgets.items()):
        why = "no budget set" if not budgets else "every budget holds at top precision"
        notes.append(f"{why}: every layer at its widest option, no ILP solved")
        return Allocation(bits=_to_bitmap(top), objective=evaluate(problem.objective, top), usage=top_usage,
                          budgets=budgets, status="top_precision", solve_time_s=0.0, notes=notes)
    sol: IlpSolution = solve_bit_allocation(problem.objective, problem.resources, budgets, problem.offsets,
                                            problem.ties, problem.solver, problem.time_limit_s)
    if sol.status != "optimal":
        notes.append(f"time limit {problem.time_limit_s}s reached: best solution found, "
                     "optimality not proven")
    return Allocation(bits=_to_bitmap(sol.choice), objective=sol.objective, usage=sol.usage, budgets=budgets,
                      status=sol.status, solve_time_s=sol.solve_time_s, notes=notes)


def _to_bitmap(choice: Mapping[str, Option]) -> BitMap:
    return {n: LayerBits(w, a) for n, (w, a) in choice.items()}


def allocate_bits(model: nn.Module, traces: Mapping[str, Any], costs: Mapping[str, LayerCost],
                  cfg: SearchConfig, per_channel: bool = True, group_size: int | None = None,
                  latency_table: LatencyTable | str | os.PathLike | None = None,
                  progress: bool = False) -> Allocation:
    """HAWQ-V3 bit allocation for the layers in ``costs``.

    ``traces[layer]`` has ``.mean`` (Hessian trace of the layer's weight) and optionally ``.numel``
    (a ``TraceEstimate`` or a ``traces.json`` entry). Raises ``HawqError`` for bad configuration and
    :class:`~hawq.search.ilp.InfeasibleBudget` (a ``HawqError``) when the budgets cannot be met.
    """
    problem = build_search_problem(model, traces, costs, cfg, per_channel, group_size, latency_table,
                                   progress=progress)
    return solve_problem(problem)
