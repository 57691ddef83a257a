"""scripts/bench_sensitivity.py: its case builders and its smallest case, end to end (a few seconds)."""

import json

import pytest
import torch
from conftest import load_script

bench = load_script("bench_sensitivity")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--cases", "tiny", "--json", str(out / "b.json"), "--plot", str(out / "b.png"),
                              "--mc-pilot", "4"])
    finally:
        torch.set_num_threads(threads)  # main() pins one thread for its timings
    return out, results


def test_tiny_case_runs_and_writes_json_plot_and_min_line(tiny_run, capsys):
    out, results = tiny_run
    r = results["tiny"]
    assert r["hawq"]["cpu_s"] > 0 and r["pyhessian"]["cpu_s"] > 0
    assert r["pyhessian"]["ratio"] == pytest.approx(r["pyhessian"]["cpu_s"] / r["hawq"]["cpu_s"])
    assert r["pyhessian"]["worst_z"] < 5  # the baseline estimates the same traces
    saved = json.loads((out / "b.json").read_text())
    assert saved["cases"]["tiny"]["hawq"]["traces"].keys() == r["hawq"]["traces"].keys()
    assert (out / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_backpack_exact_ggn_diagonal_equals_hawq_exact_traces(tiny_run):
    pytest.importorskip("backpack")
    r = tiny_run[1]["tiny"]
    exact = r["backpack"]["exact"]
    assert all(t[1] == 0 for t in r["hawq"]["traces"].values())  # ReLU net, 20 classes: hawq exact everywhere
    assert exact["max_rel_diff_exact"] < 1e-4
    mc = r["backpack"]["mc"]
    assert mc["samples"] >= 1 and mc["worst_z"] < 6


def test_speed_up_line_is_the_minimum_over_cases(tiny_run, capsys):
    assert bench.speed_up_line({"a": 83.3, "b": 0.754, "c": 12.0}) == "speed-up: 0.75 x faster than PyHessian per-layer"
    assert bench.speed_up_line({"a": 83.3, "b": 12.04}) == "speed-up: 12.0 x faster than PyHessian per-layer"


def test_case_builders():
    case = bench.imagenet_like("resnet18", 0, 2, 32, confident=True)
    with torch.no_grad():
        p = case.model(case.batches[0][0]).softmax(1)
    assert float(p.max(1).values.mean()) > 0.99  # the confident classifier the issue asks for
    assert torch.equal(p.argmax(1), case.batches[0][1])
    assert case.classes == 1000 and case.backpack_skip is None
    with pytest.raises(SystemExit, match="unknown case"):
        bench.parse_cases("fashion,nope")
    assert set(bench.DEFAULT_CASES) <= set(bench.CASES)


def test_backpack_chunks_split_mc_samples_first_then_the_batch_and_add_up_exactly():
    pytest.importorskip("backpack")
    from hawq.layers import quantizable_layers

    case = bench.case_tiny(0)
    layers = quantizable_layers(case.model)
    one = bench.backpack_memory_gb(case, layers, 1, 1)
    assert bench.backpack_chunks(case, layers, 64, 1e9, split_columns=True)[:2] == (4, 64)
    assert bench.backpack_chunks(case, layers, 64, 4 * 8 * one, split_columns=True)[:2] == (4, 8)
    assert bench.backpack_chunks(case, layers, 20, 2 * one, split_columns=False)[:2] == (1, 20)
    case._backpack = bench._backpack_model(case, layers)
    whole, _ = bench.backpack_traces(case, layers, "exact", 4)
    split, _ = bench.backpack_traces(case, layers, "exact", 1)
    for n in layers:
        assert split[n] == pytest.approx(whole[n], rel=1e-5)


def test_per_sample_script_rejects_bad_arguments_in_one_line(capsys):
    script = load_script("sensitivity_per_sample")
    for argv in (["--case", "nope"], ["--probes", "1"], ["--ref-tol", "0"]):
        with pytest.raises(SystemExit) as e:
            script.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --case must be one of")
