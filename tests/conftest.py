import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
# Subprocesses (the CLI, torchrun) import the checkout under test, not an installed hawq: a relative
# PYTHONPATH such as "." would point elsewhere once a test changes the working directory.
_inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *_inherited])


def load_script(name: str) -> types.ModuleType:
    """Import ``scripts/<name>.py`` as module ``name`` (scripts/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (small models: threads only add contention), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Branches(nn.Module):
    """Inception-style block: branches at very different scales joined by torch.cat, a 3x3 stride-1
    padded average pool, functional max pool, a non-overlapping AvgPool2d module, global pool, fc."""

    def __init__(self, count_include_pad: bool) -> None:
        super().__init__()
        self.count_include_pad = count_include_pad
        self.a, self.b, self.e = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(1, 4, 1), nn.Conv2d(1, 1, 3, padding=2)
        self.bn = nn.BatchNorm2d(6)
        self.c, self.d = nn.Conv2d(11, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            self.b.weight.mul_(30.0)  # its branch spans a 30x larger range: another accumulator scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.bn(self.a(x))), self.b(x), F.max_pool2d(self.e(x), 3, stride=1)], 1)
        y = F.avg_pool2d(y, kernel_size=3, stride=1, padding=1, count_include_pad=self.count_include_pad)
        y = self.pool(F.relu(self.c(y)))
        y = F.avg_pool2d(self.d(y), 3, 2, 1, count_include_pad=self.count_include_pad)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def branches_model(count_include_pad: bool) -> tuple[nn.Module, torch.Tensor]:
    """A calibrated 8-bit :class:`_Branches` (non-trivial BN statistics) and its calibration batch."""
    torch.manual_seed(5)
    net = _Branches(count_include_pad).eval()
    net.bn.running_mean.normal_(0, 0.1)
    net.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(32, 1, 13, 11)
    from hawq.bitmap import uniform_bitmap
    from hawq.layers import quantizable_layers
    from hawq.quant import calibrate, quantize_model

    q = quantize_model(net, uniform_bitmap(quantizable_layers(net), 8, 8))
    calibrate(q, [x], lambda m, b: m(b), progress=False)
    return q.eval(), x
