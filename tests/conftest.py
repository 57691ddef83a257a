import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

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
