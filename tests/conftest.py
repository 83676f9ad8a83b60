"""Fixtures shared by the test files."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests.

    The test machine has 2 cores shared with other jobs; torch's intra-op threads then
    oversubscribe them (a 20 ms step takes seconds). One thread is also bit-reproducible.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
