"""Triton lowering of the packed op: generated, spec-specialised kernels.

    packed_linear_triton(x, codes, scales, bias, m, group_size) -> y
    x [..., 2m] -> y [..., 2n]; codes int32 [2T, n, ceil(m/16)]; scales [2T, 2, n_s, G]

The family is split along its jobs; this module gathers their public names:

    triton_spec.py     KernelSpec, the four paths, choose_spec and the tuned config table
    triton_source.py   source generation from templates (what the kernels compute, derived)
    triton_mma.py      the tensor-core templates (mma, dense)
    triton_launch.py   writing, loading and launching the generated kernels
    ops/packed_triton.py   the torch.library ops fairy2i::packed_linear_triton (+ _interpreted)
                       and the checked entry point packed_linear_triton
"""

from __future__ import annotations

from ..ops.packed_triton import packed_linear_triton
from .triton_launch import generated_sources, launch_packed_linear, load_kernel
from .triton_source import GENERATOR_VERSION, INNER_LOOP_BEGIN, INNER_LOOP_END, generate_source, source_path
from .triton_spec import CONFIGS_FILE, GEMV_MAX_M, MMA_MAX_M, PATHS, KernelSpec, choose_spec, mma_applies, tuned_config

__all__ = [
    "CONFIGS_FILE",
    "GEMV_MAX_M",
    "MMA_MAX_M",
    "PATHS",
    "GENERATOR_VERSION",
    "INNER_LOOP_BEGIN",
    "INNER_LOOP_END",
    "KernelSpec",
    "choose_spec",
    "generate_source",
    "generated_sources",
    "launch_packed_linear",
    "load_kernel",
    "mma_applies",
    "packed_linear_triton",
    "source_path",
    "tuned_config",
]
