"""The pure bit-allocation ILP: pick one option per layer, minimise a cost, respect linear budgets.

One binary variable per (tie group, option); a tie group is a set of layers forced to share the
same option (an untied layer is a group of one), so ties are exact by construction and the
problem shrinks. Pins are expressed by giving a layer a single option.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hawq import HawqError

Option = tuple[int, int]  # (weight bits, activation bits)
SOLVERS = ("cbc", "highs")


class InfeasibleBudget(HawqError):
    """No assignment meets every budget; ``minimums`` holds the smallest reachable value of each."""

    def __init__(self, message: str, minimums: dict[str, float]) -> None:
        super().__init__(message)
        self.minimums = minimums


@dataclass
class IlpSolution:
    choice: dict[str, Option]  # layer -> chosen option
    objective: float
    usage: dict[str, float]  # resource -> total (offset included)
    status: str  # "optimal" or "feasible" (the time limit stopped the proof of optimality)
    solve_time_s: float
    groups: list[list[str]] = field(default_factory=list)


def tie_groups(layers: Sequence[str], ties: Sequence[Sequence[str]]) -> list[list[str]]:
    """Union-find over the tie lists; groups keep ``layers`` order (deterministic)."""
    parent = {n: n for n in layers}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in ties:
        for other in group[1:]:
            ra, rb = find(group[0]), find(other)
            if ra != rb:
                parent[rb] = ra
    by_root: dict[str, list[str]] = {}
    for n in layers:
        by_root.setdefault(find(n), []).append(n)
    return list(by_root.values())


def _group_options(group: list[str], objective: Mapping[str, Mapping[Option, float]]) -> list[Option]:
    common = set(objective[group[0]])
    for n in group[1:]:
        common &= set(objective[n])
    if not common:
        raise HawqError(f"search.ties: layers {group} share no bit option (check their pins)")
    return sorted(common)


def _group_value(table: Mapping[str, Mapping[Option, float]] | None, group: list[str], opt: Option) -> float:
    return 0.0 if table is None else sum(table[n][opt] for n in group)


def minimum_usage(objective: Mapping[str, Mapping[Option, float]],
                  resources: Mapping[str, Mapping[str, Mapping[Option, float]]],
                  offsets: Mapping[str, float] | None = None,
                  ties: Sequence[Sequence[str]] = ()) -> dict[str, float]:
    """Smallest reachable total of each resource on its own (separable over tie groups)."""
    offsets = offsets or {}
    groups = tie_groups(list(objective), ties)
    out = {}
    for r, table in resources.items():
        out[r] = offsets.get(r, 0.0) + sum(
            min(_group_value(table, g, o) for o in _group_options(g, objective)) for g in groups)
    return out


def _solver(name: str, time_limit_s: float):
    import pulp

    if name == "highs":
        try:
            import highspy  # noqa: F401
        except ImportError:
            raise HawqError("search.solver: 'highs' needs the highspy package "
                            "(pip install highspy)") from None
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=0.0, threads=1, random_seed=0)
    if name == "cbc":
        # One thread + a fixed seed: CBC's branch and bound is then deterministic.
        with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC; it is the one we have
            warnings.simplefilter("ignore", DeprecationWarning)
            return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=0.0, threads=1,
                                     options=["randomSeed 42", "randomCbcSeed 42"])
    raise HawqError(f"search.solver: unknown solver '{name}' (choose from {', '.join(SOLVERS)})")


def _binary(prob, name: str):
    import pulp

    if hasattr(prob, "add_variable"):  # PuLP >= 3.3; LpVariable(...) alone is deprecated there
        return prob.add_variable(name, cat="Binary")
    return pulp.LpVariable(name, cat="Binary")


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def solve_bit_allocation(objective: Mapping[str, Mapping[Option, float]],
                         resources: Mapping[str, Mapping[str, Mapping[Option, float]]] | None = None,
                         budgets: Mapping[str, float] | None = None,
                         offsets: Mapping[str, float] | None = None,
                         ties: Sequence[Sequence[str]] = (),
                         solver: str = "cbc", time_limit_s: float = 60.0) -> IlpSolution:
    """Minimise ``sum_l objective[l][o_l]`` s.t. ``offsets[r] + sum_l resources[r][l][o_l] <= budgets[r]``.

    ``objective[layer]`` maps each allowed option of the layer to its cost (a pinned layer has one
    option); ``resources[name][layer][option]`` is that option's use of a resource, and every
    budgeted resource must cover every option of every layer. ``ties`` lists groups of layers that
    must take the same option. Raises :class:`InfeasibleBudget` (with the smallest reachable value
    of each budget) when no assignment fits.
    """
    import pulp

    resources = dict(resources or {})
    budgets = dict(budgets or {})
    offsets = dict(offsets or {})
    layers = list(objective)
    if not layers:
        raise HawqError("search: no layers to allocate bits to")
    for r in budgets:
        if r not in resources:
            raise HawqError(f"search.budget.{r}: no per-layer cost table for this resource")
    for n in layers:
        if not objective[n]:
            raise HawqError(f"search: layer '{n}' has no bit option")
        for r, table in resources.items():
            missing = [o for o in objective[n] if n not in table or o not in table[n]]
            if missing:
                raise HawqError(f"search: resource '{r}' has no entry for layer '{n}' option {missing[0]}")
    for n in (n for g in ties for n in g):
        if n not in objective:
            raise HawqError(f"search.ties: unknown layer '{n}'")
    groups = tie_groups(layers, ties)
    options = [_group_options(g, objective) for g in groups]

    # Each budget alone: if even its minimum overflows, say so with every budget's minimum.
    budgeted = {r: resources[r] for r in budgets}
    minimums = minimum_usage(objective, budgeted, offsets, ties)
    over = [r for r in budgets if minimums[r] > budgets[r] * (1 + 1e-9)]
    if over:
        detail = "; ".join(f"{r}={_fmt(budgets[r])} < smallest feasible {_fmt(minimums[r])}" for r in over)
        others = [r for r in budgets if r not in over]
        more = "".join(f"; {r} smallest feasible {_fmt(minimums[r])}" for r in others)
        raise InfeasibleBudget(f"search.budget: infeasible: {detail}{more}", minimums)

    start = time.perf_counter()
    # Scale the objective to O(1) so the solver's absolute tolerances do not swallow tiny costs.
    scale = max((abs(objective[n][o]) for n in layers for o in objective[n]), default=1.0) or 1.0
    prob = pulp.LpProblem("hawq_bits", pulp.LpMinimize)
    x = [{o: _binary(prob, f"x_{gi}_{oi}") for oi, o in enumerate(opts)} for gi, opts in enumerate(options)]
    prob += pulp.lpSum(_group_value(objective, g, o) / scale * x[gi][o]
                       for gi, g in enumerate(groups) for o in options[gi])
    for gi in range(len(groups)):
        prob += pulp.lpSum(x[gi].values()) == 1, f"one_option_{gi}"
    for r, limit in budgets.items():
        prob += (pulp.lpSum(_group_value(resources[r], g, o) * x[gi][o]
                            for gi, g in enumerate(groups) for o in options[gi])
                 <= limit - offsets.get(r, 0.0)), f"budget_{r}"
    prob.solve(_solver(solver, time_limit_s))
    elapsed = time.perf_counter() - start

    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        if prob.status == pulp.LpStatusInfeasible or prob.sol_status == pulp.LpSolutionInfeasible:
            detail = "; ".join(f"{r}={_fmt(budgets[r])} (smallest feasible alone {_fmt(minimums[r])})"
                               for r in budgets)
            raise InfeasibleBudget(f"search.budget: infeasible: each budget is reachable alone but not all "
                                   f"at once: {detail}", minimums)
        raise HawqError(f"search: solver found no solution within search.time_limit_s={time_limit_s} "
                        f"(status {pulp.LpStatus[prob.status]})")
    choice: dict[str, Option] = {}
    for gi, g in enumerate(groups):
        picked = max(options[gi], key=lambda o, gi=gi: x[gi][o].value() or 0.0)
        for n in g:
            choice[n] = picked
    return IlpSolution(
        choice=choice, objective=evaluate(objective, choice),
        usage={r: offsets.get(r, 0.0) + evaluate(table, choice) for r, table in resources.items()},
        status="optimal" if prob.sol_status == pulp.LpSolutionOptimal else "feasible",
        solve_time_s=elapsed, groups=groups,
    )


def evaluate(table: Mapping[str, Mapping[Option, float]], choice: Mapping[str, Option]) -> float:
    """Sum of a per-layer table at the chosen options."""
    return float(sum(table[n][o] for n, o in choice.items()))
