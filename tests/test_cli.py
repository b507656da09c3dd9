"""The `fairy2i` command line: help, dump on tiny-llama, bench, and clear errors (exit 2) for bad input."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from fairy2i_compile.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fairy2i_compile.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("command", [None, "dump", "eval", "bench", "quantize"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(([command] if command else []) + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fairy2i")
    if command:
        assert "--model" in out and "--mode" in out


def test_console_script_is_installed():
    script = shutil.which("fairy2i", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("console script not installed (reinstall the package: make setup)")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "{dump,eval,bench,quantize}" in proc.stdout


def test_dump_tiny_llama_subprocess(tmp_path):
    out = tmp_path / "dump"
    proc = _run("dump", "--model", "tiny-llama", "--mode", "ptq", "--stages", "1", "--out", str(out),
                "--no-mlir", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out / "graph_0")) == [
        "00_captured.py", "01_widely_linear.py", "02_phase_quant.py", "03_fuse_stages.py",
        "04_aot_inference.py"]
    assert (out / "summary.md").is_file() and not (out / "mlir").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["stages"] == 1 and report["summary"]["converted"] == 15  # 2 blocks x 7 + lm_head
    assert "graph_0/02_phase_quant.py" in proc.stdout and "15 layers converted" in proc.stdout


def test_bench_tiny_llama(capsys):
    assert main(["bench", "--model", "tiny-llama", "--mode", "exact", "--seq-len", "8", "--iters", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| eager |" in out and "| fairy2i exact (eager) |" in out and "tokens / s" in out


def test_missing_model_folder_is_exit_2_without_traceback(tmp_path):
    proc = _run("dump", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "d"), "--no-progress")
    assert proc.returncode == 2
    assert "fairy2i dump: error: --model" in proc.stderr and "no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["dump", "--model", "{tmp}"], "is not a Hugging Face model folder (no config.json in it)"),
    (["dump", "--stages", "9"], "option 'stages' must be in 1..4"),
    (["dump", "--granularity", "blocks"], "scale_granularity"),
    (["dump", "--out", "{file}"], "exists and is not a folder"),
    (["eval", "--model", "tiny-llama"], "has no tokenizer"),
    (["eval", "--tasks", "arc_easyy"], "unknown task(s) ['arc_easyy']"),
    (["bench", "--model", "smollm3"], "no such folder; use one of ['smollm2', 'tiny-llama']"),
])
def test_bad_input_is_exit_2_with_a_message(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = [a.format(tmp=tmp_path, file=tmp_path / "file") for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fairy2i {argv[0]}: error: ") and message in err, err


def test_argparse_errors_exit_2(capsys):
    for argv in (["nosuchcommand"], ["bench", "--iters", "0"], ["dump", "--mode", "fast"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "--iters must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("fairy2i_compile.checkpoint") is not None,
                    reason="packed checkpoints exist in this build")
def test_quantize_without_packed_checkpoints_says_so(tmp_path, capsys):
    assert main(["quantize", "--out", str(tmp_path / "w2.pt"), "--no-progress"]) == 2
    assert "packed checkpoints are not available in this build" in capsys.readouterr().err
    assert not (tmp_path / "w2.pt").exists()
