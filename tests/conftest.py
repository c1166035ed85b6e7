"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny inputs: one thread does them fastest, and waits on no other process for a second core
    (on a loaded machine two spin-waiting OpenMP threads made small-model tests up to 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
