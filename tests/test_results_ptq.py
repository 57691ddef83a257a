"""scripts/results_ptq.py on a tiny setting: cells, budgets, resume, torn lines, the report."""

import json

import numpy as np
import pytest
import torch
from conftest import REPO, load_script

from hawq import HawqError
from hawq.data.fashion_mnist import make_fake_fashion_mnist
from hawq.models.fashion import fashion_resnet
from hawq.search import SearchConfig, build_search_problem, layer_costs, model_size_mb

results_fashion = load_script("results_fashion")
results_ptq = load_script("results_ptq")

TINY = ["run.progress=false", "run.threads=2", "model.checkpoint=null", "model.pretrain_epochs=0",
        "model.kwargs.width=4", "data.batch_size=32", "data.eval_batch_size=128", "sensitivity.batches=1",
        "sensitivity.batch_size=8", "sensitivity.max_probes=2", "sensitivity.min_probes=2",
        "quant.calib_batches=1", "train.batch_size=32"]


def test_fractional_budget_and_random_maximal_maps_meet_it():
    torch.manual_seed(0)
    model = fashion_resnet(width=4).eval()
    from hawq.layers import quantizable_layers

    layers = quantizable_layers(model)
    x = torch.randn(2, 1, 28, 28)
    costs = layer_costs(model, lambda m: m(x), layers)
    cfg = SearchConfig(weight_bits=[2, 3, 4, 8], activation_bits=[8])
    problem = build_search_problem(model, {n: {"mean": 1.0, "numel": 1} for n in layers}, costs, cfg)
    b2, b3 = (results_ptq.size_budget(problem, cfg, b)["size_mb"] for b in (2, 3))
    half = results_ptq.size_budget(problem, cfg, 2.5)["size_mb"]
    assert b2 < half < b3 and half == pytest.approx((b2 + b3) / 2)
    assert b3 == pytest.approx(model_size_mb(model, results_ptq.uniform_map(layers, {}, 3), layers))
    for seed in range(4):
        bits = results_fashion.random_allocation(problem, {"size_mb": half}, seed=seed)
        size = model_size_mb(model, bits, layers)
        assert size <= half * (1 + 1e-9)
        for n in layers:  # maximal: no single layer can be widened within the budget
            wider = [w for w in (3, 4, 8) if w > bits[n].weight]
            if wider:
                trial = {**bits, n: type(bits[n])(wider[0], 8)}
                assert model_size_mb(model, trial, layers) > half
    rng = np.random.default_rng(0)
    pins = {layers[0]: {"weight": 8}}
    maps = [results_ptq.random_bit_map(layers, pins, [2, 3, 4, 8], rng) for _ in range(5)]
    assert all(m[layers[0]].weight == 8 and m[layers[0]].activation == 32 for m in maps)
    assert len({tuple(lb.weight for lb in m.values()) for m in maps}) > 1


def test_results_ptq_cells_resume_and_report(tmp_path):
    root = make_fake_fashion_mnist(tmp_path / "fmnist", n_train=96, n_test=64)
    cfg = results_fashion.build_config(str(REPO / "configs/fashion_resnet.yaml"), [*TINY, f"data.root={root}"],
                                       0.0, None, None, None, None)
    out = tmp_path / "out"
    criteria = ["hessian", "fisher", "empirical_fisher", "qerror", "random"]
    kwargs = dict(seeds=[0], budgets=[2.5, 3.0], criteria=criteria, roundings=["nearest"],
                  phases=["ptq", "quad", "ft"], quad_maps=4, finetune_epochs=0.5, eigen_iters=3,
                  config_dir=REPO / "configs")
    seen = []
    cells = results_ptq.run_model("fashion", cfg, out, on_cell=lambda k, c: seen.append(k), **kwargs)
    want = {"fp32", "quad/perturbations", "quad/fp32", *(f"quad/map{i}" for i in range(4)),
            *(f"seed0/sens/{c}" for c in criteria if c != "random"),
            *(f"seed0/b{b}/{m}/nearest/{k}" for b in ("2.5", "3") for m in ["uniform", *criteria]
              for k in ("ptq", "ft"))}
    assert set(cells) == want and sorted(seen) == sorted(want)
    for key, c in cells.items():
        if "/nearest/" in key:
            assert c["size_mb"] <= c["budget_mb"] * (1 + 1e-9), key
            assert 0.0 <= c["metric"] <= 100.0, key
    assert set(cells["seed0/b2.5/uniform/nearest/ptq"]["bits"].values()) == {2}  # widest uniform that fits
    assert cells["seed0/sens/fisher"]["cpu_seconds"] >= 0 and set(cells["seed0/sens/fisher"]["sens"]) == set(
        cells["seed0/sens/hessian"]["sens"])
    for i in range(4):
        c = cells[f"quad/map{i}"]
        assert c["increase"] == pytest.approx(c["loss"] - cells["quad/fp32"]["loss"])

    # resume: nothing recomputed; a torn last line (killed mid-write) is dropped and redone
    path = out / "fashion.jsonl"
    seen.clear()
    results_ptq.run_model("fashion", cfg, out, on_cell=lambda k, c: seen.append(k), **kwargs)
    assert seen == []
    lines = path.read_text().splitlines()
    last = json.loads(lines[-1])["key"]
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    results_ptq.run_model("fashion", cfg, out, on_cell=lambda k, c: seen.append(k), **kwargs)
    assert seen == [last]
    assert all(json.loads(line) for line in path.read_text().splitlines())

    # the report: tables, Spearman rows, plots
    md = results_ptq.write_report(out, tmp_path / "docs")
    assert "| hessian |" in md and "Spearman" in md and "not applicable" not in md.split("Spearman")[0]
    assert (tmp_path / "docs" / "results_ptq.png").is_file()
    assert (tmp_path / "docs" / "results_ptq_quadratic.png").is_file()
    q = results_ptq.quad_rows(results_ptq.read_cells(path))
    assert set(q) == {c for c in criteria if c != "random"} and all(len(r["predicted"]) == 4 for r in q.values())

    # other settings in the same folder: refused before any work
    cfg.quant.calib_batches = 2
    with pytest.raises(HawqError, match="other settings"):
        results_ptq.run_model("fashion", cfg, out, **kwargs)


def test_results_ptq_rejects_bad_arguments(tmp_path, capsys):
    assert results_ptq.main(["--budgets", "2.5,9", "--out", str(tmp_path)]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert results_ptq.main(["--criteria", "hessian,nope", "--out", str(tmp_path)]) == 2
    assert "unknown criterion 'nope'" in capsys.readouterr().err


def test_with_rounding_sets_the_quant_option():
    cfg = results_fashion.build_config(str(REPO / "configs/fashion_resnet.yaml"), [], 0.0, None, None, None, None)
    assert results_ptq.with_rounding(cfg, "gptq").quant.rounding == "gptq"
    assert cfg.quant.rounding == "nearest"  # a copy: the base config is untouched


def test_partial_spearman_removes_a_shared_trend():
    rng = np.random.default_rng(0)
    z = rng.normal(size=300)
    x, y = z + 0.2 * rng.normal(size=300), z + 0.2 * rng.normal(size=300)  # related only through z
    assert results_ptq.spearman(x, y) > 0.85
    assert abs(results_ptq.partial_spearman(x, y, z)) < 0.2
    assert results_ptq.partial_spearman(x, x + 0.01 * y, z) > 0.9  # a direct link survives


def test_report_of_finetuned_cells_only(tmp_path):
    # ``--phases ft`` into its own file (MiniLM's finetuned cells): tables, and no empty PTQ plot
    out = tmp_path / "out"
    out.mkdir()
    cell = {"bits": {"a": 4}, "size_mb": 1.0, "budget_mb": 1.0, "before": 0.9, "seconds": 1.0}
    lines = [{"settings_digest": "x", "settings": {}}, {"key": "fp32", "metric": 1.0},
             {"key": "seed0/b4/uniform/nearest/ft", **cell, "metric": 0.95},
             {"key": "seed0/b4/hessian/nearest/ft", **cell, "metric": 0.97}]
    (out / "minilm.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    md = results_ptq.write_report(out, tmp_path / "docs")
    assert "**minilm, rounding nearest, after the short finetune**" in md and "**0.9700 (n=1)**" in md
    assert not (tmp_path / "docs" / "results_ptq.png").exists()
    # the compact table is the finetuned one (was a header with empty rows)
    compact = (out / "results_ptq_compact.md").read_text()
    assert compact.startswith("| minilm, after the short finetune | 4-bit size, nearest |"), compact
    assert "| hessian | **0.9700 (n=1)** |" in compact and "| uniform | 0.9500 (n=1) |" in compact, compact
