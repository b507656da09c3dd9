"""codegen/dispatch.py: the `kernel` option decided once, and a new kernel added in two places.

The toy kernel below follows the README's "Adding a kernel" steps: (1) a function with the
signature of ops.packed_reference.packed_linear_body that trusts its arguments, (2) one
Kernel entry in dispatch's table (here through register_kernel, which is what adding a
line to IMPLEMENTATIONS does). Nothing else learns its name, yet the option, the op,
PackedLinear and a compiled graph all run it.
"""

from __future__ import annotations

import pytest
import torch

from fairy2i_compile import Fairy2iBackend, Fairy2iConfig
from fairy2i_compile.compiler.codegen import dispatch
from fairy2i_compile.compiler.ops.packed_reference import packed_linear_body
from fairy2i_compile.quantization.packed_model import PackedLinear, pack_model

CALLS = []


def toy_forward(x, codes, scales, bias, m, group_size):
    """Step 1: the kernel (here the reference body, counting its calls): x [..., 2m] -> y [..., 2n]."""
    CALLS.append(tuple(x.shape))
    return packed_linear_body(x, codes, scales, bias, m, group_size)


@pytest.fixture
def toy_kernel():
    table, memo = dict(dispatch.IMPLEMENTATIONS), dict(dispatch._MEMO)
    # step 2: its table entry (CPU only; "auto" does not pick it)
    dispatch.register_kernel(dispatch.Kernel(
        "toy", why_not=lambda device: None if device.type == "cpu" else f"kernel='toy' runs on CPU, got {device}",
        load=lambda: toy_forward))
    CALLS.clear()
    yield
    dispatch.IMPLEMENTATIONS.clear()
    dispatch.IMPLEMENTATIONS.update(table)
    dispatch._MEMO.clear()
    dispatch._MEMO.update(memo)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16))


def test_a_registered_kernel_is_an_option_and_runs_everywhere(toy_kernel):
    assert "toy" in dispatch.kernel_names() and dispatch.kernel_names()[-1] == "torch"
    assert Fairy2iConfig(kernel="toy").kernel == "toy"
    assert dispatch.resolve_kernel("toy", torch.device("cpu")) == "toy"
    assert dispatch.resolve_kernel("auto", torch.device("cpu")) in ("cpu", "torch")  # not picked by "auto"
    with pytest.raises(RuntimeError, match="kernel='toy' runs on CPU, got meta"):
        dispatch.resolve_kernel("toy", torch.device("meta"))

    model, x = _mlp(), torch.randn(3, 16)
    want = model(x)
    pack_model(model, stages=2, kernel="toy")  # PackedLinear runs the op with kernel="toy"
    assert isinstance(model[0], PackedLinear) and model[0].kernel == "toy"
    with torch.no_grad():
        eager = model(x)
    assert CALLS == [(3, 16), (3, 24)]
    torch.testing.assert_close(eager, want, atol=2.0, rtol=0)  # quantized: a loose sanity bound only

    CALLS.clear()  # a compiled PTQ graph decides the kernel per node at lowering and runs the toy
    compiled = torch.compile(_mlp(), backend=Fairy2iBackend({"mode": "ptq", "stages": 2, "kernel": "toy"}))
    with torch.no_grad():
        compiled(x)
    assert len(CALLS) == 2


def test_unknown_kernel_names_every_registered_one(toy_kernel):
    with pytest.raises(ValueError, match=r"kernel must be one of \['auto', 'triton', 'cpu', 'toy', 'inductor', 'torch'\]"):
        dispatch.resolve_kernel("toy2", torch.device("cpu"))
    with pytest.raises(ValueError, match="reserved"):
        dispatch.register_kernel(dispatch.Kernel("auto", lambda device: None, lambda: toy_forward))


def test_the_kernel_is_resolved_once_per_option_and_device(monkeypatch):
    seen = []
    real = dispatch._resolve
    monkeypatch.setattr(dispatch, "_resolve", lambda kernel, device: seen.append(kernel) or real(kernel, device))
    monkeypatch.setattr(dispatch, "_MEMO", {})
    for _ in range(3):
        assert dispatch.implementation("torch", torch.device("cpu")) is packed_linear_body
    assert seen == ["torch"]


def test_lowering_decides_each_node_once(monkeypatch):
    from torch._dynamo.utils import counters

    from fairy2i_compile.compiler.codegen import lower

    decided = []
    real = lower.resolve_kernel

    def spy(kernel, device):
        decided.append(kernel)
        return real(kernel, device)

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(lower, "resolve_kernel", spy)
    compiled = torch.compile(_mlp(), backend=Fairy2iBackend({"mode": "ptq", "stages": 2, "kernel": "torch"}))
    with torch.no_grad():
        compiled(torch.randn(2, 16))
    assert decided == ["torch", "torch"]  # two layers, one decision each (three inference passes ask)
