"""The kernel cache: where it lives, what it trusts, and that a damaged entry is rebuilt.

Nothing here trusts timing: each test builds its own cache folder from the library the
session already built (a copy, same name) and resets the module's loaded-library state.
"""

import ctypes
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fairy2i_compile import cache
from fairy2i_compile.compiler.codegen import cpu_packed, resolve_kernel

needs_cpu_kernel = pytest.mark.skipif(not cpu_packed.cpu_kernel_available()[0],
                                      reason=f"C++ CPU kernel unavailable: {cpu_packed.cpu_kernel_available()[1]}")

PLANTED = textwrap.dedent("""
    #include <stdio.h>
    #include <stdlib.h>
    __attribute__((constructor)) static void planted(void) {
        const char* p = getenv("FAIRY2I_TEST_MARKER");
        if (p) { FILE* f = fopen(p, "w"); if (f) fclose(f); }
    }
""")


@pytest.fixture(scope="module")
def planted_lib(tmp_path_factory):
    """A shared library that is not a fairy2i kernel; loading it creates $FAIRY2I_TEST_MARKER."""
    cxx = cpu_packed._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("planted")
    (folder / "planted.c").write_text(PLANTED)
    subprocess.run([cxx, "-x", "c", "-shared", "-fPIC", str(folder / "planted.c"), "-o", str(folder / "planted.so")],
                   check=True, capture_output=True)
    return folder / "planted.so"


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """A private kernel cache holding a copy of the built kernel (and its digest); fresh load state."""
    built = pathlib.Path(cpu_packed.cpu_kernel_available()[1])
    folder = tmp_path / "kc" / "cpu"
    folder.mkdir(parents=True, mode=0o700)
    (tmp_path / "kc").chmod(0o700)
    lib = folder / built.name
    shutil.copy2(built, lib)
    digest = built.with_name(built.name + ".sha256")
    if digest.exists():
        shutil.copy2(digest, lib.with_name(lib.name + ".sha256"))
    monkeypatch.setenv("FAIRY2I_KERNEL_CACHE", str(tmp_path / "kc"))
    monkeypatch.setenv("FAIRY2I_TEST_MARKER", str(tmp_path / "planted-code-ran"))
    for name in ("_LIB", "_LIB_PATH", "_FN", "_DECODE_ROWS", "_ERROR"):
        monkeypatch.setattr(cpu_packed, name, None)
    return lib


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG cache folder")
def test_default_cache_is_per_user_not_the_working_directory(tmp_path, monkeypatch):
    # an installed package (no source checkout around it), run from a folder someone else may control
    monkeypatch.setattr(cache, "__file__", str(tmp_path / "site-packages" / "fairy2i_compile" / "cache.py"))
    monkeypatch.delenv("FAIRY2I_CACHE", raising=False)
    monkeypatch.delenv("FAIRY2I_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    (tmp_path / "home").mkdir()
    (tmp_path / "theirs").mkdir()
    monkeypatch.chdir(tmp_path / "theirs")
    assert cache.default_cache_dir() == tmp_path / "home" / ".cache" / "fairy2i_compile"
    assert cache.kernel_cache_dir() == cache.default_cache_dir() / "kernels"
    cache.make_private_dirs(cache.kernel_cache_dir() / "cpu")
    for folder in (".cache", ".cache/fairy2i_compile", ".cache/fairy2i_compile/kernels",
                   ".cache/fairy2i_compile/kernels/cpu"):
        assert (tmp_path / "home" / folder).stat().st_mode & 0o777 == 0o700, folder
    assert cache.untrusted_reason(cache.kernel_cache_dir() / "cpu") is None


def test_untrusted_reason_names_the_entry(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "f").write_bytes(b"x")
    (private / "f").chmod(0o600)
    assert cache.untrusted_reason(private / "f") is None
    (private / "f").chmod(0o666)
    assert cache.untrusted_reason(private / "f") == f"{private / 'f'} is writable by group and others (mode 666)"
    private.chmod(0o770)
    (private / "f").chmod(0o600)
    assert cache.untrusted_reason(private / "f") == f"{private} is writable by its group (mode 770)"


@needs_cpu_kernel
def test_library_in_a_folder_others_can_write_is_not_loaded(kernel_cache, planted_lib, tmp_path):
    shutil.copy2(planted_lib, kernel_cache)
    kernel_cache.parent.chmod(0o777)
    with pytest.warns(RuntimeWarning, match=r"not private to this user: .*writable by group and others.*"
                                            r"pure-torch reference instead.*FAIRY2I_KERNEL_CACHE"):
        ok, why = cpu_packed.cpu_kernel_available()
    assert not (tmp_path / "planted-code-ran").exists()
    assert not ok and "writable by group and others" in why
    assert resolve_kernel("auto", torch.device("cpu")) == "torch"


@needs_cpu_kernel
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
def test_library_owned_by_another_user_is_not_loaded(kernel_cache, planted_lib, tmp_path):
    shutil.copy2(planted_lib, kernel_cache)
    os.chown(kernel_cache, 65534, 65534)
    with pytest.warns(RuntimeWarning, match="owned by uid 65534"):
        assert not cpu_packed.cpu_kernel_available()[0]
    assert not (tmp_path / "planted-code-ran").exists()


@needs_cpu_kernel
def test_library_that_does_not_match_its_digest_is_rebuilt(kernel_cache, planted_lib, tmp_path):
    shutil.copy2(planted_lib, kernel_cache)       # replaced after the build recorded its digest
    with pytest.warns(RuntimeWarning, match="does not match the digest recorded when it was built.*rebuilding"):
        ok, path = cpu_packed.cpu_kernel_available()
    assert ok and path == str(kernel_cache)
    assert not (tmp_path / "planted-code-ran").exists()
    assert cache.file_sha256(kernel_cache) == cpu_packed._digest_path(kernel_cache).read_text().strip()


@needs_cpu_kernel
def test_library_without_the_kernel_symbols_falls_back(kernel_cache, planted_lib):
    # digest and permissions in order (as if a forged digest were recorded): the symbols decide
    shutil.copy2(planted_lib, kernel_cache)
    cpu_packed._digest_path(kernel_cache).write_text(cache.file_sha256(kernel_cache) + "\n")
    with pytest.warns(RuntimeWarning, match="does not export fairy2i_cpu_abi_version.*pure-torch reference instead"):
        ok, why = cpu_packed.cpu_kernel_available()
    assert not ok and "not a fairy2i kernel library" in why


@needs_cpu_kernel
def test_op_library_without_registrations_falls_back(planted_lib, monkeypatch):
    monkeypatch.setattr(cpu_packed, "_OP_PATH", None)
    monkeypatch.setattr(cpu_packed, "_OP_ERROR", None)
    monkeypatch.setattr(cpu_packed, "build_cpu_op", lambda cache_dir=None: planted_lib)
    with pytest.warns(RuntimeWarning, match="does not export fairy2i_cpu_abi_version.*through Python instead"):
        ok, why = cpu_packed.cpu_op_available()
    assert not ok and "not a fairy2i kernel library" in why


@needs_cpu_kernel
def test_truncated_cached_kernel_is_rebuilt_not_a_crash(kernel_cache, tmp_path):
    # dlopen of a truncated library maps past its end: SIGBUS kills the process, so run it in a child
    data = kernel_cache.read_bytes()
    kernel_cache.write_bytes(data[: len(data) // 2])
    code = textwrap.dedent("""
        import warnings, torch
        from fairy2i_compile.compiler.codegen import cpu_packed
        from fairy2i_compile.compiler.ops import real_to_widely_reference as _real_to_widely
        from fairy2i_compile.quantization.packing import pack_widely
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok, path = cpu_packed.cpu_kernel_available()
        print(ok, path)
        print([str(w.message) for w in caught])
        torch.manual_seed(0)
        pk = pack_widely(*_real_to_widely(torch.randn(8, 32)), 2, "tensor")
        x = torch.randn(1, 32)
        y = cpu_packed.packed_linear_cpu(x, pk.codes, pk.scales, None, pk.m, 0)
        print(float(y.abs().sum()) > 0)
    """)
    env = {**os.environ, "FAIRY2I_KERNEL_CACHE": str(tmp_path / "kc")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    ok, warned, ran = proc.stdout.strip().splitlines()[-3:]
    assert ok == f"True {kernel_cache}" and "does not match the digest" in warned and ran == "True"
    assert kernel_cache.read_bytes() != data[: len(data) // 2]


@needs_cpu_kernel
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd through /proc")
def test_build_fsyncs_the_library_before_renaming_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    lib = cpu_packed.build_cpu_kernel(cache_dir=tmp_path / "kc")
    renamed = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(lib))
    tmp = events[renamed][1]
    assert ("fsync", tmp) in events[:renamed]
    assert cpu_packed._digest_path(lib).read_text().strip() == cache.file_sha256(lib)
    assert lib.stat().st_mode & 0o077 == 0 and lib.parent.stat().st_mode & 0o777 == 0o700
