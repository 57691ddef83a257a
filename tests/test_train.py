"""hawq.train: loss, schedule, freezes, exact resume, crash safety of checkpoints, metrics."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import hawq.quant
from hawq import HawqError
from hawq.models.tasks import ClassificationTask
from hawq.train import (
    DistillConfig,
    TrainConfig,
    checkpoint_paths,
    load_checkpoint,
    lr_at,
    make_train_loader,
    plot_history,
    read_metrics,
    train,
)
from hawq.train import checkpoint as ckpt_mod
from hawq.train.checkpoint import flatten_optimizer_state, unflatten_optimizer_state

N, FEATURES, CLASSES, BATCH = 48, 8, 4, 8  # 6 steps per epoch


class TinyNet(nn.Module):
    def __init__(self, bn: bool = True, dropout: float = 0.2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 16)
        self.bn = nn.BatchNorm1d(16) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)  # exercises the RNG state saved in checkpoints
        self.fc2 = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def make_model(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw)


def make_data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, FEATURES, generator=g)
    return TensorDataset(x, x[:, :CLASSES].argmax(1))


class CrashAfter(Dataset):
    """Raises when batch number ``crash_batch`` (0-based, counted over the whole run) is fetched."""

    def __init__(self, base: Dataset, crash_batch: int, batch: int = BATCH) -> None:
        self.base, self.limit, self.calls = base, crash_batch * batch, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if self.calls >= self.limit:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.base[i]


def cfg_for(**kw) -> TrainConfig:
    base = dict(epochs=2, lr=0.05, batch_size=BATCH, checkpoint_every_steps=2, grad_clip=1.0,
                distill=DistillConfig(enabled=False))
    base.update(kw)
    return TrainConfig(**base)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def strip_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


@pytest.mark.parametrize("crash_batch", [7, 9], ids=["resume-at-epoch-end", "resume-mid-epoch"])
@pytest.mark.parametrize("optimizer,distill", [("sgd", False), ("adamw", True)])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, crash_batch, optimizer, distill):
    cfg = cfg_for(optimizer=optimizer, nesterov=True, warmup_steps=2,
                  distill=DistillConfig(enabled=distill, alpha=0.5, temperature=2.0))
    task = ClassificationTask()
    teacher = make_model(seed=7, dropout=0.0) if distill else None
    data = make_data()

    straight = make_model()
    h_straight = train(straight, task, data, cfg, teacher=teacher, run_dir=tmp_path / "a", progress=False)

    crashed = make_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, task, CrashAfter(data, crash_batch), cfg, teacher=teacher, run_dir=tmp_path / "b",
              progress=False)
    saved = load_checkpoint(tmp_path / "b" / "checkpoints", "finetune")[1]
    assert saved["step"] == (6 if crash_batch == 7 else 8)
    resumed = make_model()
    h_resumed = train(resumed, task, data, cfg, teacher=teacher, run_dir=tmp_path / "b", progress=False)

    assert_same_state(straight, resumed)
    assert strip_time(h_straight) == strip_time(h_resumed)
    assert len(h_resumed) == 2 and h_resumed[-1]["step"] == 12
    rows = read_metrics(tmp_path / "b" / "metrics.json")["rows"]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["tag"] == "finetune" for r in rows)


def test_finished_run_is_not_trained_again(tmp_path):
    data, task, cfg = make_data(), ClassificationTask(), cfg_for(epochs=1)
    first = make_model()
    h1 = train(first, task, data, cfg, run_dir=tmp_path, progress=False)
    again = make_model()
    h2 = train(again, task, data, cfg, run_dir=tmp_path, progress=False)
    assert_same_state(first, again)
    assert h1 == h2


def test_changed_config_refuses_to_resume(tmp_path):
    data, task = make_data(), ClassificationTask()
    train(make_model(), task, data, cfg_for(epochs=1), run_dir=tmp_path, progress=False)
    with pytest.raises(HawqError, match="delete .*checkpoints or change run.name"):
        train(make_model(), task, data, cfg_for(epochs=1, lr=0.1), run_dir=tmp_path, progress=False)
    # another tag in the same run folder is independent
    train(make_model(), task, data, cfg_for(epochs=1, lr=0.1), run_dir=tmp_path, progress=False, tag="other")


def test_fractional_epochs_take_that_share_of_the_steps():
    seen = []

    class CountingTask(ClassificationTask):
        def loss_from_outputs(self, outputs, batch):
            seen.append(len(batch[1]))
            return super().loss_from_outputs(outputs, batch)

    history = train(make_model(), CountingTask(), make_data(), cfg_for(epochs=0.5), progress=False)
    assert len(seen) == 3 and history[-1]["step"] == 3 and history[-1]["epoch_float"] == 0.5
    seen.clear()
    history = train(make_model(), CountingTask(), make_data(), cfg_for(epochs=1.5), progress=False)
    assert len(seen) == 9 and [r["step"] for r in history] == [6, 9]


def test_loss_combines_task_and_distillation_terms():
    data, task = make_data(), ClassificationTask()
    student, teacher = make_model(dropout=0.0, bn=False), make_model(seed=3, dropout=0.0, bn=False)
    x, y = next(iter(make_train_loader(data, BATCH, seed=0, epoch=0)))
    with torch.no_grad():
        s, t = student(x), teacher(x)
        expected = 0.7 * nn.functional.cross_entropy(s, y) + 0.3 * task.distill_loss(s, t, 3.0)
    cfg = cfg_for(epochs=1 / 6, distill=DistillConfig(enabled=True, alpha=0.3, temperature=3.0))
    history = train(student, task, data, cfg, teacher=teacher, progress=False)
    assert history[0]["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert not teacher.training


def test_pure_distillation_from_an_identical_teacher_leaves_weights_unchanged():
    # KL(p || p) = 0 and has zero gradient: a wrong teacher wiring would move the weights
    student = make_model(dropout=0.0, bn=False)
    teacher = make_model(dropout=0.0, bn=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = cfg_for(epochs=1, distill=DistillConfig(enabled=True, alpha=1.0, temperature=2.0))
    train(student, ClassificationTask(), make_data(), cfg, teacher=teacher, progress=False)
    for k, v in student.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-7), k


def test_lr_schedule_warmup_cosine_and_constant():
    cfg = TrainConfig(lr=0.1, warmup_steps=4, schedule="cosine", min_lr=0.01)
    assert lr_at(0, 20, cfg) == pytest.approx(0.025)
    assert lr_at(3, 20, cfg) == pytest.approx(0.1)
    assert lr_at(4, 20, cfg) == pytest.approx(0.1)
    assert lr_at(12, 20, cfg) == pytest.approx(0.01 + 0.09 * 0.5)
    assert lr_at(20, 20, cfg) == pytest.approx(0.01)
    assert lr_at(10, 20, dataclasses.replace(cfg, schedule="constant")) == 0.1


def test_lr_reaches_the_history_and_optimizer_follows_schedule():
    cfg = cfg_for(epochs=1, schedule="cosine", lr=0.2, min_lr=0.0)
    history = train(make_model(), ClassificationTask(), make_data(), cfg, progress=False)
    assert history[0]["lr"] == pytest.approx(lr_at(5, 6, cfg))


def test_bn_freeze_stops_running_statistics():
    snapshots = []

    def snap(model):
        snapshots.append(model.bn.running_mean.clone())
        return {}

    train(make_model(), ClassificationTask(), make_data(), cfg_for(epochs=3, freeze_bn_after_epochs=1),
          eval_fn=snap, progress=False)
    assert not torch.equal(snapshots[0], torch.zeros(16))
    assert torch.equal(snapshots[0], snapshots[1]) and torch.equal(snapshots[1], snapshots[2])


def test_activation_freeze_calls_quant_hook_at_the_configured_step(monkeypatch):
    calls = []

    class CountingTask(ClassificationTask):
        steps = 0

        def loss_from_outputs(self, outputs, batch):
            CountingTask.steps += 1
            return super().loss_from_outputs(outputs, batch)

    monkeypatch.setattr(hawq.quant, "set_act_calibration",
                        lambda model, enabled: calls.append((CountingTask.steps, enabled)), raising=False)
    train(make_model(), CountingTask(), make_data(), cfg_for(epochs=2, freeze_act_after_epochs=0.5),
          progress=False)
    # frozen before the 4th step of epoch 1, and again at the start of epoch 2 (model.train() was called)
    assert calls == [(3, False), (6, False)]


def test_eval_metrics_land_in_history_metrics_json_and_plot(tmp_path):
    task, data = ClassificationTask(), make_data()
    history = train(make_model(), task, data, cfg_for(epochs=2), run_dir=tmp_path, progress=False,
                    eval_fn=lambda m: task.evaluate(m, [data.tensors], progress=False))
    assert all("top1" in row and 0 <= row["top1"] <= 100 for row in history)
    rows = read_metrics(tmp_path / "metrics.json")["rows"]
    assert [r["top1"] for r in rows] == [r["top1"] for r in history]
    png = plot_history(history, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_nan_loss_names_step_and_keeps_last_good_checkpoint(tmp_path):
    class NanAtStep5(ClassificationTask):
        steps = 0

        def loss_from_outputs(self, outputs, batch):
            NanAtStep5.steps += 1
            loss = super().loss_from_outputs(outputs, batch)
            return loss * math.nan if NanAtStep5.steps == 5 else loss

    cfg = cfg_for(epochs=2)
    message = r"loss is NaN at step 5 \(epoch 1\); last good checkpoint: .*finetune"
    with pytest.raises(HawqError, match=message):
        train(make_model(), NanAtStep5(), make_data(), cfg, run_dir=tmp_path, progress=False)
    tensors, meta = load_checkpoint(tmp_path / "checkpoints", "finetune")
    assert meta["step"] == 4
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_disk_full_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real_write, calls = ckpt_mod._write_tensor_file, []

    def write_then_fail(tensors, path, metadata):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"\x00" * 100)  # half a file, as a full disk leaves it
            raise OSError(28, "No space left on device")
        real_write(tensors, path, metadata)

    monkeypatch.setattr(ckpt_mod, "_write_tensor_file", write_then_fail)
    with pytest.raises(HawqError, match="could not write checkpoint .*No space left.*previous checkpoint"):
        train(make_model(), ClassificationTask(), make_data(), cfg_for(), run_dir=tmp_path, progress=False)
    tensors, meta = load_checkpoint(tmp_path / "checkpoints", "finetune")
    assert meta["step"] == 2
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert sorted(leftovers) == ["finetune_last.json", "finetune_last.safetensors"]


def test_crash_between_file_replacements_falls_back_to_matching_tensors(tmp_path, monkeypatch):
    ckpt_mod.save_checkpoint(tmp_path, "t", {"w": torch.ones(2)}, {"step": 1})
    real_replace = ckpt_mod.os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("power cut")  # tensors of step 2 are in place, the JSON still says step 1
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(OSError):
        ckpt_mod.save_checkpoint(tmp_path, "t", {"w": torch.full((2,), 2.0)}, {"step": 2})
    monkeypatch.undo()
    tensors, meta = load_checkpoint(tmp_path, "t")
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(2))


def test_checkpoint_is_pickle_free_and_optimizer_roundtrips(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, FEATURES)).sum().backward()
    opt.step()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    json.dumps(meta)
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.5)
    opt2.load_state_dict(restored)
    assert opt2.param_groups[0]["lr"] == 0.01 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    for pid, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(opt2.state_dict()["state"][pid][key], value)

    train(make_model(), ClassificationTask(), make_data(), cfg_for(epochs=1), run_dir=tmp_path,
          progress=False)
    paths = checkpoint_paths(tmp_path / "checkpoints", "finetune")
    on_disk = load_file(str(paths["tensors"]))
    assert any(k.startswith("optim/state/") for k in on_disk) and "model/fc1.weight" in on_disk
    record = json.loads(paths["json"].read_text())
    assert record["step"] == 6 and len(record["rng"]) == 1 and record["position"]["epoch"] == 1


def test_train_loader_order_is_seeded_resumable_and_shardable():
    data = make_data()
    order = lambda **kw: [b[1].tolist() for b in make_train_loader(data, BATCH, **kw)]  # noqa: E731
    assert order(seed=0, epoch=0) == order(seed=0, epoch=0)
    assert order(seed=0, epoch=0) != order(seed=0, epoch=1) != order(seed=1, epoch=1)
    assert order(seed=0, epoch=1, start_batch=2) == order(seed=0, epoch=1)[2:]
    full = list(make_train_loader(data, BATCH, seed=0, epoch=0))
    r0 = list(make_train_loader(data, BATCH, seed=0, epoch=0, rank=0, world=2))
    r1 = list(make_train_loader(data, BATCH, seed=0, epoch=0, rank=1, world=2))
    for f, a, b in zip(full, r0, r1, strict=True):
        assert torch.equal(f[0], torch.cat([a[0], b[0]]))


def test_a_dataloader_and_a_list_of_batches_are_accepted():
    data, task, cfg = make_data(), ClassificationTask(), cfg_for(epochs=1)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True)
    a, b = make_model(), make_model()
    train(a, task, loader, cfg, progress=False)
    train(b, task, data, cfg, progress=False)
    assert_same_state(a, b)  # the DataLoader is re-seeded, not iterated with its own order
    batches = [data[i:i + BATCH] for i in range(0, N, BATCH)]
    history = train(make_model(), task, batches, cfg, progress=False)
    assert history[-1]["step"] == 6


@pytest.mark.parametrize("field,value,message", [
    ("optimizer", "rmsprop", "train.optimizer"),
    ("schedule", "step", "train.schedule"),
    ("epochs", 0, "train.epochs"),
    ("batch_size", 100, "fewer than one batch"),
])
def test_bad_config_is_a_one_line_hawq_error(field, value, message):
    with pytest.raises(HawqError, match=message):
        train(make_model(), ClassificationTask(), make_data(), cfg_for(**{field: value}), progress=False)


def test_activation_freeze_without_quant_hook_warns(monkeypatch):
    monkeypatch.delattr(hawq.quant, "set_act_calibration", raising=False)
    with pytest.warns(UserWarning, match="set_act_calibration"):
        train(make_model(), ClassificationTask(), make_data(), cfg_for(epochs=1, freeze_act_after_epochs=0.5),
              progress=False)


def test_amp_is_ignored_on_cpu():
    a, b = make_model(), make_model()
    train(a, ClassificationTask(), make_data(), cfg_for(epochs=1, amp=True), progress=False)
    train(b, ClassificationTask(), make_data(), cfg_for(epochs=1, amp=False), progress=False)
    assert_same_state(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_on_cuda_trains_checkpoints_the_scaler_and_resumes(tmp_path):
    cfg = cfg_for(epochs=2, amp=True, amp_dtype="float16")
    data, task = make_data(), ClassificationTask()
    straight = make_model()
    train(straight, task, data, cfg, device="cuda", run_dir=tmp_path / "a", progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_model(), task, CrashAfter(data, 9), cfg, device="cuda", run_dir=tmp_path / "b",
              progress=False)
    meta = load_checkpoint(tmp_path / "b" / "checkpoints", "finetune")[1]
    assert meta["scaler"]["scale"] > 0 and "cuda" in meta["rng"][0]
    resumed = make_model()
    train(resumed, task, data, cfg, device="cuda", run_dir=tmp_path / "b", progress=False)
    for k, v in straight.state_dict().items():
        assert torch.allclose(resumed.state_dict()[k], v, atol=1e-5), k


def test_tag_must_be_a_safe_file_name(tmp_path):
    with pytest.raises(HawqError, match="tag must be"):
        train(make_model(), ClassificationTask(), make_data(), cfg_for(epochs=1), run_dir=tmp_path,
              tag="../escape", progress=False)
