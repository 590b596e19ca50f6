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
def assert_compiled():
    """assert_compiled(op, device="cpu"): fails, rather than silently testing the fallback,
    when op has no compiled kernel for device."""

    def check(op: str, device: str = "cpu") -> None:
        info = codetr.ops.extension_info()
        assert info["ops"][op][device] == "compiled", info

    return check
