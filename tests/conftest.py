from pathlib import Path

import pytest
import torch

import codetr


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the read-only real datasets in ../shared/data (next to the repository)."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"shared test data not found at {root}")
    return root


@pytest.fixture
def one_thread():
    """Run single-threaded: on our shared 2-core machine, OpenMP threads spin-waiting on each
    other made small forwards 10-30x slower than with one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def assert_compiled():
    """assert_compiled(op, device="cpu"): fails, rather than silently testing the fallback,
    when op has no compiled kernel for device."""

    def check(op: str, device: str = "cpu") -> None:
        info = codetr.ops.extension_info()
        assert info["ops"][op][device] == "compiled", info

    return check
