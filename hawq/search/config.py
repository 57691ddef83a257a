from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BudgetConfig:
    """Any subset at once; None means unconstrained.

    ``size_uniform_bits`` sets ``size_mb`` to the size of the model with every quantizable layer at
    that many weight bits (after pins), the usual "same size as uniform N-bit" comparison.
    ``bops_uniform_bits`` likewise sets ``bops_g`` to every free layer at W N / A N.
    """

    size_mb: float | None = None
    bops_g: float | None = None
    latency_ms: float | None = None
    size_uniform_bits: int | None = None
    bops_uniform_bits: int | None = None


@dataclass
class SearchConfig:
    weight_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    activation_bits: list[int] = field(default_factory=lambda: [8])
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    pins: dict[str, dict[str, int]] = field(default_factory=dict)  # layer -> {weight: 8, activation: 8}
    ties: list[list[str]] = field(default_factory=list)  # groups of layers that must share bits
    latency_table: str | None = None  # JSON from scripts/build_latency_table.py
    solver: str = "cbc"  # "cbc" or "highs" (needs highspy)
    time_limit_s: float = 60.0
    # HAWQ-V3 style: a free layer's activation bits equal its weight bits (options (w, w) only).
    couple_activation: bool = False
    pareto_points: int = 20  # also solve this many budgets and write pareto.csv/png (0 = off)
