"""hawq.search: costs (size/BOPS against HAWQ-V3's table), the ILP against brute force, allocate_bits."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torchvision
from torch import nn

from hawq import HawqError
from hawq.bitmap import LayerBits
from hawq.models.fashion import fashion_resnet
from hawq.search import (
    BudgetConfig,
    InfeasibleBudget,
    SearchConfig,
    allocate_bits,
    bops_g,
    build_search_problem,
    layer_costs,
    minimum_usage,
    model_size_mb,
    solve_bit_allocation,
    solve_problem,
    weight_perturbations,
)
from hawq.search.ilp import evaluate


def _costs_224(model: nn.Module) -> dict:
    return layer_costs(model, lambda m: m(torch.zeros(1, 3, 224, 224)))


def _resnet50_v1(model: nn.Module) -> nn.Module:
    """Original ResNet-50 (v1, pytorchcv's resnet50 that HAWQ-V3 used): stride on the first 1x1 conv."""
    for stage in (model.layer2, model.layer3, model.layer4):
        block = stage[0]
        block.conv1.stride, block.conv2.stride = (2, 2), (1, 1)
    return model


def _close(value: float, reference: float, rel: float = 0.01) -> bool:
    return abs(value - reference) <= rel * reference


# ------------------------------------------------------------------------------------------ costs


def test_resnet18_matches_hawq_v3_table():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    costs = _costs_224(model)
    assert _close(model_size_mb(model, 32), 44.6)
    assert _close(model_size_mb(model, 8), 11.1)
    assert _close(bops_g(model, 32, costs=costs), 1858)
    assert _close(bops_g(model, 8, costs=costs), 116)
    # the traced batch size does not change per-example MACs
    costs4 = layer_costs(model, lambda m: m(torch.zeros(4, 3, 224, 224)))
    assert {n: c.macs for n, c in costs4.items()} == {n: c.macs for n, c in costs.items()}


def test_resnet50_matches_hawq_v3_table():
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    v15_bops = bops_g(model, 32, costs=_costs_224(model))
    assert _close(v15_bops, 4.089 * 1024, rel=0.002)  # torchvision's v1.5: 4.09 GMACs
    assert _close(model_size_mb(model, 32), 97.8)
    assert _close(model_size_mb(model, 8), 24.5)
    model = _resnet50_v1(model)  # HAWQ-V3's table is the v1 layout (3.86 GMACs)
    costs = _costs_224(model)
    assert _close(bops_g(model, 32, costs=costs), 3951)
    assert _close(bops_g(model, 8, costs=costs), 247)


def test_size_counts_weights_scales_and_float_rest():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    w0, w3 = model[0].weight.numel(), model[3].weight.numel()
    rest = sum(p.numel() for p in model.parameters()) - w0 - w3
    bits = {"0": LayerBits(4, 8), "3": LayerBits(2, 8)}
    expected = (4 * w0 + 32 * 4 + 2 * w3 + 32 * 5 + 32 * rest) / 8 / 2**20
    assert model_size_mb(model, bits) == pytest.approx(expected)
    assert model_size_mb(model, bits, per_channel=False) == pytest.approx(expected - 32 * (4 + 5 - 2) / 8 / 2**20)
    # grouped: the Linear's 144 inputs in groups of 64 -> 3 scales per row; the conv stays per channel
    assert model_size_mb(model, bits, group_size=64) == pytest.approx(expected + 32 * 5 * 2 / 8 / 2**20)
    assert model_size_mb(model, 32) == pytest.approx(32 * sum(p.numel() for p in model.parameters()) / 8 / 2**20)
    with pytest.raises(HawqError, match="unknown layer 'nope'"):
        model_size_mb(model, {"nope": LayerBits(4, 8)})


def test_layer_costs_macs_and_shapes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                          nn.Flatten(), nn.Linear(8 * 5 * 5, 7))
    costs = layer_costs(model, lambda m: m(torch.zeros(3, 3, 5, 5)))
    assert costs["0"].macs == 8 * 25 * 3 * 9 and costs["0"].out_shape == (8, 5, 5)
    assert costs["1"].macs == 8 * 25 * 2 * 9  # grouped conv: C_in / groups
    assert costs["3"].macs == 7 * 200 and costs["3"].out_channels == 7 and costs["3"].params == 1407
    assert bops_g(model, {"0": LayerBits(4, 8)}, costs=costs) == pytest.approx(
        (costs["0"].macs * 32 + (costs["1"].macs + costs["3"].macs) * 1024) / 1e9)
    assert bops_g(model, 8, input_shape=(3, 5, 5)) == pytest.approx(bops_g(model, 8, costs=costs))


def test_layer_costs_embedding_and_shared_layer():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.head = nn.Linear(6, 6)

        def forward(self, ids):
            return self.head(self.head(self.emb(ids)))  # called twice: MACs add up

    model = Shared()
    costs = layer_costs(model, lambda m: m(torch.zeros(2, 5, dtype=torch.long)))
    assert costs["emb"].macs == 0 and costs["emb"].kind == "embedding"
    assert costs["head"].macs == 2 * 5 * 6 * 6 and costs["head"].out_shape == (5, 6)


def test_weight_perturbations_decrease_with_bits():
    torch.manual_seed(0)
    model = fashion_resnet()
    pert = weight_perturbations(model, ["conv1", "fc"], [2, 4, 8, 32])
    for row in pert.values():
        assert row[2] > row[4] > row[8] > 0 and row[32] == 0.0
    from hawq.quant.quantizers import quantize_weight

    w = model.fc.weight.detach()
    assert pert["fc"][4] == pytest.approx(float((quantize_weight(w, 4) - w).pow(2).sum()), rel=1e-5)


# ------------------------------------------------------------------------------------------ ILP


def _random_instance(rng: random.Random, n_layers: int, n_options: int):
    options = [(w, 8) for w in (2, 4, 8, 16)[:n_options]]
    layers = [f"l{i}" for i in range(n_layers)]
    objective = {n: {o: rng.uniform(0, 1) * (2.0 ** -o[0]) * 100 for o in options} for n in layers}
    size = {n: {o: o[0] * rng.randint(1, 50) / 10 for o in options} for n in layers}
    bops = {n: {o: o[0] * o[1] * rng.randint(1, 20) / 10 for o in options} for n in layers}
    return layers, options, objective, {"size": size, "bops": bops}


def _brute_force(layers, objective, resources, budgets, offsets, ties=()):
    best = None
    for combo in itertools.product(*(list(objective[n]) for n in layers)):
        choice = dict(zip(layers, combo))
        if any(len({choice[n] for n in g}) > 1 for g in ties):
            continue
        if all(offsets.get(r, 0) + evaluate(resources[r], choice) <= b + 1e-9 for r, b in budgets.items()):
            value = evaluate(objective, choice)
            if best is None or value < best:
                best = value
    return best


@pytest.mark.parametrize("seed", range(8))
def test_ilp_matches_brute_force(seed):
    rng = random.Random(seed)
    layers, options, objective, resources = _random_instance(rng, n_layers=5, n_options=3)
    offsets = {"size": 1.5}
    lo = minimum_usage(objective, resources, offsets)
    top = {r: offsets.get(r, 0) + evaluate(resources[r], {n: options[-1] for n in layers}) for r in resources}
    budgets = {r: lo[r] + rng.uniform(0.2, 0.7) * (top[r] - lo[r]) for r in resources}
    ties = [["l0", "l3"]] if seed % 2 else []
    expected = _brute_force(layers, objective, resources, budgets, offsets, ties)
    sol = solve_bit_allocation(objective, resources, budgets, offsets, ties)
    assert sol.status == "optimal"
    assert sol.objective == pytest.approx(expected, rel=1e-9)
    for r, b in budgets.items():
        assert sol.usage[r] <= b + 1e-9
    if ties:
        assert sol.choice["l0"] == sol.choice["l3"]


def test_ilp_highs_agrees_with_cbc():
    pytest.importorskip("highspy")
    rng = random.Random(11)
    layers, options, objective, resources = _random_instance(rng, n_layers=6, n_options=3)
    lo = minimum_usage(objective, resources)
    budgets = {r: lo[r] * 1.6 for r in resources}
    cbc = solve_bit_allocation(objective, resources, budgets, solver="cbc")
    highs = solve_bit_allocation(objective, resources, budgets, solver="highs")
    assert highs.objective == pytest.approx(cbc.objective, rel=1e-9)


def test_ilp_infeasible_reports_minimum():
    rng = random.Random(3)
    layers, options, objective, resources = _random_instance(rng, n_layers=4, n_options=3)
    lo = minimum_usage(objective, resources, {"size": 2.0})
    assert lo["size"] == pytest.approx(2.0 + sum(min(resources["size"][n].values()) for n in layers))
    with pytest.raises(InfeasibleBudget, match="size=") as err:
        solve_bit_allocation(objective, resources, {"size": lo["size"] * 0.9, "bops": 1e9}, {"size": 2.0})
    assert err.value.minimums["size"] == pytest.approx(lo["size"])
    assert f"{lo['size']:.6g}" in str(err.value)
    # exactly at the minimum it is feasible
    sol = solve_bit_allocation(objective, resources, {"size": lo["size"]}, {"size": 2.0})
    assert sol.usage["size"] == pytest.approx(lo["size"])


# ------------------------------------------------------------------------------------------ allocate_bits


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = fashion_resnet()
    costs = layer_costs(model, lambda m: m(torch.zeros(1, 1, 28, 28)))
    gen = torch.Generator().manual_seed(0)
    traces = {n: {"mean": float(torch.rand(1, generator=gen)) * 10} for n in costs}
    return model, costs, traces


def test_allocate_respects_budgets_pins_ties(small):
    model, costs, traces = small
    cfg = SearchConfig(weight_bits=[2, 4, 8], activation_bits=[4, 8],
                       budget=BudgetConfig(size_uniform_bits=4, bops_uniform_bits=6),
                       pins={"conv1": {"weight": 8, "activation": 8}, "fc": {"weight": 8}},
                       ties=[["layer1.0.conv1", "layer1.0.conv2"]])
    alloc = allocate_bits(model, traces, costs, cfg)
    assert alloc.status == "optimal"
    assert alloc.bits["conv1"] == LayerBits(8, 8) and alloc.bits["fc"].weight == 8
    assert alloc.bits["layer1.0.conv1"] == alloc.bits["layer1.0.conv2"]
    # the resolved budgets are the uniform-N numbers with the pins applied
    uniform = {n: LayerBits(4, 8) for n in costs} | {"conv1": LayerBits(8, 8), "fc": LayerBits(8, 8)}
    assert alloc.budgets["size_mb"] == pytest.approx(model_size_mb(model, uniform))
    uniform6 = {n: LayerBits(6, 6) for n in costs} | {"conv1": LayerBits(8, 8), "fc": LayerBits(8, 6)}
    assert alloc.budgets["bops_g"] == pytest.approx(bops_g(model, uniform6, costs=costs))
    # usage agrees with the public cost functions and holds the budgets
    assert alloc.usage["size_mb"] == pytest.approx(model_size_mb(model, alloc.bits))
    assert alloc.usage["bops_g"] == pytest.approx(bops_g(model, alloc.bits, costs=costs))
    assert alloc.usage["size_mb"] <= alloc.budgets["size_mb"] * (1 + 1e-12)
    assert alloc.usage["bops_g"] <= alloc.budgets["bops_g"] * (1 + 1e-12)
    # brute-force check of optimality is too big here; compare with every uniform assignment instead
    problem = build_search_problem(model, traces, costs, cfg)
    assert alloc.objective <= evaluate(problem.objective, {
        n: ((4, 8) if n not in ("conv1", "fc") else (8, 8)) for n in costs}) + 1e-15
    assert alloc.bits == allocate_bits(model, traces, costs, cfg).bits  # deterministic


def test_allocate_matches_brute_force_on_tiny_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    costs = layer_costs(model, lambda m: m(torch.zeros(1, 1, 8, 8)))
    traces = {"0": {"mean": 5.0}, "2": {"mean": 1.0}, "4": {"mean": 0.2}}
    cfg = SearchConfig(weight_bits=[2, 4, 8], activation_bits=[4, 8])
    problem = build_search_problem(model, traces, costs, cfg)
    budgets = {"size_mb": problem.offsets["size_mb"] + sum(problem.layer_size_mb(n, 4) for n in costs),
               "bops_g": sum(problem.layer_bops_g(n, 6, 6) for n in costs)}
    alloc = solve_problem(problem, budgets)
    expected = _brute_force(list(costs), problem.objective, problem.resources, budgets, problem.offsets)
    assert alloc.objective == pytest.approx(expected, rel=1e-9)
    # with a pin and a tie the brute force sees the narrowed options too
    cfg.pins, cfg.ties = {"2": {"activation": 4}}, [["0", "4"]]
    problem = build_search_problem(model, traces, costs, cfg)
    alloc = solve_problem(problem, budgets)
    expected = _brute_force(list(costs), problem.objective, problem.resources, budgets, problem.offsets,
                            cfg.ties)
    assert alloc.objective == pytest.approx(expected, rel=1e-9)
    assert alloc.bits["2"].activation == 4 and alloc.bits["0"] == alloc.bits["4"]


def test_allocate_everything_fits_and_infeasible(small):
    model, costs, traces = small
    cfg = SearchConfig(weight_bits=[2, 4, 8], budget=BudgetConfig(size_mb=100.0))
    alloc = allocate_bits(model, traces, costs, cfg)
    assert alloc.status == "top_precision" and all(b == LayerBits(8, 8) for b in alloc.bits.values())
    assert any("top precision" in note for note in alloc.notes)
    cfg = SearchConfig(weight_bits=[2, 4, 8], budget=BudgetConfig(size_mb=0.01),
                       pins={"fc": {"weight": 8, "activation": 8}})
    with pytest.raises(InfeasibleBudget) as err:
        allocate_bits(model, traces, costs, cfg)
    at2 = {n: LayerBits(2, 8) for n in costs} | {"fc": LayerBits(8, 8)}
    assert err.value.minimums["size_mb"] == pytest.approx(model_size_mb(model, at2))
    assert "size_mb=0.01 < smallest feasible" in str(err.value)


@pytest.mark.parametrize(("changes", "message"), [
    ({"pins": {"foo": {"weight": 4}}}, "search.pins: unknown layer 'foo'"),
    ({"ties": [["conv1", "bar"]]}, "search.ties: unknown layer 'bar'"),
    ({"weight_bits": [1, 4]}, "search.weight_bits"),
    ({"activation_bits": [4, 17]}, "search.activation_bits"),
    ({"budget": BudgetConfig(size_mb=-1.0)}, "search.budget.size_mb"),
    ({"budget": BudgetConfig(bops_g=0.0)}, "search.budget.bops_g"),
    ({"budget": BudgetConfig(latency_ms=1.0)}, "search.budget.latency_ms"),
    ({"pins": {"conv1": {"weight": 40}}}, "search.pins.conv1.weight"),
    ({"solver": "gurobi"}, "search.solver"),
    ({"ties": [["conv1", "fc"]], "pins": {"conv1": {"weight": 8}, "fc": {"weight": 4}}}, "share no bit option"),
])
def test_allocate_rejects_bad_config(small, changes, message):
    model, costs, traces = small
    cfg = SearchConfig(weight_bits=[2, 4, 8], budget=BudgetConfig(size_uniform_bits=4))
    for k, v in changes.items():
        setattr(cfg, k, v)
    with pytest.raises(HawqError, match=message.replace(".", r"\.").replace("[", r"\[")):
        allocate_bits(model, traces, costs, cfg)


def test_allocate_needs_traces_for_free_layers(small):
    model, costs, traces = small
    partial = {n: t for n, t in traces.items() if n != "fc"}
    cfg = SearchConfig(budget=BudgetConfig(size_uniform_bits=4))
    with pytest.raises(HawqError, match="no Hessian trace for layer 'fc'"):
        allocate_bits(model, partial, costs, cfg)
    cfg.pins = {"fc": {"weight": 8, "activation": 8}}  # a fully pinned layer needs no trace
    assert allocate_bits(model, partial, costs, cfg).bits["fc"] == LayerBits(8, 8)


def test_coupled_activation_and_negative_trace(small):
    model, costs, traces = small
    noisy = dict(traces) | {"fc": {"mean": -3.0}}
    cfg = SearchConfig(weight_bits=[4, 8], activation_bits=[8], couple_activation=True,
                       budget=BudgetConfig(bops_uniform_bits=6))
    alloc = allocate_bits(model, noisy, costs, cfg)
    assert all(b.weight == b.activation for b in alloc.bits.values())  # options are (w, w) only
    assert {b.weight for b in alloc.bits.values()} == {4, 8}
    assert any("negative trace" in note and "fc" in note for note in alloc.notes)
    # a negative trace costs what its magnitude would, never 0 (which would make every width free)
    positive = allocate_bits(model, dict(traces) | {"fc": {"mean": 3.0}}, costs, cfg)
    assert alloc.bits == positive.bits and alloc.objective == pytest.approx(positive.objective)
    sensitive = dict(traces) | {"fc": {"mean": -1e6}}
    assert allocate_bits(model, sensitive, costs, cfg).bits["fc"] == LayerBits(8, 8)
    noted = dict(traces) | {"fc": {"mean": 3.0, "note": "Hessian trace -2 +- 0.1 is significantly negative"}}
    assert any(n.startswith("fc: Hessian trace -2") for n in allocate_bits(model, noted, costs, cfg).notes)
