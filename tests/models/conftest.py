import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Model tests run single-threaded: on our shared 2-core machine, OpenMP threads
    spin-waiting on each other made small forwards 10-30x slower than with one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
