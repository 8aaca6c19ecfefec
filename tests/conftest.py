"""Suite-wide settings: one intra-op thread (the tiny test models run faster, and timings do not
depend on how busy the machine is)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
