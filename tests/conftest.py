import os

import torch

# Triton runs on CPU only through its interpreter, and reads TRITON_INTERPRET when it is
# first imported (torch._dynamo imports it), so set it before any test module loads.
# Inductor's CPU code generation (C++) does not use Triton and is unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Compiles dominate test time; hypothesis deadlines would only measure them.
settings.register_profile(
    "fairy2i",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("fairy2i")
torch.manual_seed(0)

# `make test` runs the suite in 2 pytest-xdist workers (one per core of the CI machine): each
# worker computes on one thread, as two workers with two OpenMP threads each would spin-wait
# against each other (measured on this machine: 10-40x slower steps whenever another process was
# busy). Tests that need several threads set them themselves (test_packed's row-split test).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b|| (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom else (a - b).norm().item()
