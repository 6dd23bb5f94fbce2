"""pytest: make the flat top-level modules importable from tests/, and run tests on one thread."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: on a 2-core machine a second OpenMP thread spin-waits for a core
    and costs more than it brings, the more so when the machine is busy (measured: docs/speed.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
