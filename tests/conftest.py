import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def small_population():
    import agenttensor as at

    return at.synthetic(20_000, seed=3)
