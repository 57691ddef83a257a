"""hawq.train across processes: DDP on 2 CPU processes (gloo) and a SIGKILLed run that resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from hawq.models.tasks import ClassificationTask
from hawq.train import DistillConfig, TrainConfig, load_checkpoint, train
from hawq.train import distributed as D

REPO = Path(__file__).resolve().parents[1]
N, FEATURES, CLASSES = 64, 8, 4


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # no BatchNorm: its batch statistics are per process under DDP, which would break the comparison
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, FEATURES, generator=g)
    return TensorDataset(x, x[:, :CLASSES].argmax(1))


DDP_CFG = TrainConfig(epochs=2, lr=0.1, batch_size=16, checkpoint_every_steps=3, grad_clip=1.0,
                      nesterov=True, distill=DistillConfig(enabled=False))


def _ddp_worker(rank: int, world: int, init_file: str, run_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert D.init_distributed() == (rank, world) and D.is_main() == (rank == 0)
        model = make_model()
        history = train(model, ClassificationTask(), make_data(), DDP_CFG, run_dir=run_dir, progress=False)
        mean = D.all_reduce_mean(torch.tensor([float(rank)]))
        save_file({**{k: v.contiguous() for k, v in model.state_dict().items()}, "rank_mean": mean,
                   "loss": torch.tensor([row["loss"] for row in history])}, f"{out}.rank{rank}")
        D.shutdown_distributed()  # barrier, then teardown, as a torchrun program ends on success
    finally:
        if dist.is_initialized():  # after a failure: no barrier, the peer may never reach it
            dist.destroy_process_group()


def test_ddp_on_two_processes_matches_one_process_with_the_global_batch(tmp_path):
    single = make_model()
    h_single = train(single, ClassificationTask(), make_data(), DDP_CFG, progress=False)

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "run"), str(tmp_path / "w")),
             nprocs=2, join=True)
    per_rank = [load_file(str(tmp_path / f"w.rank{r}")) for r in range(2)]
    for name, value in single.state_dict().items():
        assert torch.allclose(per_rank[0][name], value, atol=1e-6), name
        assert torch.equal(per_rank[0][name], per_rank[1][name]), name  # DDP keeps replicas identical
    assert torch.allclose(per_rank[0]["loss"], torch.tensor([r["loss"] for r in h_single]), atol=1e-6)
    assert per_rank[0]["rank_mean"].item() == 0.5
    # only rank 0 wrote the run folder, and its checkpoint holds both processes' RNG states
    _, meta = load_checkpoint(tmp_path / "run" / "checkpoints", "finetune")
    assert meta["step"] == 8 and meta["world_size"] == 2 and len(meta["rng"]) == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "metrics.json"]


class KillAt(Dataset):
    """SIGKILLs this process when batch ``kill_batch`` (0-based, whole run) is fetched: no cleanup runs."""

    def __init__(self, base: Dataset, kill_batch: int, batch: int) -> None:
        self.base, self.limit, self.calls = base, kill_batch * batch, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if 0 <= self.limit <= self.calls:
            os.kill(os.getpid(), signal.SIGKILL)
        self.calls += 1
        return self.base[i]


class DropoutBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn = nn.Linear(FEATURES, 16), nn.BatchNorm1d(16)
        self.drop, self.fc2 = nn.Dropout(0.3), nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


KILL_CFG = TrainConfig(epochs=2, optimizer="adamw", lr=0.01, batch_size=8, checkpoint_every_steps=3,
                       warmup_steps=3, distill=DistillConfig(enabled=False))


def run_kill_job(run_dir: str, kill_batch: int) -> nn.Module:
    torch.manual_seed(0)
    model = DropoutBNNet()
    train(model, ClassificationTask(), KillAt(make_data(), kill_batch, 8), KILL_CFG, run_dir=run_dir,
          progress=False, seed=3)
    return model


def test_sigkilled_subprocess_resumes_to_the_same_weights(tmp_path):
    code = (f"import sys, torch; torch.set_num_threads(1); sys.path.insert(0, {str(REPO / 'tests')!r}); "
            f"from test_train_distributed import run_kill_job; run_kill_job({str(tmp_path / 'b')!r}, 11)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    # 8 steps per epoch, a checkpoint every 3 steps: killed in epoch 2 with step 9 saved
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(tmp_path / "b" / "checkpoints", "finetune")[1]["step"] == 9
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise equality needs the same reduction order as the subprocess
    try:
        resumed = run_kill_job(str(tmp_path / "b"), -1)
        straight = run_kill_job(str(tmp_path / "a"), -1)
    finally:
        torch.set_num_threads(threads)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


@pytest.mark.parametrize("env", [{}, {"WORLD_SIZE": "1", "RANK": "0"}])
def test_helpers_are_no_ops_in_one_process(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert D.init_distributed() == (0, 1) and D.is_main() and not D.is_distributed()
    t = torch.tensor([3.0])
    assert D.all_reduce_mean(t) is t and t.item() == 3.0
    D.barrier()
    assert D.broadcast_object({"a": 1}) == {"a": 1} and D.all_gather_object(2) == [2]
