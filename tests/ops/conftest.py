import pytest

import codetr


@pytest.fixture
def reference_mode():
    """Runs a test with every op on its pure-PyTorch reference path."""
    codetr.ops.set_ops_mode("reference")
    try:
        yield
    finally:
        codetr.ops.set_ops_mode("auto")


@pytest.fixture
def at_thread_counts():
    """at_thread_counts(fn, counts=(1, 2, 3)) -> [fn() run with torch.set_num_threads(n)
    for n in counts], restoring the thread count afterwards (determinism tests)."""
    import torch

    def run(fn, counts=(1, 2, 3)):
        threads = torch.get_num_threads()
        try:
            results = []
            for n in counts:
                torch.set_num_threads(n)
                results.append(fn())
            return results
        finally:
            torch.set_num_threads(threads)

    return run
