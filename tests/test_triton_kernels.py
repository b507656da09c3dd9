"""Generated Triton kernels for the packed op vs the pure-torch reference.

On this project's CPU machines the kernels run in the Triton interpreter. The
variable must be set before triton is imported (triton picks interpreted or
compiled kernels when `@triton.jit` decorates them), hence the first lines.

Tolerances (kernel vs `packed_linear_reference` on the same fp32 inputs):

* fp32: atol = rtol = 1e-4, atol relative to the output scale max|y_ref|. Both sides
  add the same 2m * 2T products in fp32 in different orders (the GEMV also
  factors the scales out of its sums); the rounding is a few fp32 ulps of the
  output scale, 1e-7..1e-6 measured, so 1e-4 leaves room without hiding a wrong
  sign or a lost code (each of which moves the output by >= 1e-2 of its scale).
* bf16 / fp16 activations: the oracle runs in fp32 on the same (rounded) x and
  bias. The kernels accumulate in fp32 and round once on store (half an ulp:
  2^-9 bf16, 2^-12 fp16); the GPU GEMM also rounds its decoded weight tiles to the
  activation dtype, as the reference's `a_hat.to(x.dtype)` does. Hence
  atol = rtol = 2e-2 (bf16) and 3e-3 (fp16), atol relative to the output scale.
"""

import os

import torch

if not torch.cuda.is_available():  # on a GPU the compiled kernels are what is tested
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and fairy2i_compile are imported

import ast  # noqa: E402
import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

triton = pytest.importorskip("triton")


def _interpreter_active() -> bool:
    # triton's own @jit library (tl.zeros, tl.sum) is decorated when triton is imported: it is
    # interpreted only if TRITON_INTERPRET was set by then
    return type(triton.language.zeros).__name__ == "InterpretedFunction"


if not torch.cuda.is_available() and not _interpreter_active():
    pytest.skip(
        "triton was imported before this module set TRITON_INTERPRET=1 and there is no CUDA device: "
        "run this file alone (pytest tests/test_triton_kernels.py) or with TRITON_INTERPRET=1 in the environment",
        allow_module_level=True,
    )

from fairy2i_compile.compiler.codegen import triton_launch, triton_spec  # noqa: E402
from fairy2i_compile.compiler.codegen import triton_packed as tp  # noqa: E402
from fairy2i_compile.compiler.codegen.sign_table import AXIS, TABLE, UNIT  # noqa: E402
from fairy2i_compile.compiler.codegen.triton_packed import (  # noqa: E402
    INNER_LOOP_BEGIN,
    INNER_LOOP_END,
    KernelSpec,
    choose_spec,
    generate_source,
    generated_sources,
    launch_packed_linear,
    load_kernel,
    packed_linear_triton,
    source_path,
)
from fairy2i_compile.packed_ops import packed_linear, packed_linear_reference  # noqa: E402
from fairy2i_compile.quantization.packing import pack_widely  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = DEVICE == "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.fixture(scope="module", autouse=True)
def _kernel_env(tmp_path_factory):
    # a private kernel cache, and the interpreter even if another test module changed the variable
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FAIRY2I_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
        if INTERPRET:
            mp.setenv("TRITON_INTERPRET", "1")
        yield


def _layer(n, m, stages, granularity, seed=0):
    g = torch.Generator().manual_seed(seed)
    u_re, u_im, w_re, w_im = (torch.randn(n, m, generator=g) for _ in range(4))
    pk = pack_widely(u_re, u_im, w_re, w_im, stages, granularity)
    return pk.codes.to(DEVICE), pk.scales.to(DEVICE), pk.group_size or 0


def _inputs(lead, n, m, dtype, bias, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 2 * m, generator=g).to(DEVICE, dtype)
    b = torch.randn(2 * n, generator=g).to(DEVICE, dtype) if bias else None
    return x, b


def _assert_matches(y, x, codes, scales, b, m, group_size):
    ref = packed_linear_reference(x.float(), codes, scales, None if b is None else b.float(), m, group_size)
    assert y.dtype == x.dtype and y.shape == ref.shape
    tol = TOL[x.dtype]
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.float(), ref, atol=tol * scale, rtol=tol)


def _check(n, m, stages, granularity, lead, dtype=torch.float32, bias=False, seed=0, path=None, decode=None):
    """The public wrapper (path None: its own choice) or one forced path / decode against the reference."""
    codes, scales, group_size = _layer(n, m, stages, granularity, seed)
    x, b = _inputs(lead, n, m, dtype, bias, seed + 1)
    if path is None:
        y = packed_linear_triton(x, codes, scales, b, m, group_size)
    else:
        M = x.numel() // x.shape[-1]
        spec = choose_spec(M, n, m, stages, group_size, granularity == "row", dtype, bias, INTERPRET, path)
        assert spec.path == path
        if decode is not None:
            spec = dataclasses.replace(spec, decode=decode)
        y = launch_packed_linear(spec, x.reshape(M, 2 * m), codes, scales.float().contiguous(), b, m)
    _assert_matches(y.reshape(*lead, -1), x, codes, scales, b, m, group_size)


# --------------------------------------------------------------------------- #
# correctness


def test_sign_table_matches_complex_arithmetic():
    z = complex(0.375, -1.25)
    vals = {"a": z.real, "b": z.imag}
    for (conj, k), (re_t, im_t) in TABLE.items():
        want = (1j**k) * (z.conjugate() if conj else z)
        assert (re_t[0] * vals[re_t[1]], im_t[0] * vals[im_t[1]]) == (want.real, want.imag)
    for k in range(4):
        assert complex(*UNIT[k]) == 1j**k
        assert AXIS[k] == k % 2  # codes 0, 2 are +-1 (s_re), codes 1, 3 are +-i (s_im)


# n = 70: two BLOCK_N = 64 blocks, the second ragged; m = 150: not a multiple of 16 nor of
# BLOCK_K, several K steps; group 6 and 24 are not multiples of 16 (blocks start inside a word)
@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("granularity", ["tensor", "row", 16, 6, 24])
def test_gemv_matches_reference(stages, granularity):
    _check(70, 150, stages, granularity, (1,), bias=stages != 2, path="gemv")


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("granularity", ["tensor", "row", 16, 6, 24])
def test_gemm_matches_reference(stages, granularity):
    _check(70, 150, stages, granularity, (37,), bias=stages == 2, path="gemm")  # M = 37: a ragged BLOCK_M tile


# mma: every group size that is a multiple of 16 (32 and 48 leave a ragged last group at m = 150);
# T = 3 pads 6 planes to 8; M = 1 (batch-1 decode) and 5 (a ragged 8-row activation block)
@pytest.mark.parametrize("stages,granularity", [(t, g) for t in (1, 2, 3) for g in ("tensor", "row", 16, 32, 48)]
                         + [(4, "tensor"), (4, 48)])
@pytest.mark.parametrize("M", [1, 5])
def test_mma_matches_reference(stages, granularity, M):
    _check(70, 150, stages, granularity, (M,), bias=M == 5, path="mma")


@pytest.mark.skipif(INTERPRET, reason="inline PTX (decode='asm') runs on a CUDA device only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("granularity", ["tensor", "row", 32])
@pytest.mark.parametrize("M", [1, 3, 16, 64])
def test_mma_asm_decode_matches_reference(dtype, granularity, M):
    _check(70, 150, 2, granularity, (M,), dtype=dtype, bias=True, path="mma", decode="asm")


# dense: larger batches; M = 70 spans two BLOCK_M = 64 blocks (interpreter), T = 3 has an odd plane count
@pytest.mark.parametrize("stages,granularity", [(1, "tensor"), (2, "row"), (3, 32), (2, 48), (4, "tensor")])
def test_dense_matches_reference(stages, granularity):
    _check(70, 150, stages, granularity, (70,), bias=stages != 2, path="dense")


@pytest.mark.skipif(INTERPRET, reason="inline PTX (decode='asm') runs on a CUDA device only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("stages,granularity", [(1, "tensor"), (2, "row"), (3, 32)])
@pytest.mark.parametrize("M", [17, 200])
def test_dense_asm_decode_matches_reference(dtype, stages, granularity, M):
    _check(70, 150, stages, granularity, (M,), dtype=dtype, bias=True, path="dense", decode="asm")


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("granularity,M", [("tensor", 1), ("row", 5), (32, 3)])
def test_mma_split_k_matches_reference(split_k, granularity, M):
    """Split K: programs add their partial sums into a zeroed y (fp32 here: the interpreter has no bf16 atomics)."""
    codes, scales, g = _layer(70, 150, 2, granularity)
    x, b = _inputs((M,), 70, 150, torch.float32, True)
    spec = dataclasses.replace(choose_spec(M, 70, 150, 2, g, granularity == "row", torch.float32, True, INTERPRET,
                                           "mma"), split_k=split_k, block_k=32)
    y = torch.full((M, 140), float("nan"), device=DEVICE)  # the launcher zeroes it
    _assert_matches(launch_packed_linear(spec, x, codes, scales, b, 150, out=y), x, codes, scales, b, 150, g)


@pytest.mark.skipif(INTERPRET, reason="bf16 / fp16 atomic adds run on a CUDA device only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("decode", ["bits", "asm"])
def test_mma_split_k_half_on_gpu(dtype, decode):
    _check(70, 150, 2, "row", (3,), dtype=dtype, bias=True, path="mma", decode=decode)
    codes, scales, g = _layer(70, 150, 2, "row")
    x, b = _inputs((3,), 70, 150, dtype, True)
    spec = dataclasses.replace(choose_spec(3, 70, 150, 2, g, True, dtype, True, False, "mma"), split_k=4,
                               block_k=32, decode=decode)
    _assert_matches(launch_packed_linear(spec, x, codes, scales, b, 150), x, codes, scales, b, 150, g)


def test_mma_block_m_splits_activation_rows():
    """More rows than one program's BLOCK_M: a second grid dimension over the rows (ragged)."""
    n, m = 24, 40
    codes, scales, _ = _layer(n, m, 2, "row")
    x, b = _inputs((11,), n, m, torch.float32, True)
    spec = KernelSpec("mma", 2, "row", 0, "float32", True, 4, 8, 16, interpret=INTERPRET)
    _assert_matches(launch_packed_linear(spec, x, codes, scales, b, m), x, codes, scales, b, m, 0)


@pytest.mark.parametrize("lead", [(2, 3), (4, 7)], ids=["gemv-M6", "gemm-M28"])
def test_leading_dims_are_flattened(lead):
    _check(24, 40, 2, "row", lead, bias=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path,M", [("mma", 1), ("mma", 20), ("gemv", 1), ("gemm", 20)])
def test_half_activations(dtype, path, M):
    _check(40, 70, 2, 32, (M,), dtype=dtype, bias=True, path=path)


def test_many_blocks_and_k_steps():
    """Small forced blocks: 5 blocks of rows, 3 K steps with a ragged tail, on both paths."""
    n, m = 70, 45
    codes, scales, _ = _layer(n, m, 2, "row")
    for M, spec in [
        (3, KernelSpec("gemv", 2, "row", 0, "float32", True, 1, 16, 16, interpret=INTERPRET)),
        (1, KernelSpec("gemm", 2, "row", 0, "float32", True, 16, 16, 16, interpret=INTERPRET)),
        (33, KernelSpec("gemm", 2, "row", 0, "float32", True, 16, 16, 16, interpret=INTERPRET)),
        (3, KernelSpec("mma", 2, "row", 0, "float32", True, 4, 16, 16, interpret=INTERPRET)),
    ]:
        x, b = _inputs((M,), n, m, torch.float32, True)
        y = launch_packed_linear(spec, x, codes, scales, b, m)
        _assert_matches(y, x, codes, scales, b, m, 0)


def test_group_wider_than_m_is_row_scales():
    n, m = 20, 30
    codes, scales, g = _layer(n, m, 1, 64)  # one group per row
    assert g == 64 and choose_spec(1, n, m, 1, g, True, torch.float32, False, True).scale == "row"
    assert choose_spec(1, n, m, 1, g, True, torch.float32, False, True, "gemv").scale == "row"
    x, _ = _inputs((1,), n, m, torch.float32, False)
    _assert_matches(packed_linear_triton(x, codes, scales, None, m, g), x, codes, scales, None, m, g)


@settings(max_examples=10)
@given(
    n=st.integers(1, 40), m=st.integers(1, 50), stages=st.integers(1, 3),
    granularity=st.sampled_from(["tensor", "row", 1, 5, 8, 16, 20]),
    M=st.sampled_from([1, 2, 17, 19]), bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(n, m, stages, granularity, M, bias, seed):
    _check(n, m, stages, granularity, (M,), bias=bias, seed=seed)


def test_packed_linear_op_with_triton_kernel():
    n, m = 24, 40
    codes, scales, g = _layer(n, m, 2, 16)
    x, b = _inputs((2, 2), n, m, torch.float32, True)
    y = packed_linear(x, codes, scales, b, m, g, "triton")
    _assert_matches(y, x, codes, scales, b, m, g)


def test_registered_op_traces_with_fake_tensors():
    from torch.fx.experimental.proxy_tensor import make_fx

    n, m = 16, 20
    codes, scales, g = _layer(n, m, 1, "tensor")
    x, _ = _inputs((3,), n, m, torch.float32, False)
    # traced calls go through the op (registered on first use); eager calls launch directly
    gm = make_fx(lambda x, c, s: packed_linear_triton(x, c, s, None, m, g), tracing_mode="fake")(x, codes, scales)
    assert "fairy2i.packed_linear_triton" in gm.code
    assert torch.allclose(gm(x, codes, scales), packed_linear_triton(x, codes, scales, None, m, g))


def test_torch_compile_fullgraph():
    n, m = 16, 40
    codes, scales, g = _layer(n, m, 2, "row")
    x, b = _inputs((3,), n, m, torch.float32, True)
    f = torch.compile(lambda x: packed_linear_triton(x, codes, scales, b, m, g).relu(),
                      backend="aot_eager", fullgraph=True)
    ref = packed_linear_reference(x, codes, scales, b, m, g).relu()
    torch.testing.assert_close(f(x), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


def test_triton_op_is_registered_without_interpreter(tmp_path):
    """Without the interpreter the op is a triton_op: AOTAutograd decomposes it into a
    triton_kernel_wrapper_functional node (the kernel Inductor sees). Traced only, never run,
    so it needs no GPU."""
    code = (
        "import torch\n"
        "from functorch.compile import aot_function\n"
        "from fairy2i_compile.compiler.codegen import triton_packed as tp\n"
        "from fairy2i_compile.quantization.packing import pack_widely\n"
        "pk = pack_widely(*(torch.randn(16, 40) for _ in range(4)), 1, 'row')\n"
        "class Seen(Exception):\n"
        "    pass\n"
        "def grab(gm, inputs):\n"
        "    raise Seen(gm.code)\n"
        "f = lambda x, c, s: torch.ops.fairy2i.packed_linear_triton(x, c, s, None, 40, 0)\n"
        "try:\n"
        "    aot_function(f, fw_compiler=grab)(torch.randn(2, 80), pk.codes, pk.scales)\n"
        "except Seen as e:\n"
        "    print(e)\n"
    )
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FAIRY2I_KERNEL_CACHE"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "triton_kernel_wrapper_functional" in r.stdout, r.stdout + r.stderr[-3000:]
    assert [p.name.startswith("fairy2i_mma_t1_row_f32_") for p in (tmp_path / "triton").iterdir()] == [True]


# --------------------------------------------------------------------------- #
# generated source


def _inner_loops(source: str):
    lines = source.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == INNER_LOOP_BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == INNER_LOOP_END]
    assert len(starts) == len(ends) == 1, "one marked inner loop per GEMV source"
    return lines[starts[0] + 1:ends[0]]


@pytest.mark.parametrize("granularity", ["tensor", "row", 16, 64, 6, 24])
@pytest.mark.parametrize("stages", [1, 3])
def test_gemv_inner_loop_has_no_multiplication(granularity, stages):
    n, m = 64, 300
    group = granularity if isinstance(granularity, int) else 0
    for interpret in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            spec = choose_spec(1, n, m, stages, group, granularity == "row", dtype, True, interpret, "gemv")
            assert spec.path == "gemv"
            body = _inner_loops(generate_source(spec))
            code = [line.split("#", 1)[0] for line in body]
            assert not any("*" in line for line in code), "\n".join(body)
            assert sum("tl.where" in line for line in code) == 8 * stages  # 2 axes x re/im x 2T planes
            assert not any("tl.dot" in line for line in code)


@pytest.mark.parametrize("path_M", [1, 40])
def test_generated_source_is_readable_python(path_M):
    spec = choose_spec(path_M, 50, 70, 2, 24, True, torch.bfloat16, True, INTERPRET)
    src = generate_source(spec)
    ast.parse(src)
    head = src.split("import triton", 1)[0]
    assert head.startswith("# Generated by fairy2i_compile") and "# spec: KernelSpec(" in head
    assert f"group_size={spec.group_size}" in head and "Q^U_t" in head
    assert f"def {spec.name}(" in src


def test_sources_are_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRY2I_KERNEL_CACHE", str(tmp_path))
    spec = choose_spec(1, 24, 40, 1, 0, False, torch.float32, False, INTERPRET)
    kernel = load_kernel(spec)
    path = source_path(spec)
    assert path.parent == tmp_path / "triton" and path.name.startswith(spec.name + "_")
    assert path.read_text() == generate_source(spec) and path in generated_sources()
    assert load_kernel(spec) is kernel  # in-process cache per spec
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(triton_launch, "_KERNELS", {})  # as a new process would: the file is found and reused
    load_kernel(spec)
    assert path.stat().st_mtime_ns == mtime and sorted((tmp_path / "triton").iterdir()) == [path]
    path.write_text("# damaged\n")  # a file that does not match its hash is rewritten
    monkeypatch.setattr(triton_launch, "_KERNELS", {})
    load_kernel(spec)
    assert path.read_text() == generate_source(spec)
    other = choose_spec(1, 24, 40, 2, 0, False, torch.float32, False, INTERPRET)
    assert source_path(other) != path  # another spec, another hash


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from fairy2i_compile.compiler.codegen import triton_packed as tp\n"
        "s = tp.choose_spec(1, 8, 8, 1, 0, False, torch.float32, False, False)\n"
        "assert s.path == 'mma' and 'tl.dot' in tp.generate_source(s)\n"
    )
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_gpu_sources_compile_for_sm90(tmp_path):
    """The code only a GPU runs (bf16 atoms in the dot, inline PTX, the IEEE fp32 dot) goes through Triton's
    compiler and ptxas for sm_90 without a GPU, in a process without the interpreter."""
    code = (
        "import sys\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "import triton\n"
        "from triton.runtime.jit import JITFunction\n"
        "from fairy2i_compile.compiler.codegen.triton_packed import KernelSpec, load_kernel\n"
        "specs = [KernelSpec('mma', 2, 'tensor', 0, 'bfloat16', False, 1, 16, 64, 4, 3, decode='asm'),\n"
        "         KernelSpec('mma', 1, 'row', 0, 'float32', True, 4, 16, 32, 4, 2),\n"
        "         KernelSpec('dense', 1, 'group', 32, 'float16', True, 32, 64, 32, 4, 2, decode='asm'),\n"
        "         KernelSpec('dense', 2, 'tensor', 0, 'bfloat16', False, 32, 64, 32, 4, 2)]\n"
        "ty = {'bfloat16': '*bf16', 'float16': '*fp16', 'float32': '*fp32'}\n"
        "for spec in specs:\n"
        "    fn = load_kernel(spec)\n"
        "    while not isinstance(fn, JITFunction):\n"
        "        fn = fn.fn\n"
        "    sig = {'x_ptr': ty[spec.act_dtype], 'codes_ptr': '*i32', 'scales_ptr': '*fp32'}\n"
        "    if spec.has_bias:\n"
        "        sig['bias_ptr'] = ty[spec.act_dtype]\n"
        "    sig.update(y_ptr=ty[spec.act_dtype], M='i32', n='i32', m='i32', KW='i32', G='i32')\n"
        "    consts = dict(BLOCK_M=spec.block_m, BLOCK_N=spec.block_n, BLOCK_K=spec.block_k)\n"
        "    if spec.scale == 'group':\n"
        "        consts['GROUP'] = spec.group_size\n"
        "    sig.update({c: 'constexpr' for c in consts})\n"
        "    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget('cuda', 90, 32),\n"
        "                       options={'num_warps': spec.num_warps, 'num_stages': spec.num_stages})\n"
        "    assert k.asm['cubin'] and ('mma' in k.asm['ptx'] or spec.act_dtype == 'float32'), spec\n"
        "    print('compiled', spec.name)\n"
    )
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FAIRY2I_KERNEL_CACHE"] = str(tmp_path)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() and "not found" in r.stderr.lower()):
        pytest.skip("this triton install has no ptxas for sm_90")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("compiled") == 4, r.stdout


# --------------------------------------------------------------------------- #
# bad inputs


def test_rejects_non_contiguous_x():
    codes, scales, g = _layer(8, 16, 1, "tensor")
    x = torch.randn(32, 3, device=DEVICE).t()  # [3, 32], strides (1, 3)
    with pytest.raises(ValueError, match=r"contiguous.*\(3, 32\).*\(1, 3\).*\.contiguous\(\)"):
        packed_linear_triton(x, codes, scales, None, 16, g)


def test_rejects_wrong_last_dim():
    codes, scales, g = _layer(8, 16, 1, "tensor")
    with pytest.raises(ValueError, match=r"last dim 2\*m = 32"):
        packed_linear_triton(torch.randn(2, 30, device=DEVICE), codes, scales, None, 16, g)


def test_rejects_bias_dtype_mismatch():
    codes, scales, g = _layer(8, 16, 1, "tensor")
    x = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(TypeError, match="bias dtype"):
        packed_linear_triton(x, codes, scales, torch.randn(16, device=DEVICE, dtype=torch.float16), 16, g)


def test_cpu_without_interpreter_raises(monkeypatch):
    codes, scales, g = _layer(8, 16, 1, "tensor")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        packed_linear_triton(torch.randn(2, 32), codes.cpu(), scales.cpu(), None, 16, g)


def test_kernel_spec_validation():
    with pytest.raises(ValueError, match="power of two"):
        KernelSpec("gemv", 1, "tensor", block_n=24)
    with pytest.raises(ValueError, match="tl.dot needs"):
        KernelSpec("gemm", 1, "tensor", block_m=8, block_n=16, block_k=16)
    with pytest.raises(ValueError, match="group_size"):
        KernelSpec("gemv", 1, "group")
    with pytest.raises(ValueError, match="block_k to divide the group"):
        KernelSpec("mma", 1, "group", 48, block_k=32)
    with pytest.raises(ValueError, match="decode='asm'"):
        KernelSpec("gemv", 1, "tensor", decode="asm")
    with pytest.raises(ValueError, match="decode='asm'"):
        KernelSpec("mma", 1, "tensor", decode="asm", interpret=True)
    with pytest.raises(ValueError, match="multiples of 16"):
        choose_spec(1, 8, 40, 1, 6, True, torch.float32, False, True, "mma")
    with pytest.raises(ValueError, match="bfloat16 or float16 activations only"):
        KernelSpec("dense", 1, "tensor", act_dtype="float32", decode="asm")
    with pytest.raises(ValueError, match="split_k"):
        KernelSpec("dense", 1, "tensor", split_k=2)


@pytest.mark.parametrize("interpret", [True, False])
def test_choose_spec_routes_by_rows_and_group_size(interpret):
    def path(M, group=0, m=300):
        return choose_spec(M, 64, m, 2, group, bool(group), torch.bfloat16, False, interpret).path

    assert tp.MMA_MAX_M == 16 and tp.GEMV_MAX_M == 2
    assert [path(M) for M in (1, 2, 16, 17, 64, 256)] == ["mma"] * 3 + ["dense"] * 3
    assert [path(M, 32) for M in (1, 16, 17)] == ["mma", "mma", "dense"]  # groups of whole code words
    assert [path(M, 6) for M in (1, 2, 3, 64)] == ["gemv", "gemv", "gemm", "gemm"]  # groups starting inside a word
    assert path(1, 6, m=6) == "mma"  # one group per row: row scales
    spec = choose_spec(5, 64, 300, 2, 32, True, torch.bfloat16, False, interpret)
    assert spec.block_m == 8 and 32 % spec.block_k == 0  # next_pow2(M) rows; steps tile the groups
    assert choose_spec(3, 8, 8, 1, 0, False, torch.float32, False, False, "gemm").block_m == 16  # one 16-row tile


# --------------------------------------------------------------------------- #
# a compiled model on the GPU (this project's CPU machines cannot run it: it was run on the
# lent GPU machine, see benchmarks/results/gpu_tests.md)


@pytest.mark.skipif(INTERPRET, reason="compiled (not interpreted) Triton kernels inside torch.compile need CUDA")
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_compiled_llama_on_cuda_runs_the_generated_kernels(compiler, tmp_path, monkeypatch):
    from helpers import tiny_llama

    from fairy2i_compile import Fairy2iBackend

    monkeypatch.setenv("FAIRY2I_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(triton_launch, "_KERNELS", {})  # kernels this model needs are generated into tmp_path
    model = tiny_llama().cuda().eval()
    ptq = torch.compile(model, backend=Fairy2iBackend({"mode": "ptq", "stages": 2, "compiler": compiler}))
    qat = torch.compile(model, backend=Fairy2iBackend({"mode": "qat", "stages": 2}))
    for shape in ((2, 10), (1, 2)):  # 20 rows: GEMM; 2 rows: GEMV
        ids = torch.randint(0, 96, shape, device="cuda")
        with torch.no_grad():
            got = ptq(ids).logits
            want = qat(ids).logits
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=TOL[torch.float32], atol=TOL[torch.float32] * scale)
    names = [p.name for p in (tmp_path / "triton").iterdir()]
    assert any(s.startswith("fairy2i_dense_t2_") for s in names), names  # 20 rows
    assert any(s.startswith("fairy2i_mma_t2_") for s in names), names  # 2 rows


def test_dump_holds_the_kernel_sources_a_packed_model_ran(tmp_path):
    """A PTQ graph with kernel="triton" reaches the kernels through codegen/dispatch.py, which never
    imports the triton_packed facade: the dump still copies the generated sources after the first
    call. In a fresh process, where nothing else has imported the Triton modules."""
    script = (
        "import sys, torch\n"
        "from fairy2i_compile import Fairy2iBackend\n"
        "device = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(16, 16)).to(device)\n"
        "options = {'mode': 'ptq', 'stages': 1, 'kernel': 'triton', 'dump_dir': sys.argv[1]}\n"
        "compiled = torch.compile(model, backend=Fairy2iBackend(options))\n"
        "with torch.no_grad():\n"
        "    compiled(torch.randn(2, 16, device=device))\n"
    )
    env = dict(os.environ, FAIRY2I_KERNEL_CACHE=str(tmp_path / "cache"), FAIRY2I_MLIR="0")
    if INTERPRET:
        env["TRITON_INTERPRET"] = "1"
    dump = tmp_path / "dump"
    subprocess.run([sys.executable, "-c", script, str(dump)], env=env, check=True, timeout=600,
                   cwd=pathlib.Path(__file__).resolve().parent.parent)
    kernels = sorted(p.name for p in (dump / "kernels").iterdir())
    assert any(k.startswith("fairy2i_") and k.endswith(".py") for k in kernels), kernels


# --------------------------------------------------------------------------- #
# the measured config table (benchmarks/tune_kernels.py --write-configs)


def test_choose_spec_uses_the_nearest_measured_config(tmp_path, monkeypatch):
    import json

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    gemv = {"block_m": 1, "block_n": 4, "block_k": 512, "num_warps": 1, "num_stages": 2}
    table = {device: [
        {"path": "gemv", "stages": 2, "M": 1, "n": 2048, "m": 5504, "config": gemv},
        {"path": "gemv", "stages": 2, "M": 1, "n": 64, "m": 64, "config": dict(gemv, block_n=16)},
        {"path": "gemm", "stages": 2, "M": 256, "n": 2048, "m": 5504,
         "config": {"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3}},
        {"path": "mma", "stages": 2, "M": 1, "n": 2048, "m": 5504,
         "config": {"block_m": 1, "block_n": 8, "block_k": 512, "num_warps": 2, "num_stages": 4, "decode": "asm",
                    "split_k": 2}},
        {"path": "mma", "stages": 2, "M": 64, "n": 2048, "m": 5504,
         "config": {"block_m": 32, "block_n": 16, "block_k": 128, "num_warps": 4, "num_stages": 3, "decode": "bits"}},
    ], "some other GPU": [{"path": "gemv", "stages": 1, "M": 1, "n": 8, "m": 8, "config": dict(gemv, block_n=64)}]}
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("FAIRY2I_TRITON_CONFIGS", str(path))
    choose_spec.cache_clear()
    try:
        assert tp.tuned_config("gemv", 2, 2000, 5000, 1) == gemv  # nearest layer size
        assert tp.tuned_config("gemv", 1, 50, 70, 1)["block_n"] == 16  # other T, nearest size
        s = choose_spec(1, 2048, 5504, 2, 0, False, torch.bfloat16, False, False, "gemv")
        assert (s.block_n, s.block_k, s.num_warps) == (4, 512, 1)
        s = choose_spec(1, 2048, 5504, 2, 32, True, torch.bfloat16, False, False, "gemv")  # groups cap BLOCK_K
        assert (s.scale, s.block_k) == ("group", 32)
        s = choose_spec(1, 2048, 5504, 2, 0, False, torch.bfloat16, False, False)  # mma: nearest M, its decode
        assert (s.path, s.block_m, s.block_n, s.block_k, s.num_stages, s.decode) == ("mma", 1, 8, 512, 4, "asm")
        s = choose_spec(16, 2048, 5504, 2, 0, False, torch.bfloat16, False, False)
        assert (s.block_m, s.block_n, s.decode) == (16, 16, "bits")  # the M = 64 entry, block_m <= next_pow2(16)
        s = choose_spec(4, 2048, 5504, 2, 0, False, torch.bfloat16, False, False)
        assert (s.block_m, s.block_n, s.split_k) == (4, 8, 2)  # the M = 1 entry's blocks, but BLOCK_M from M
        s = choose_spec(256, 2048, 5504, 2, 0, False, torch.bfloat16, False, False)
        assert (s.path, s.block_m, s.block_n, s.decode) == ("dense", 128, 128, "bits")  # no entry: defaults
        s = choose_spec(256, 2048, 5504, 2, 0, False, torch.bfloat16, False, False, "gemm")
        assert (s.path, s.block_m, s.block_n, s.num_warps) == ("gemm", 128, 128, 8)
        s = choose_spec(32, 2048, 5504, 2, 0, False, torch.bfloat16, False, False, "gemm")
        assert s.block_m == 32  # fewer than 64 rows: no 128-row tiles of masked work
        # the interpreter reads no table
        assert choose_spec(1, 8, 8, 1, 0, False, torch.float32, False, True, "gemv").block_n == 16
        path.write_text("{not json")
        triton_spec._config_table.cache_clear()
        with pytest.raises(ValueError, match="cannot be read as JSON.*tune_kernels.py"):
            tp.tuned_config("gemv", 2, 8, 8, 1)
        monkeypatch.setenv("FAIRY2I_TRITON_CONFIGS", str(tmp_path / "missing.json"))
        with pytest.raises(FileNotFoundError, match="FAIRY2I_TRITON_CONFIGS=.*missing.json"):
            tp.tuned_config("gemv", 2, 8, 8, 1)
    finally:
        choose_spec.cache_clear()
        triton_spec._config_table.cache_clear()


def test_shipped_config_table_is_valid():
    import json

    table = json.loads(tp.CONFIGS_FILE.read_text())
    assert table, "the shipped table names at least one measured GPU"
    for device, entries in table.items():
        triton_spec._config_table.cache_clear()
        assert triton_spec._config_table(str(tp.CONFIGS_FILE), device) == entries and entries
        for e in entries:
            spec = KernelSpec(e["path"], e["stages"], "tensor", act_dtype="bfloat16", **e["config"])  # valid blocks
            assert spec.path in tp.PATHS and spec.block_m <= max(16, e["M"])
    triton_spec._config_table.cache_clear()
