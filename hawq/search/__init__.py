"""Bit-allocation stage: per-layer costs, the HAWQ-V3 ILP, latency tables and Pareto sweeps."""

from hawq.search.allocate import (
    Allocation,
    SearchProblem,
    activation_noise,
    allocate_bits,
    build_search_problem,
    solve_problem,
)
from hawq.search.config import BudgetConfig, SearchConfig
from hawq.search.costs import LayerCost, bops_g, layer_costs, model_size_mb, num_scales, weight_perturbations
from hawq.search.ilp import IlpSolution, InfeasibleBudget, Option, minimum_usage, solve_bit_allocation
from hawq.search.latency import LatencyTable, current_device, latency_key, load_latency_table
from hawq.search.pareto import pareto_sweep, uniform_points, write_pareto

__all__ = [
    "Allocation", "BudgetConfig", "IlpSolution", "InfeasibleBudget", "LatencyTable", "LayerCost", "Option",
    "SearchConfig", "SearchProblem", "activation_noise", "allocate_bits", "bops_g", "build_search_problem",
    "current_device", "latency_key", "layer_costs", "load_latency_table", "minimum_usage", "model_size_mb",
    "num_scales", "pareto_sweep", "solve_bit_allocation", "solve_problem", "uniform_points",
    "weight_perturbations", "write_pareto",
]
