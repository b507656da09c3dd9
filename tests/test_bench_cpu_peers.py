"""benchmarks/bench_cpu_peers.py and bench_cpu_lut.py without the peer or a model: argument checks,
the results table, the peer-file names (llama-cpp-python is built only by `make setup-cpu-peers`)."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("bench_cpu_peers")


@pytest.mark.parametrize("argv, message", [
    (["--decode-tokens", "1"], r"--decode-tokens must be >= 2 \(the first token comes from the prefill\), got 1"),
    (["--runs", "0"], r"--runs must be >= 1, got 0"),
    (["--ppl-windows", "-1"], r"--ppl-windows must be >= 0"),
    (["--prefill-lengths", "8", "0"], r"--prefill-lengths >= 1, got -?\d+ and \[8, 0\]"),
])
def test_bad_arguments_are_named(bench, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


def test_unknown_gguf_type_is_refused(bench, monkeypatch):
    monkeypatch.setattr("fairy2i_compile.checkpoints.models.smollm2_gguf_path", lambda: Path("/nonexistent.gguf"))
    with pytest.raises(ValueError, match=r"unknown GGUF type 'q3_k'; use one of \['f16', 'q4_0', 'q4_k_m', 'q8_0'\]"):
        bench.peer_gguf("q3_k", 2)
    assert bench.peer_gguf("q4_1", 2) == Path("/nonexistent.gguf")  # the shipped file runs as it is


def test_table_reads_speed_beside_quality(bench):
    base = {"prefill": {"8": 300.0, "128": 550.0}, "peak_rss_mb": 900.0}
    rows = [{"config": "w2", "engine": "fairy2i (inductor, CPU decode path: lut)", "linear_mib": 32.1,
             "decode_tok_s": 60.0, "ppl": 489.9, **base},
            {"config": "llama-q4_k_m", "engine": "llama.cpp", "file_mib": 98.9, "decode_tok_s": 75.0, "ppl": 22.43, **base}]
    result = {"command": "x", "machine": "x86_64", "threads": 2, "torch": "2.13.0", "prompt_tokens": 128,
              "decode_tokens": 64, "runs": 5, "prefill_reps": 3, "ppl_windows": 8, "seq_len": 2048,
              "prefill_lengths": [8, 128], "configs": rows, "notes": ""}
    text = bench.markdown(result)
    assert "| w2 | fairy2i (inductor, CPU decode path: lut) | 32.1 MiB linears | 60.0 | 0.80x | 300 | 550 | 489.9 |" in text
    assert "| llama-q4_k_m | llama.cpp | 98.9 MiB file | 75.0 | 1.00x |" in text


def test_packed_rows_need_a_checkpoint(bench, capsys, tmp_path):
    for argv in (["--configs", "packed"], ["--configs", "packed-lut8", "--packed", str(tmp_path / "none.safetensors")]):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert "--configs packed / packed-lut8 need --packed PATH of a save_packed checkpoint" in capsys.readouterr().err


def test_lut_benchmark_names_missing_lut_paths(monkeypatch):
    lut = _load("bench_cpu_lut")
    from fairy2i_compile.compiler.codegen import cpu_packed

    monkeypatch.setattr(cpu_packed, "cpu_lut_status", lambda: "absent")
    monkeypatch.setattr(cpu_packed, "cpu_lut8_status", lambda: "absent")
    with pytest.raises(SystemExit, match=r"no table-lookup path here \(lut: absent, lut8: absent\): they need AVX-512 / AVX2"):
        lut.main([])


def test_lut8_quality_refuses_bad_arguments(capsys, tmp_path):
    q = _load("lut8_quality")
    for argv, message in ((["--model", str(tmp_path / "x.safetensors")], "no such file"),
                          (["--model", "x", "--chunk", "9"], r"--chunk must be in 1..8"),
                          (["--model", "x", "--windows", "0"], r"--windows must be >= 1, got 0")):
        with pytest.raises(SystemExit):
            q.main(argv)
        assert pytest.importorskip("re").search(message, capsys.readouterr().err), argv


def test_results_name_the_cpu_from_proc_cpuinfo(monkeypatch, tmp_path):
    import platform

    import torch

    results_io = _load("results_io")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\n"
                    "model name\t: AMD EPYC 7551\nprocessor\t: 1\nmodel name\t: other\n")
    real_path = results_io.Path
    monkeypatch.setattr(results_io, "Path", lambda p: info if p == "/proc/cpuinfo" else real_path(p))
    assert results_io.cpu_description() == (f"{platform.machine()} AMD EPYC 7551 (family 23 model 1, "
                                            f"{torch.backends.cpu.get_cpu_capability()})")
    monkeypatch.setattr(results_io, "Path", lambda p: tmp_path / "absent")  # no /proc: still a usable name
    assert results_io.cpu_description().endswith(f"({torch.backends.cpu.get_cpu_capability()})")
