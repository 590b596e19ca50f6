import pytest


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    yield
