import os
import sys

import pytest
import torch
import torch.distributed as dist

from lightning_kfac.testing.distributed import launch_env
from lightning_kfac.testing.lightning import quiet_trainer  # noqa: F401  (re-exported for the test modules)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# test modules import the user-facing example modules (digits, fashion_mnist), and examples/ is not a package
EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's in-process runs: on a shared CPU, multi-threaded
    LAPACK (eigh of a rank-deficient factor) can be orders of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64_default():
    """float64 as the default dtype for a test (oracles at 1e-10 and tighter)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def clean_process_group():
    """In-process Lightning runs initialise a (world size 1) process group; forked tests that
    follow must not inherit it."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def script_env(**extra: str) -> dict[str, str]:
    """The environment for a launched script: without the rendezvous variables an in-process
    Lightning run leaves behind (a child that inherits them joins the wrong process group)."""
    # one intra-op thread per rank: N ranks x N threads on N cores makes LAPACK crawl
    return launch_env(**{"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra})
