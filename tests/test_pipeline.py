"""End to end: every stage on a tiny Fashion-MNIST stand-in, through the CLI, in seconds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hawq.data.fashion_mnist import make_fake_fashion_mnist
from hawq.quantize import main

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(data_root: Path, out_dir: Path, name: str = "tiny") -> list[str]:
    return [
        f"run.name={name}", f"run.out_dir={out_dir}", "run.progress=false", "run.threads=2",
        "model.checkpoint=null", "model.pretrain_epochs=2", "model.pretrain_lr=0.05", "model.kwargs.width=4",
        f"data.root={data_root}", "data.batch_size=32", "data.eval_batch_size=128",
        "sensitivity.batches=2", "sensitivity.batch_size=32", "sensitivity.max_probes=6",
        "sensitivity.min_probes=3", "sensitivity.density_iter=8", "quant.calib_batches=2", "train.epochs=0.5",
        "train.batch_size=32",
    ]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=384, n_test=128)


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    rc = main(["--config", str(REPO / "configs/fashion_resnet.yaml"), *sum(
        (["--set", o] for o in tiny_overrides(tiny_data, out)), [])])
    assert rc == 0
    return out / "tiny"


def test_run_folder_has_every_artifact(tiny_run):
    for name in ("config.yaml", "traces.json", "bits.yaml", "metrics.json", "report.json", "report.md",
                 "traces_bits.png", "model.safetensors", "model.onnx", "model_int.onnx", "density.png", "pareto.png",
                 "pareto.csv"):
        assert (tiny_run / name).is_file(), name
    export = json.loads((tiny_run / "report.json").read_text())["export"]
    # the integer-only ONNX model computes exactly what hawq's PyTorch integer model computes
    assert export["onnx_integer"]["check"]["exact_fraction"] == 1.0
    assert export["onnx_integer"]["check"]["max_diff_in_steps"] == 0.0
    assert export["onnx_integer"]["check"]["verdict"] == "pass"
    assert export["onnx"]["check"]["verdict"] == "pass", export["onnx"]["check"]
    md = (tiny_run / "report.md").read_text()
    assert md.count("**PASS**") == 2 and "**FAIL**" not in md


def test_report_keys_and_values(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    for key in ("fp32_top1", "quant_top1_before_finetune", "quant_top1_after_finetune",
                "uniform_top1_same_size", "size_mb", "bops_g", "bits"):
        assert key in report, key
    for key in ("fp32_top1", "quant_top1_before_finetune", "quant_top1_after_finetune", "uniform_top1_same_size"):
        assert 0.0 <= report[key] <= 100.0
    bits = yaml.safe_load((tiny_run / "bits.yaml").read_text())["layers"]
    assert set(bits) == set(report["bits"])
    assert all(b["weight"] in (2, 3, 4, 8) and b["activation"] == 8 for b in bits.values())
    # the size budget is uniform 3-bit weights: the allocation must fit in it
    assert report["search"]["usage"]["size_mb"] <= report["search"]["budgets"]["size_mb"] * (1 + 1e-9)


def test_rerun_resumes_and_is_deterministic(tiny_run, tiny_data):
    before = {n: (tiny_run / n).read_text() for n in ("traces.json", "bits.yaml")}
    rc = main(["--config", str(REPO / "configs/fashion_resnet.yaml"), *sum(
        (["--set", o] for o in tiny_overrides(tiny_data, tiny_run.parent)), [])])
    assert rc == 0
    assert {n: (tiny_run / n).read_text() for n in before} == before


def test_same_seed_fresh_folder_gives_same_traces_and_bits(tiny_run, tiny_data, tmp_path):
    # same FP32 weights (the first run's pretrained model), a fresh folder: nothing to resume from
    extra = ["run.stages=[sensitivity,search]", f"model.checkpoint={tiny_run / 'fp32.safetensors'}",
             "sensitivity.top_eigen=0", "sensitivity.density_iter=0"]
    rc = main(["--config", str(REPO / "configs/fashion_resnet.yaml"), *sum(
        (["--set", o] for o in tiny_overrides(tiny_data, tmp_path, "again") + extra), [])])
    assert rc == 0
    a = json.loads((tiny_run / "traces.json").read_text())["layers"]
    b = json.loads((tmp_path / "again" / "traces.json").read_text())["layers"]
    assert a == b
    assert (tiny_run / "bits.yaml").read_text() == (tmp_path / "again" / "bits.yaml").read_text()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hawq.quantize", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_curvature_option_reaches_traces_and_report(tiny_run, tiny_data, tmp_path):
    extra = ["run.stages=[sensitivity,search]", f"model.checkpoint={tiny_run / 'fp32.safetensors'}",
             "sensitivity.top_eigen=0", "sensitivity.density_iter=0", "sensitivity.curvature=gauss_newton",
             "sensitivity.exact_directions=4"]  # 10 classes > 4: sampled output-space probes
    rc = main(["--config", str(REPO / "configs/fashion_resnet.yaml"), *sum(
        (["--set", o] for o in tiny_overrides(tiny_data, tmp_path, "gn") + extra), [])])
    assert rc == 0
    data = json.loads((tmp_path / "gn" / "traces.json").read_text())
    assert data["meta"]["curvature"] == "gauss_newton" and data["meta"]["sampled_layers"] == sorted(data["layers"])
    assert data["meta"]["output_space"]["mode"] == "sampled"
    assert "direction cap (4)" in data["meta"]["output_space"]["why"]
    assert all(t["curvature"] == "gauss_newton" and t["mean"] > 0 for t in data["layers"].values())
    report = (tmp_path / "gn" / "report.md").read_text()
    assert "Gauss-Newton traces (curvature: gauss_newton)" in report and "gn_sampled" in report
    assert "- output space: sampled (more outputs per sample than the direction cap (4)" in report


@pytest.mark.parametrize("args, message", [
    (["--set", "model.name=resnet19"], "unknown model 'resnet19'"),
    (["--set", "data.root=/nonexistent/fmnist"], "Fashion-MNIST folder not found: /nonexistent/fmnist"),
    (["--set", "search.budget.size_mbb=1"], "unknown config key 'search.budget.size_mbb'"),
    (["--config", "missing.yaml"], "config file not found"),
    (["--set", "sensitivity.curvature=psd"], "sensitivity.curvature must be 'hessian' or 'gauss_newton'"),
])
def test_bad_input_one_line_exit_2_no_run_folder(tmp_path, args, message):
    argv = list(args)
    if "--config" not in argv:
        argv = ["--config", str(REPO / "configs/fashion_resnet.yaml"), *argv]
    proc = _cli(*argv, "--set", f"run.out_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_yaml_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("run: {name: [x\n")
    proc = _cli("--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2 and "invalid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_infeasible_budget_names_smallest_feasible(tiny_data, tmp_path):
    argv = ["--config", str(REPO / "configs/fashion_resnet.yaml")]
    for o in tiny_overrides(tiny_data, tmp_path, "infeasible") + ["search.budget.size_uniform_bits=null",
                                                                  "search.budget.size_mb=0.00001"]:
        argv += ["--set", o]
    proc = _cli(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "size_mb" in last and "smallest feasible" in last, last
    assert not (tmp_path / "infeasible" / "report.json").exists()
    # the budget is checked before any training or Hessian work
    assert not (tmp_path / "infeasible" / "traces.json").exists()
    assert not (tmp_path / "infeasible" / "fp32.safetensors").exists()
    status = json.loads((tmp_path / "infeasible" / "status.json").read_text())
    assert status["status"] == "failed" and "size_mb" in status["error"]


REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (REAL_FASHION / "train-images-idx3-ubyte.gz").exists(), reason="needs dataset-fashion-mnist")
def test_real_fashion_subset_learns_and_quantizes(tmp_path):
    """A few thousand real images: the FP32 model learns, and 4/8-bit HAWQ keeps most of it."""
    argv = ["--config", str(REPO / "configs/fashion_resnet.yaml")]
    for o in [f"run.out_dir={tmp_path}", "run.name=real", "run.progress=false", "model.checkpoint=null",
              "model.pretrain_epochs=2", "model.kwargs.width=8", "data.train_subset=2048", "data.test_subset=500",
              "data.batch_size=32", "sensitivity.batches=1", "sensitivity.batch_size=64", "sensitivity.max_probes=4",
              "sensitivity.min_probes=4", "sensitivity.top_eigen=0", "sensitivity.density_iter=0",
              "search.weight_bits=[4,8]", "search.budget.size_uniform_bits=null", "search.budget.size_mb=0.03",
              "search.pareto_points=0", "train.epochs=0.5", "train.batch_size=32", "export.onnx=false",
              "run.stages=[sensitivity,search,quantize,finetune]"]:
        argv += ["--set", o]
    assert main(argv) == 0
    report = json.loads((tmp_path / "real" / "report.json").read_text())
    assert report["fp32_top1"] > 60.0
    assert report["quant_top1_after_finetune"] > report["fp32_top1"] - 10.0
    assert report["size_mb"] <= 0.03


def test_progress_bars_show_only_on_a_terminal(monkeypatch):
    """run.progress asks for bars; tqdm draws them only when its stream is a terminal (bars_off gives
    it None), so a run redirected to a log file or captured by CI writes no bars."""
    import io

    from tqdm.auto import tqdm

    from hawq import bars_off

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert bars_off(False) is True
    for stream, shown in ((Tty(), True), (io.StringIO(), False)):
        for _ in tqdm(range(3), file=stream, disable=bars_off(True), desc="work"):
            pass
        assert ("work" in stream.getvalue()) is shown
