"""Option cpp_wrapper: inference graphs built with Inductor's C++ wrapper.

The compiled model equals the Python-wrapper build of the same backend exactly; the generated C++
calls the packed ops (the fused sibling overloads included) through the dispatcher, never through
Inductor's Python callback; the option is refused where no code is generated.
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from fairy2i_compile import Fairy2iBackend, Fairy2iConfig
from fairy2i_compile.compiler.codegen import cpu_packed
from fairy2i_compile.quantization.packed_model import pack_model

from helpers import tiny_llama

needs_cpu_op = pytest.mark.skipif(not cpu_packed.cpu_op_available()[0],
                                  reason=f"C++ op registration unavailable: {cpu_packed.cpu_op_available()[1]}")


@needs_cpu_op
def test_cpp_wrapper_build_equals_the_python_wrapper_and_calls_the_ops_without_python():
    """A packed W2 tiny Llama, prefill and a decode step through a StaticCache (the graphs update the
    cache in place), with and without the option: the same logits; the C++ build's code calls
    packed_linear_cpu and both multi overloads (q/k/v: n3, gate/up: n2) through the dispatcher."""
    from transformers import StaticCache

    model = tiny_llama(layers=1).eval()
    pack_model(model, stages=2, skip=["lm_head"])
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))

    def run(options):
        torch._dynamo.reset()
        fwd = torch.compile(model, backend=Fairy2iBackend({"compiler": "inductor", **options}))
        cache = StaticCache(config=model.config, max_cache_len=12)
        with torch.no_grad():
            first = fwd(input_ids=ids, past_key_values=cache, cache_position=torch.arange(5), use_cache=True).logits
            step = fwd(input_ids=ids[:, :1], past_key_values=cache, cache_position=torch.tensor([5]), use_cache=True)
        return first, step.logits

    want = run({})
    got, codes = run_and_get_code(lambda: run({"cpp_wrapper": True}))
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=0, atol=0)
    code = "\n".join(codes)
    assert "custom_op_wrapper" not in code  # no op goes back to Python
    for call in ('"fairy2i::packed_linear_cpu_multi", "n3"', '"fairy2i::packed_linear_cpu_multi", "n2"',
                 '"fairy2i::packed_linear_cpu"'):
        assert call in code, call


def test_cpp_wrapper_needs_inductor_and_a_bool():
    assert Fairy2iConfig(compiler="inductor", cpp_wrapper=True).cpp_wrapper
    with pytest.raises(ValueError, match="compiler='eager' generates no code; pass compiler='inductor' with it"):
        Fairy2iConfig(cpp_wrapper=True)
    with pytest.raises(ValueError, match="option 'cpp_wrapper' must be True or False, got 'yes'"):
        Fairy2iConfig(compiler="inductor", cpp_wrapper="yes")
