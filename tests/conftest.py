import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def small_population():
    import agenttensor as at

    return at.synthetic(20_000, seed=3)


@pytest.fixture(scope="module")
def one_thread():
    """Small runs: one torch thread avoids oversubscription on a shared 2-core machine (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
