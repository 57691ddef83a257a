"""Hardening (issue 15): every bad input fails fast with one line, run names stay inside out_dir,
divergence is caught, interrupted runs are reported, outputs are byte-reproducible.

The CLI cases run ``hawq.quantize.main`` in-process: a config error is found before any model is
built, so each case takes milliseconds. The README's "Reliability" figures count the cases here
(``pytest --collect-only -q tests/test_hardening.py``).
"""

import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from hawq import HawqError
from hawq.bitmap import LayerBits
from hawq.config import load_config, run_folder
from hawq.data.fashion_mnist import FILES, make_fake_fashion_mnist, read_idx, write_idx
from hawq.models.tasks import ClassificationTask
from hawq.quantize import main
from hawq.train import DistillConfig, TrainConfig, train
from hawq.train.checkpoint import checkpoint_paths

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/fashion_resnet.yaml")


def run_cli(capsys, out_dir: Path, *sets: str, config: str | None = CONFIG) -> tuple[int, list[str]]:
    """``main()`` with ``--set`` overrides; returns the exit code and the non-empty stderr lines."""
    argv = [] if config is None else ["--config", config]
    for s in (f"run.out_dir={out_dir}", "run.progress=false", "run.threads=1", *sets):
        argv += ["--set", s]
    rc = main(argv)
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_line(rc: int, lines: list[str], message: str) -> None:
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("hawq: error: ") and message in lines[0], lines


# --------------------------------------------------------------------------------------------- config values

BAD_VALUES = [
    # failed with a traceback and exit 1
    ("run.threads=-1", "run.threads must be an integer >= 1 or null"),
    ("data.batch_size=0", "data.batch_size must be an integer >= 1"),
    ("data.eval_batch_size=0", "data.eval_batch_size must be an integer >= 1"),
    ("data.train_subset=0", "data.train_subset must be an integer >= 1"),
    ("data.test_subset=0", "data.test_subset must be an integer >= 1"),
    ("quant.group_size=0", "quant.group_size must be an integer >= 1 or null"),
    ("train.momentum=-1", "train.momentum must be a finite number >= 0"),
    ("train.weight_decay=-1", "train.weight_decay must be a finite number >= 0"),
    ("train.epochs=.inf", "config key 'train.epochs': expected a finite number"),
    # accepted silently
    ("data.train_subset=-5", "data.train_subset must be an integer >= 1"),
    ("quant.act_percentile=-5", "quant.act_percentile must be in (0, 100]"),
    ("quant.act_percentile=101", "quant.act_percentile must be in (0, 100]"),
    # validated too late (after sensitivity and search, or after finetuning)
    ("train.lr=-1", "train.lr must be a finite number > 0"),
    ("train.lr=.nan", "config key 'train.lr': expected a finite number"),
    ("train.lr=.inf", "config key 'train.lr': expected a finite number"),
    ("export.onnx_opset=5", "export.onnx_opset must be an integer >= 13"),
    ("export.onnx_opset=999", "export.onnx_opset is 999 but the installed onnx knows opsets up to"),
    ("train.schedule=linear", "train.schedule must be 'cosine' or 'constant'"),
    ("model.pretrain_lr=0", "model.pretrain_lr must be > 0"),
    ("quant.act_calibration=max", "quant.act_calibration must be 'minmax', 'ema', 'percentile' or 'mse', "
                                  "got 'max' (did you mean 'minmax'?)"),
    ("search.weight_bits=[1,4]", "search.weight_bits: bit options must be integers in 2..16, got 1"),
    ("search.solver=glpk", "search.solver: unknown solver 'glpk'"),
    ("search.pins={fc: {weight: 1}}", "search.pins.fc.weight: bits must be in 2..16"),
    ("sensitivity.tol=-1", "sensitivity.tol must be >= 0"),
    ("sensitivity.min_probes=50", "sensitivity.max_probes (32) must be >= sensitivity.min_probes (50)"),
    ("model.num_classes=0", "model.num_classes must be an integer >= 1 or null"),
    # run names that escape run.out_dir or are run.out_dir itself
    ("run.name=../escape", "run.name must be one folder name inside run.out_dir"),
    ("run.name=/tmp/hawq-absolute", "run.name must be one folder name inside run.out_dir"),
    ("run.name=..", "run.name must be one folder name inside run.out_dir"),
    ("run.name=.", "run.name must be one folder name inside run.out_dir"),
    ("run.name=''", "run.name must be one folder name inside run.out_dir"),
    ("run.name=a/b", "run.name must be one folder name inside run.out_dir"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_one_line_exit_2_nothing_written(capsys, tmp_path, override, message):
    out = tmp_path / "runs"
    rc, lines = run_cli(capsys, out, override)
    assert_one_line(rc, lines, message)
    assert not out.exists()  # no run folder, nothing inside or outside out_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_yaml_12_floats_are_numbers(tmp_path):
    cfg = load_config(None, ["train.lr=1e-3", "search.budget.size_mb=5E-2", "train.min_lr=+1e-6"])
    assert (cfg.train.lr, cfg.search.budget.size_mb, cfg.train.min_lr) == (1e-3, 5e-2, 1e-6)
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 2e-4\n")
    assert load_config(p).train.lr == 2e-4
    with pytest.raises(HawqError, match="expected a number, got '1e-3x'"):
        load_config(None, ["train.lr=1e-3x"])


def test_out_dir_tilde_is_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_folder(load_config(None, ["run.out_dir=~/x", "run.name=r"])) == tmp_path / "x" / "r"


# --------------------------------------------------------------------------------------------- files and folders

def test_no_config_prints_usage_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m hawq.quantize") and "hawq: error: --config is required" in err
    assert list(tmp_path.iterdir()) == []  # no ./runs/demo


def test_config_not_utf8(capsys, tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    rc, lines = run_cli(capsys, tmp_path / "runs", config=str(cfg))
    assert_one_line(rc, lines, "not UTF-8 text (byte 16)")


def test_out_dir_is_a_file(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder\n")
    rc, lines = run_cli(capsys, target, "run.name=r")
    assert_one_line(rc, lines, f"run.out_dir: {target} is a file, not a folder")
    assert target.read_text() == "not a folder\n"


def _read_only_dir(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores permission bits: use a filesystem nobody may write to
        ro = Path("/sys/hawq-test")
        if not Path("/sys").is_dir():
            pytest.skip("no read-only folder available")
    return ro


def test_read_only_out_dir(capsys, tmp_path):
    ro = _read_only_dir(tmp_path)
    rc, lines = run_cli(capsys, ro / "runs", "run.name=r")
    assert_one_line(rc, lines, "run.out_dir: cannot write in")
    assert not (ro / "runs").exists()


def test_labels_outside_the_class_range(capsys, tmp_path):
    data = make_fake_fashion_mnist(tmp_path / "fmnist", n_train=64, n_test=32)
    lbl = data / f"{FILES['test'][1]}.gz"
    labels = read_idx(lbl).copy()
    labels[5] = 12
    write_idx(lbl, labels)
    rc, lines = run_cli(capsys, tmp_path / "runs", f"data.root={data}")
    assert_one_line(rc, lines, "Fashion-MNIST test: label 12 is outside 0..9")
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------- whole runs

@pytest.fixture(scope="module")
def fake_data(tmp_path_factory) -> Path:
    return make_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=256, n_test=128)


def small_run(data: Path, name: str, *extra: str) -> list[str]:
    """A seconds-long run on the fake data: the shipped FP32 weights, one Hessian batch, a quarter epoch."""
    return [f"run.name={name}", f"data.root={data}", "data.batch_size=32", "data.eval_batch_size=128",
            "sensitivity.batches=1", "sensitivity.batch_size=32", "sensitivity.max_probes=2",
            "sensitivity.min_probes=2", "sensitivity.top_eigen=0", "sensitivity.density_iter=0",
            "search.pareto_points=0", "quant.calib_batches=1", "train.epochs=0.25", "train.batch_size=32",
            "export.onnx=false", "export.onnx_integer=false", *extra]


def test_diverging_finetune_stops_with_one_line(capsys, tmp_path, fake_data):
    rc, lines = run_cli(capsys, tmp_path, *small_run(fake_data, "lr1e6", "train.lr=1e6"))
    assert_one_line(rc, lines, "training diverged: loss is ")
    assert "lower train.lr (now 1e+06)" in lines[0]
    run_dir = tmp_path / "lr1e6"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "training diverged" in status["error"]
    assert not (run_dir / "report.json").exists()
    assert not list((run_dir / "checkpoints").glob("finetune_*"))  # nothing to resume into the same NaN


def test_interrupted_run_is_reported_and_cleaned(capsys, caplog, tmp_path, fake_data):
    """What ``kill -9`` leaves (status 'running', half-written temp files) and what the next start does;
    also: a model that was never trained is said so in the log and the report."""
    sets = small_run(fake_data, "killed", "run.stages=[sensitivity,search]", "model.checkpoint=null",
                     "model.pretrain_epochs=0")
    assert run_cli(capsys, tmp_path, *sets)[0] == 0
    run_dir = tmp_path / "killed"
    traces = (run_dir / "traces.json").read_bytes()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["fp32_weights"] == "untrained" and "never trained" in (run_dir / "report.md").read_text()
    (run_dir / "status.json").write_text('{"status": "running"}\n')
    orphans = [run_dir / ".traces.json.x1.tmp", run_dir / "checkpoints" / ".finetune_last.safetensors.x2.tmp",
               run_dir / "fp32.tmp"]
    orphans[1].parent.mkdir()
    for p in orphans:
        p.write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="hawq"):
        assert run_cli(capsys, tmp_path, *sets, "run.stages=[sensitivity,search,quantize,finetune]")[0] == 0
    assert any("previous run was interrupted" in r.getMessage() for r in caplog.records)
    assert any("FP32 model has random weights" in r.getMessage() for r in caplog.records)
    assert not any(p.exists() for p in orphans)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"
    assert (run_dir / "traces.json").read_bytes() == traces  # the finished stage was reused as it was


def test_corrupted_traces_say_how_to_start_over(capsys, tmp_path, fake_data):
    sets = small_run(fake_data, "corrupt", "run.stages=[sensitivity,search]")
    assert run_cli(capsys, tmp_path, *sets)[0] == 0
    path = tmp_path / "corrupt" / "traces.json"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    rc, lines = run_cli(capsys, tmp_path, *sets)
    assert_one_line(rc, lines, f"delete {path} (or run with --no-resume) to start the sensitivity stage over")
    path.unlink()  # as told: the stage starts over and computes the same traces (timings aside)
    assert run_cli(capsys, tmp_path, *sets)[0] == 0
    again, first = json.loads(path.read_text()), json.loads(good)
    assert again["layers"] == first["layers"] and again["meta"]["key"] == first["meta"]["key"]


# --------------------------------------------------------------------------------------------- training loop

class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x[:, :4].argmax(1))


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, lr=0.05, batch_size=8, checkpoint_every_steps=2, distill=DistillConfig(enabled=False))
    return TrainConfig(**{**base, **kw})


class PoisonAfter(nn.Module):
    """Net whose buffer turns NaN at forward call ``n`` while the loss stays finite."""

    def __init__(self, n: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net, self.n, self.calls = Net(), n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n:
            self.net.seen.fill_(float("nan"))
        return self.net(x)


def test_no_checkpoint_holds_non_finite_tensors(tmp_path):
    model = PoisonAfter(5)  # steps 2 and 4 are checkpointed; the NaN appears at step 5
    with pytest.raises(HawqError, match=r"training diverged: 'net.seen' \(1 tensors\) is not finite at step 6") as e:
        train(model, ClassificationTask(), tiny_data(), tiny_cfg(), run_dir=tmp_path, progress=False)
    paths = checkpoint_paths(tmp_path / "checkpoints", "finetune")
    assert f"last good checkpoint: {paths['json']}" in str(e.value)
    saved = load_file(str(paths["tensors"]))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert json.loads(paths["json"].read_text())["step"] == 4


@pytest.mark.parametrize("text", ["", '{"format": 1, "st', "\x00\xff garbage", '{"format": 1, "step": 2}'],
                         ids=["empty", "truncated", "binary", "fields-missing"])
def test_corrupted_checkpoint_says_how_to_start_over(tmp_path, text):
    torch.manual_seed(0)
    train(Net(), ClassificationTask(), tiny_data(), tiny_cfg(epochs=1), run_dir=tmp_path, progress=False)
    json_path = checkpoint_paths(tmp_path / "checkpoints", "finetune")["json"]
    json_path.write_text(text, encoding="latin-1")
    with pytest.raises(HawqError, match=f"delete {tmp_path / 'checkpoints'} to start finetune over"):
        train(Net(), ClassificationTask(), tiny_data(), tiny_cfg(epochs=1), run_dir=tmp_path, progress=False)


def test_resume_removes_orphan_temp_files(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(epochs=1)
    straight = Net()
    train(straight, ClassificationTask(), tiny_data(), cfg, run_dir=tmp_path / "a", progress=False)
    ckpt = tmp_path / "b" / "checkpoints"
    torch.manual_seed(0)
    train(Net(), ClassificationTask(), tiny_data(), cfg, run_dir=tmp_path / "b", progress=False)
    orphans = [ckpt / ".finetune_last.safetensors.k9.tmp", ckpt / ".finetune_last.json.k9.tmp"]
    for p in orphans:
        p.write_bytes(b"half")
    torch.manual_seed(0)
    resumed = Net()
    train(resumed, ClassificationTask(), tiny_data(), cfg, run_dir=tmp_path / "b", progress=False)
    assert not any(p.exists() for p in orphans)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_accuracy_at_chance_after_finetune_is_divergence():
    from hawq.train.stage import check_not_at_chance

    run = SimpleNamespace(data=SimpleNamespace(num_classes=10), task=ClassificationTask(),
                          cfg=SimpleNamespace(train=SimpleNamespace(lr=0.5)), primary=lambda m: m["top1"])
    check_not_at_chance(run, {"top1": 80.0}, {"top1": 70.0})
    check_not_at_chance(run, {"top1": 12.0}, {"top1": 9.8})  # never above chance: not a divergence
    with pytest.raises(HawqError, match=r"finetuning diverged: top-1 fell from 80.0% to 9.8% \(chance is 10.0%\)"):
        check_not_at_chance(run, {"top1": 80.0}, {"top1": 9.8})


def test_uninformative_sensitivity():
    from hawq.sensitivity import TraceEstimate
    from hawq.sensitivity.stage import check_informative

    zero = {n: TraceEstimate(0.0, 0.0, 4, 10) for n in ("a", "b")}
    check_informative(zero)  # warns (logged), the run goes on
    with pytest.raises(HawqError, match=r"Hessian trace of 'b' \(1 of 2 layers\) is not finite"):
        check_informative({"a": TraceEstimate(1.0, 0.0, 4, 10), "b": TraceEstimate(float("nan"), 0.0, 4, 10)})


# --------------------------------------------------------------------------------------------- library API

class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _batch(label: int = 3):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([0, 1, 2, label])


def _hessian(**kw):
    from hawq.sensitivity import hessian_traces, task_loss

    args = {"batches": [_batch()], "max_probes": 2, "min_probes": 2, "progress": False, **kw}
    return hessian_traces(Small(), task_loss(ClassificationTask()), **args)


def _search(fn: str):
    import hawq.search as search

    return getattr(search, fn)


def _quantize(bits):
    from hawq.quant import quantize_model

    return quantize_model(Small(), bits)


API_MISUSES = [
    ("bops_g batch dim", lambda: _search("bops_g")(Small(), 4, input_shape=(1, 1, 8, 8)),
     "did you mean input_shape=(1, 8, 8)?"),
    ("bops_g string bits", lambda: _search("bops_g")(Small(), "4", input_shape=(1, 8, 8)), "bops_g: bits must be"),
    ("model_size_mb negative", lambda: _search("model_size_mb")(Small(), -3), "model_size_mb: bits must be in 2..16"),
    ("model_size_mb 40", lambda: _search("model_size_mb")(Small(), 40), "model_size_mb: bits must be in 2..16"),
    ("model_size_mb unknown layer", lambda: _search("model_size_mb")(Small(), 4, layers=["nosuch"]),
     "model_size_mb: unknown layer 'nosuch'"),
    ("model_size_mb bad dict", lambda: _search("model_size_mb")(Small(), {"fc": {"weight": 1}}),
     "model_size_mb: bit map 'fc'.weight: bits must be in 2..16"),
    ("quantize_model string", lambda: _quantize("4"), "quantize_model: bits must be a bit map"),
    ("quantize_model -4", lambda: _quantize({"fc": {"weight": -4, "activation": 8}}), "bits must be in 2..16"),
    ("quantize_model 40", lambda: _quantize({"fc": {"weight": 40, "activation": 8}}), "bits must be in 2..16"),
    ("quantize_model unknown", lambda: _quantize({"nosuch": {"weight": 4}}), "the model has no layer 'nosuch'"),
    ("LayerBits string", lambda: LayerBits("4", 8), "LayerBits.weight: bits must be an integer, got '4'"),
    ("LayerBits 0", lambda: LayerBits(4, 0), "LayerBits.activation: bits must be in 2..16"),
    ("hessian method", lambda: _hessian(method="foo"), "method must be 'auto', 'autograd' or 'finite_difference'"),
    ("hessian bare tensor batches", lambda: _hessian(batches=_batch()[0]), "got a bare tensor"),
    ("hessian bare tensor batch", lambda: _hessian(batches=[_batch()[0]]),
     "a classification batch is an (inputs, labels) pair, got Tensor of shape (4, 1, 8, 8)"),
    ("hessian label 10", lambda: _hessian(batches=[_batch(10)]), "label 10 is outside the model's 10 classes"),
    ("hessian label -2", lambda: _hessian(batches=[_batch(-2)], estimator="hutchinson"),
     "label -2 is outside the model's 10 classes"),
]


@pytest.mark.parametrize("call, message", [(c, m) for _, c, m in API_MISUSES], ids=[i for i, _, _ in API_MISUSES])
def test_api_misuse_raises_hawq_error(call, message):
    with pytest.raises(HawqError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_plain_dict_bit_maps_work():
    from hawq.search import bops_g, model_size_mb

    plain = {"fc": {"weight": 4, "activation": 8}, "conv": {"weight": 8, "activation": 8}}
    typed = {"fc": LayerBits(4, 8), "conv": LayerBits(8, 8)}
    assert model_size_mb(Small(), plain) == model_size_mb(Small(), typed)
    assert bops_g(Small(), plain, input_shape=(1, 8, 8)) == bops_g(Small(), typed, input_shape=(1, 8, 8))
    q = _quantize(plain)
    assert type(q.fc).__name__ == "QuantLinear" and q.fc.weight_bits == 4


def _saved_model(tmp_path: Path, name: str) -> bytes:
    from hawq.export import save_quantized
    from hawq.quant import calibrate

    bits = {"conv": LayerBits(4, 8), "fc": LayerBits(8, 8)}
    model = _quantize(bits).eval()
    calibrate(model, [_batch()], ClassificationTask().forward, progress=False)
    save_quantized(model, bits, tmp_path / name, {"name": "small", "kwargs": {}})
    return (tmp_path / name).read_bytes()


def test_save_quantized_is_byte_reproducible_and_refuses_a_folder(tmp_path):
    a, b = _saved_model(tmp_path, "a.safetensors"), _saved_model(tmp_path, "b.safetensors")
    assert a == b
    n = int.from_bytes(a[:8], "little")
    keys = list(json.loads(a[8:8 + n])["__metadata__"])
    assert keys == sorted(keys) and len(keys) >= 8 and n % 8 == 0
    from hawq.export import load_quantized

    assert load_quantized(tmp_path / "a.safetensors", build=lambda info: Small()).fc.weight_bits == 8  # valid
    with pytest.raises(HawqError, match="save_quantized: .* is a folder; give a file path"):
        _saved_model(tmp_path, ".")



def test_quiet_silences_the_transformers_load_report(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    loaded = sys.modules.get("transformers")
    before = loaded.utils.logging.get_verbosity() if loaded else None
    try:
        rc = main(["--config", CONFIG, "--quiet", "--set", f"run.out_dir={tmp_path}", "--set", "run.threads=0"])
        assert rc == 2 and "run.threads must be" in capsys.readouterr().err
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"  # read when transformers is imported
        if loaded:
            assert loaded.utils.logging.get_verbosity() == logging.ERROR
    finally:
        if loaded:
            loaded.utils.logging.set_verbosity(before)


def test_report_mentions_batchnorm_only_for_models_with_batchnorm():
    from hawq.report import markdown_report

    sens = {"batches": 1, "batch_size": 8, "seconds": 0.1, "device": "cpu"}
    assert "BN in eval mode, 0.1 s" in markdown_report({"layers": [], "sensitivity": {**sens, "bn_mode": "eval"}})
    assert "BN in" not in markdown_report({"layers": [], "sensitivity": {**sens, "bn_mode": None}})


def test_run_pipeline_checks_a_config_built_in_code(tmp_path):
    from hawq.config import Config
    from hawq.pipeline import run_pipeline

    cfg = Config()
    cfg.run.out_dir, cfg.run.name = str(tmp_path / "runs"), "../outside"
    with pytest.raises(HawqError, match="run.name must be one folder name inside run.out_dir"):
        run_pipeline(cfg)
    assert list(tmp_path.iterdir()) == []
