import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (small models: threads only add contention), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
