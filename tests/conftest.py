"""Shared test settings. Test-specific fixtures live in their test files."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: the test models are tiny, so this is fastest, and far faster on a
    shared machine (OpenMP threads spin-wait under contention); in-process training runs also
    match the subprocess ones (which use one thread) bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
