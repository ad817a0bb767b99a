"""Shared test setup.

* Without a GPU, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set
  before any ``@triton.jit`` function is defined, so it is set here, first.
* Tests marked ``cuda`` are skipped cleanly when no CUDA device is visible.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def monet2photo_mini():
    """The real mini Monet<->photo set in ../shared/data (never copied into the repository)."""
    root = os.path.join(SHARED_DATA, "monet2photo_mini")
    if not os.path.isdir(root):
        pytest.skip(f"shared data not found at {root}")
    return root


@pytest.fixture
def one_thread():
    """Tiny training runs gain nothing from threads, and on a shared 2-core machine a second
    OpenMP thread competing with other processes makes each step ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
