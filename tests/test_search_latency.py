"""hawq.search latency tables (load/validate, ILP latency budget) and the Pareto sweep output."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from hawq import HawqError
from hawq.models.fashion import fashion_resnet
from hawq.search import (
    BudgetConfig,
    LatencyTable,
    SearchConfig,
    allocate_bits,
    build_search_problem,
    current_device,
    latency_key,
    layer_costs,
    load_latency_table,
    pareto_sweep,
    uniform_points,
    write_pareto,
)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = fashion_resnet()
    costs = layer_costs(model, lambda m: m(torch.zeros(1, 1, 28, 28)))
    gen = torch.Generator().manual_seed(1)
    traces = {n: {"mean": float(torch.rand(1, generator=gen)) * 10} for n in costs}
    return model, costs, traces


def _table(costs, device: str) -> dict:
    # fp32 is slow, int8 kernels are 3x faster; sub-8-bit entries repeat int8 (like the real script)
    layers = {n: {"fp32": 3e-6 * c.macs} | {latency_key(w, a): 1e-6 * c.macs for w in range(2, 9)
                                            for a in range(2, 9)} for n, c in costs.items()}
    layers["conv1"]["w4a8"] = 0.5e-6 * costs["conv1"].macs  # make one narrower option faster
    return {"device": device, "torch": torch.__version__, "cpu_info": {}, "layers": layers}


def test_load_latency_table_checks_device(tmp_path, small):
    _, costs, _ = small
    path = tmp_path / "lat.json"
    path.write_text(json.dumps(_table(costs, current_device())))
    table = load_latency_table(path)
    assert table.layer_ms("fc", 8, 8) == pytest.approx(1e-6 * costs["fc"].macs)
    assert table.layer_ms("fc", 16, 8) == pytest.approx(3e-6 * costs["fc"].macs)  # >8 bits: fp32 fallback
    with pytest.raises(HawqError, match="no entry for layer 'nope'"):
        table.layer_ms("nope", 8, 8)
    path.write_text(json.dumps(_table(costs, "cpu: some other processor")))
    with pytest.raises(HawqError, match="measured on 'cpu: some other processor'"):
        load_latency_table(path)
    assert load_latency_table(path, check_device=False).device == "cpu: some other processor"
    path.write_text("{not json")
    with pytest.raises(HawqError, match="not valid JSON"):
        load_latency_table(path)
    with pytest.raises(HawqError, match="file not found"):
        load_latency_table(tmp_path / "missing.json")


def test_latency_budget_in_ilp(tmp_path, small):
    model, costs, traces = small
    path = tmp_path / "lat.json"
    path.write_text(json.dumps(_table(costs, current_device())))
    int8_total = sum(1e-6 * c.macs for c in costs.values())
    cfg = SearchConfig(weight_bits=[4, 8, 16], latency_table=str(path),
                       budget=BudgetConfig(latency_ms=int8_total * 1.2))
    alloc = allocate_bits(model, traces, costs, cfg)
    assert alloc.usage["latency_ms"] <= int8_total * 1.2 + 1e-12
    assert any(b.weight == 16 for b in alloc.bits.values())  # some room for the slow 16-bit kernels
    assert any(b.weight != 16 for b in alloc.bits.values())
    # below the fastest possible: infeasible, and the message gives the minimum (conv1 at w4a8)
    fastest = int8_total - 0.5e-6 * costs["conv1"].macs
    cfg.budget = BudgetConfig(latency_ms=fastest * 0.99)
    with pytest.raises(HawqError, match="latency_ms=.* < smallest feasible") as err:
        allocate_bits(model, traces, costs, cfg)
    assert err.value.minimums["latency_ms"] == pytest.approx(fastest)
    # a table from another device is refused by name
    path.write_text(json.dumps(_table(costs, "cpu: elsewhere")))
    with pytest.raises(HawqError, match="search.latency_table"):
        allocate_bits(model, traces, costs, cfg)


def test_latency_table_object_and_missing_option(small):
    model, costs, traces = small
    table = LatencyTable(device="synthetic", layers={n: {"w8a8": 1.0} for n in costs})
    cfg = SearchConfig(weight_bits=[4, 8], budget=BudgetConfig(latency_ms=100.0))
    with pytest.raises(HawqError, match="no 'w4a8' entry"):
        allocate_bits(model, traces, costs, cfg, latency_table=table)


def test_pareto_sweep_monotone_and_written(tmp_path, small):
    model, costs, traces = small
    cfg = SearchConfig(weight_bits=[2, 4, 8])
    problem = build_search_problem(model, traces, costs, cfg)
    rows = pareto_sweep(problem, n_points=6, progress=False)
    assert len(rows) == 6 and all(r["status"] in ("optimal", "top_precision") for r in rows)
    for r in rows:
        assert r["size_mb"] <= r["budget"] * (1 + 1e-12)
    perts = [r["perturbation"] for r in rows]
    assert all(a >= b - 1e-15 for a, b in zip(perts, perts[1:]))  # more budget never hurts
    uni = uniform_points(problem)
    assert [u["label"] for u in uni] == ["W2A8", "W4A8", "W8A8"]
    assert rows[0]["perturbation"] == pytest.approx(uni[0]["perturbation"])  # min size = all 2-bit
    assert rows[-1]["perturbation"] == pytest.approx(uni[-1]["perturbation"])  # top = all 8-bit
    write_pareto(rows, tmp_path / "p.csv", tmp_path / "p.png", uni)
    with open(tmp_path / "p.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9 and table[-1]["kind"] == "uniform"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(HawqError, match="n_points"):
        pareto_sweep(problem, n_points=1)


def test_build_latency_table_script(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "lat.json"
    proc = subprocess.run([sys.executable, str(root / "scripts" / "build_latency_table.py"), "--out", str(out),
                           "--max-runs", "5", "--min-time", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = load_latency_table(out)  # written on this device: the device check passes
    model = fashion_resnet()
    convs_and_linears = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(table.layers) == sorted(convs_and_linears)
    for row in table.layers.values():
        assert row["fp32"] > 0 and row["w8a8"] > 0 and row["w4a8"] == row["w8a8"]
    assert any("int8" in note for note in table.notes)
