"""The `fairy2i` command line: help, dump on tiny-llama, bench, quantize -> packed checkpoint -> bench/dump,
and clear errors (exit 2) for bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import torch

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
    if command == "quantize":
        assert "--model" in out and "--dense-dtype" in out and "FILE.safetensors" in out and "--mode {" not in out
    elif command:
        assert "--model" in out and "--mode" in out and "FILE.safetensors" in out


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
        "04_aot_inference.py", "05_lower_cpu_op.py", "06_fuse_siblings.py", "07_lower_cpu_direct.py", "08_lower_infer.py",
        "09_gqa_attention.py"]
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
    (["dump", "--granularity", "blocks"], "--granularity 'blocks': unknown granularity"),
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


@pytest.mark.parametrize("argv", [["quantize", "--mode", "exact", "--out", "x.safetensors"],
                                  ["bench", "--mod", "tiny-llama"], ["dump", "--stage", "1"]])
def test_options_are_never_abbreviated(argv, capsys):
    # `quantize` has no --mode; argparse's prefix matching used to read it as --model exact
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {' '.join(argv[1:3])}" in capsys.readouterr().err


# ------------------------------------------------------------------ packed checkpoints
@pytest.fixture(scope="module")
def w2_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny-w2.safetensors"
    assert main(["quantize", "--model", "tiny-llama", "--stages", "2", "--out", str(path), "--no-progress"]) == 0
    return path


def test_quantize_tiny_llama_equals_pack_model_bit_for_bit(w2_checkpoint):
    from fairy2i_compile.checkpoints.checkpoint import load_packed, packed_state_info
    from fairy2i_compile.cli import _tiny_llama
    from fairy2i_compile.quantization.packed_model import pack_model

    info = packed_state_info(w2_checkpoint)
    assert info["extra"] == {"source": "tiny-llama"} and info["fairy2i"]["stages"] == 2 and len(info["layers"]) == 15
    ref = _tiny_llama(torch.float32)
    pack_model(ref, stages=2, kernel="torch")
    loaded = load_packed(w2_checkpoint, kernel="torch")
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, atol=0, rtol=0)


def test_quantize_subprocess_skip_and_dense_dtype(tmp_path):
    out = tmp_path / "w1.safetensors"
    proc = _run("quantize", "--model", "tiny-llama", "--stages", "1", "--skip", "lm_head", "--dense-dtype", "float16",
                "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert "14 layers packed (stages=1, granularity='tensor'), 1 kept real" in proc.stdout
    assert "kept real: lm_head (matches skip pattern 'lm_head')" in proc.stdout and "(float16)" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["w1.safetensors"]  # no temp file left


def test_bench_and_dump_take_a_packed_checkpoint(w2_checkpoint, tmp_path, capsys):
    assert main(["bench", "--model", str(w2_checkpoint), "--seq-len", "8", "--iters", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{w2_checkpoint}: forward of 1 x 8 tokens") and "| fairy2i ptq (eager) |" in out
    dump = tmp_path / "dump"
    assert main(["dump", "--model", str(w2_checkpoint), "--out", str(dump), "--no-mlir", "--no-progress"]) == 0
    report = json.loads((dump / "report.json").read_text())
    assert report["graphs"][0]["counters"]["fuse_stages_prepacked"] == 15
    assert "phase_quant_ptq" not in report["graphs"][0]["counters"]  # nothing quantized again


def test_kept_real_layers_of_a_checkpoint_stay_real_when_compiled(tmp_path, capsys):
    ckpt = tmp_path / "skip.safetensors"
    assert main(["quantize", "--stages", "1", "--skip", "*.down_proj", "--out", str(ckpt), "--no-progress"]) == 0
    dump = tmp_path / "dump"
    assert main(["dump", "--model", str(ckpt), "--out", str(dump), "--no-mlir", "--no-progress"]) == 0
    layers = {r["name"]: r for r in json.loads((dump / "report.json").read_text())["layers"]}
    down = [r for name, r in layers.items() if name.endswith("down_proj")]
    assert len(down) == 2 and all(r["action"] == "kept_real" for r in down), down
    assert "13 layers converted, 2 kept real" in capsys.readouterr().out


def _forged(src, dst, model_class=None, scales=None):
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if model_class:
        meta["model_class"] = model_class
        meta["config_sha256"] = hashlib.sha256(f"{model_class}\n{meta['model_config']}".encode()).hexdigest()
    if scales is not None:
        tensors["lm_head.scales"][0, 0, 0, 0] = scales
    save_file(tensors, str(dst), metadata=meta)


@pytest.mark.parametrize("command", ["bench", "dump"])
@pytest.mark.parametrize("forgery, message", [
    ({"model_class": "GPT2LMHeadModel"}, "model_class 'GPT2LMHeadModel' is not a transformers model class for "
                                         "model_type 'llama'"),
    ({"scales": float("nan")}, "tensors ['lm_head.scales'] hold non-finite scales"),
])
def test_forged_checkpoint_is_one_error_line_exit_2(command, forgery, message, w2_checkpoint, tmp_path, capsys):
    bad = tmp_path / "forged.safetensors"
    _forged(w2_checkpoint, bad, **forgery)
    argv = [command, "--model", str(bad), "--no-progress"] + (["--out", str(tmp_path / "d"), "--no-mlir"]
                                                             if command == "dump" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fairy2i {command}: error: {bad}: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--out", "{tmp}/w2.pt"], "must end in .safetensors"),
    (["quantize", "--out", "{tmp}"], "is a folder; give a file path ending in .safetensors"),
    (["quantize", "--stages", "9", "--out", "{tmp}/x.safetensors"], "option 'stages' must be in 1..4"),
    (["quantize", "--model", "{ckpt}", "--out", "{tmp}/x.safetensors"], "is already a packed checkpoint"),
    (["bench", "--model", "{tmp}/nope.safetensors"], "no such file; write a packed checkpoint with `fairy2i quantize"),
    (["bench", "--model", "{ckpt}", "--stages", "1"], "is a packed checkpoint (stages=2, granularity='tensor'); "
                                                      "--stages do not apply to it"),
    (["bench", "--model", "{ckpt}", "--dtype", "float16"], "--dtype does not apply to a packed checkpoint"),
    (["dump", "--model", "{half}", "--out", "{tmp}/d"], "not a readable safetensors file (truncated or corrupt?)"),
    (["bench", "--model", "{plain}"], "not a fairy2i packed checkpoint (metadata 'format' is None"),
    (["eval", "--model", "{ckpt}"], "has no tokenizer"),
])
def test_checkpoint_bad_input_is_exit_2_with_a_message(argv, message, w2_checkpoint, tmp_path, capsys):
    from safetensors.torch import save_file

    data = w2_checkpoint.read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    names = {"tmp": tmp_path, "ckpt": w2_checkpoint, "half": tmp_path / "half.safetensors",
             "plain": tmp_path / "plain.safetensors"}
    argv = [a.format(**names) for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fairy2i {argv[0]}: error: ") and message in err and "\n" == err[-1:], err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "w2.pt").exists()
