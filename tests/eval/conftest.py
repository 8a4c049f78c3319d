import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tests use tiny tensors, where a second intra-op thread only adds waiting: on a shared 2-core
    machine, OpenMP threads that wait for a busy core made them 10-100x slower (14 s instead of 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
