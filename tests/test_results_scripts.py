"""The results scripts (results_fashion, results_minilm, integer_inception, integer_retinanet in scripts/) on tiny
settings."""

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_script

from hawq import HawqError
from hawq.data.fashion_mnist import make_fake_fashion_mnist
from hawq.models.fashion import fashion_resnet
from hawq.search import SearchConfig, build_search_problem, layer_costs, model_size_mb
from hawq.search.allocate import resolve_budgets

results_fashion = load_script("results_fashion")


def tiny_overrides(data_root: Path) -> list[str]:
    return [
        "run.progress=false", "run.threads=2", "model.checkpoint=null", "model.pretrain_epochs=0",
        "model.kwargs.width=4", f"data.root={data_root}", "data.batch_size=32", "data.eval_batch_size=128",
        "sensitivity.batches=1", "sensitivity.batch_size=16", "sensitivity.max_probes=2",
        "sensitivity.min_probes=2", "quant.calib_batches=1", "train.batch_size=32",
    ]


@pytest.fixture(scope="module")
def tiny_problem():
    torch.manual_seed(0)
    model = fashion_resnet(width=4).eval()
    from hawq.layers import quantizable_layers

    layers = quantizable_layers(model)
    x = torch.randn(2, 1, 28, 28)
    costs = layer_costs(model, lambda m: m(x), layers)
    traces = {n: {"mean": float(i + 1), "numel": costs[n].weight_numel} for i, n in enumerate(layers)}
    cfg = SearchConfig(weight_bits=[2, 3, 4, 8], activation_bits=[8])
    return model, layers, build_search_problem(model, traces, costs, cfg)


@pytest.mark.parametrize("budget_bits", [3, 4])
def test_random_allocation_fills_the_budget_and_depends_on_the_seed(tiny_problem, budget_bits):
    model, layers, problem = tiny_problem
    cfg = SearchConfig(budget=SearchConfig().budget.__class__(size_uniform_bits=budget_bits))
    budgets = resolve_budgets(problem, cfg)
    widths = sorted(problem.objective[layers[0]])
    maps = [results_fashion.random_allocation(problem, budgets, seed=s) for s in range(6)]
    for bits in maps:
        assert set(bits) == set(layers)
        size = model_size_mb(model, bits, layers)
        assert size <= budgets["size_mb"] * (1 + 1e-9)
        # maximal: widening any single layer to its next option breaks the budget
        for n in layers:
            opts = [o for o in widths if o[0] > bits[n].weight]
            if opts:
                wider = {**bits, n: type(bits[n])(opts[0][0], bits[n].activation)}
                assert model_size_mb(model, wider, layers) > budgets["size_mb"]
    assert len({tuple(sorted((n, b.weight) for n, b in m.items())) for m in maps}) > 1
    again = results_fashion.random_allocation(problem, budgets, seed=3)
    assert again == maps[3]


def test_random_allocation_greedy_fallback_is_maximal(tiny_problem, monkeypatch):
    model, layers, problem = tiny_problem
    monkeypatch.setattr(results_fashion, "MAX_ENUMERATED_MAPS", 1)
    budgets = resolve_budgets(problem, SearchConfig(budget=SearchConfig().budget.__class__(size_uniform_bits=3)))
    bits = results_fashion.random_allocation(problem, budgets, seed=0)
    assert model_size_mb(model, bits, layers) <= budgets["size_mb"] * (1 + 1e-9)
    assert any(b.weight != 3 for b in bits.values())


def test_random_allocation_rejects_an_impossible_budget(tiny_problem):
    _, _, problem = tiny_problem
    budgets = resolve_budgets(problem, SearchConfig(budget=SearchConfig().budget.__class__(size_uniform_bits=2)))
    with pytest.raises(HawqError, match="no bit map"):
        results_fashion.random_allocation(problem, {"size_mb": budgets["size_mb"] * 0.5}, seed=0)


def test_mean_spread():
    s = results_fashion.mean_spread([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert results_fashion.mean_spread([5.0])["std"] == 0.0
    with pytest.raises(HawqError):
        results_fashion.mean_spread([])


def test_fashion_results_end_to_end_and_resume(tmp_path):
    root = make_fake_fashion_mnist(tmp_path / "fmnist", n_train=96, n_test=64)
    cfg = results_fashion.build_config(str(REPO / "configs/fashion_resnet.yaml"), tiny_overrides(root),
                                       finetune_epochs=0.5, test_subset=None, train_subset=None,
                                       max_probes=None, threads=None)
    out = tmp_path / "out"
    data = results_fashion.run_results(cfg, [0], [3], out, progress=False)
    assert set(data["cells"]) == {f"seed0/w3/{m}" for m in ("uniform", "random", "hawq")}
    for cell, r in data["cells"].items():
        assert 0.0 <= r["before"] <= 100.0 and 0.0 <= r["after"] <= 100.0, cell
        assert data["sizes_mb"][cell]["size_mb"] <= data["sizes_mb"][cell]["budget_mb"] * (1 + 1e-9)
    assert all(w == 3 for w in data["bits"]["seed0/w3/uniform"].values())
    on_disk = json.loads((out / "results_fashion.json").read_text())
    assert on_disk["cells"] == data["cells"]

    # resume: nothing is recomputed
    seen = []
    results_fashion.run_results(cfg, [0], [3], out, progress=False, on_cell=lambda c, r: seen.append(c))
    assert seen == []
    table, claims = results_fashion.write_outputs(data, [0], [3], out, "results_fashion", "test", png=True)
    assert "| uniform 3-bit" in table and table.count("\n|") == 5
    assert len(claims) == 2 and all(isinstance(ok, bool) for ok, _ in claims)
    for suffix in (".md", ".png", "_summary.json"):
        assert (out / f"results_fashion{suffix}").is_file()

    # other settings in the same folder: refused
    cfg.train.epochs = 0.25
    with pytest.raises(HawqError, match="other settings"):
        results_fashion.run_results(cfg, [0], [3], out, progress=False)


def test_minilm_results_on_a_tiny_encoder(tmp_path):
    results_minilm = load_script("results_minilm")
    tiny = ("{vocab_size: 30522, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
            "intermediate_size: 64, max_position_embeddings: 64}")
    overrides = ["run.progress=false", "run.threads=2", "model.name=bert_encoder", f"model.kwargs.config={tiny}",
                 "data.max_length=24", "sensitivity.batch_size=8", "sensitivity.max_probes=2",
                 "sensitivity.min_probes=2", "quant.calib_batches=1", "train.lr=0.001"]
    cfg = results_fashion.build_config(str(REPO / "configs/minilm_sentence.yaml"), overrides,
                                       finetune_epochs=0.2, test_subset=None, train_subset=None,
                                       max_probes=None, threads=None)
    data = results_minilm.run_minilm_results(cfg, tmp_path / "out", budget_bits=4, progress=False,
                                             config_dir=REPO / "configs")
    assert list(data["cells"]) == ["uniform8", "uniform4", "hawq"]
    assert set(data["bits"]["uniform8"].values()) == {8} and set(data["bits"]["uniform4"].values()) == {4}
    assert data["sizes_mb"]["hawq"]["size_mb"] <= data["sizes_mb"]["hawq"]["budget_mb"] * (1 + 1e-9)
    assert data["sizes_mb"]["uniform4"]["size_mb"] < data["sizes_mb"]["uniform8"]["size_mb"]
    for name, r in data["cells"].items():
        for metrics in (r["before_metrics"], r["after_metrics"]):
            assert -1.0 <= metrics["cosine_worst"] <= metrics["cosine_mean"] <= 1.0 + 1e-6, name
    # 8-bit weights keep the embeddings closer to FP32 than 4-bit ones
    assert data["cells"]["uniform8"]["before"] > data["cells"]["uniform4"]["before"]
    table = results_minilm.markdown_table(data)
    assert table.count("\n|") == 4 and "hawq" in table


def test_act_ablation_roles_cover_every_minilm_linear(capsys):
    ablation = load_script("results_act_ablation")
    names = [f"bert.encoder.layer.{i}.{s}" for i in range(6) for s in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")]
    roles = [ablation._role_of(n) for n in names]
    assert [roles.count(r) for r in ablation.ROLES] == [18, 6, 6, 6]
    assert ablation._role_of("bert.encoder.layer.3.output.dense") == "GELU out -> output.dense"
    assert ablation._role_of("bert.encoder.layer.3.attention.output.dense").startswith("attention context")
    assert ablation.main(["--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --threads must be >= 1, got 0"


def test_family_exports_resnet18_row_passes_both_verdicts(tmp_path, capsys):
    family_exports = load_script("family_exports")
    threads = torch.get_num_threads()
    try:
        family_exports.main(["--families", "resnet18", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| family | FP32 score |") and len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "resnet18"
    metric, score = cells[1].split()
    assert metric == "top1" and float(score) > 100 / 3  # briefly trained: above chance on 3 classes
    assert cells[2].startswith("pass: worst ") and cells[2].endswith("argmax 100%"), cells[2]
    assert cells[3] == "pass: bit-identical", cells[3]
    report = json.loads((tmp_path / "resnet18" / "report.json").read_text())
    assert report["export"]["onnx"]["check"]["verdict"] == "pass"
    assert report["export"]["onnx_integer"]["check"]["exact_fraction"] == 1.0
    # a finished family is reused, not run again
    (tmp_path / "resnet18" / "report.json").unlink()
    family_exports.main(["--families", "resnet18", "--out", str(tmp_path)])
    assert capsys.readouterr().out.strip().splitlines()[2] == lines[2]
    for bad in (["--families", "resnet18,vgg"], ["--families", ","]):
        with pytest.raises(SystemExit) as e:
            family_exports.main([*bad, "--out", str(tmp_path)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("--families: unknown family") and "\n" not in err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        family_exports.main(["--out", str(tmp_path / "file" / "sub")])
    assert e.value.code == 2 and "is a file" in capsys.readouterr().err


def _run_main_keeping_threads(monkeypatch, capsys, script, argv: list[str]) -> str:
    """``script.main()`` with ``argv`` (the scripts set the thread count; restore it) -> its stdout."""
    threads = torch.get_num_threads()
    monkeypatch.setattr("sys.argv", [f"{script.__name__}.py", *argv])
    try:
        script.main()
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def test_integer_inception_script_small(monkeypatch, capsys):
    script = load_script("integer_inception")
    out = _run_main_keeping_threads(monkeypatch, capsys, script, ["--size", "75", "--classes", "10"])
    assert "model_int.onnx pass (bit-identical" in out and "9 Pad" in out, out
    monkeypatch.setattr("sys.argv", ["integer_inception.py", "--size", "32"])
    with pytest.raises(SystemExit) as e:
        script.main()
    assert e.value.code == 2


def test_integer_retinanet_script_small(monkeypatch, capsys):
    script = load_script("integer_retinanet")
    out = _run_main_keeping_threads(monkeypatch, capsys, script,
                                    ["--size", "64", "--classes", "3", "--check-sizes", "96x64"])
    assert "model_int.onnx pass (bit-identical" in out and "2 Resize" in out, out
    assert "same file at 96x64: pass (bit-identical" in out, out
    monkeypatch.setattr("sys.argv", ["integer_retinanet.py", "--check-sizes", "9x9"])
    with pytest.raises(SystemExit) as e:
        script.main()
    assert e.value.code == 2 and "--check-sizes: '9x9'" in capsys.readouterr().err


def test_minilm_trace_maps_rejects_bad_arguments(capsys):
    script = load_script("minilm_trace_maps")
    assert script.main(["--configs", "nope"]) == 2
    assert capsys.readouterr().err.strip() == "error: --configs: no configs/nope.yaml"
    assert script.main(["--budgets", "4,x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --budgets must be integers in 2..8, got '4,x'"
