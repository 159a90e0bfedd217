"""Without a CUDA GPU, Triton kernels run in Triton's interpreter on CPU tensors.
TRITON_INTERPRET must be set before triton is first imported, so this runs before anything else."""
import glob
import os

if "TRITON_INTERPRET" not in os.environ and not glob.glob("/dev/nvidia[0-9]*"):
    os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402

# `python -m pytest` puts the working directory first on sys.path. From the repo root that makes our source
# folder `kernels/` (installed as flashfuse.kernels) shadow the `kernels` package that transformers >= 5.25
# imports (HF hub kernels). flashfuse itself is imported through its installed finder, never from the root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
