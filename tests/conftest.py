"""Shared test settings. Test-specific fixtures live in their test files."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
