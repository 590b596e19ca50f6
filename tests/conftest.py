from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the read-only real datasets in ../shared/data (next to the repository)."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"shared test data not found at {root}")
    return root
