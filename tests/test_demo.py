"""The demo's table/plot and the QAT script's data split, on synthetic inputs (no model)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from fairy2i_compile import Fairy2iBackend
from fairy2i_compile.demo import _check_converted, plot, table

REPO = Path(__file__).resolve().parents[1]


def _fake_result():
    rows = []
    for name, bits, ppl in [("FP32 (exact rewrite)", 32.0, 21.0), ("Fairy2i-W2", 2.0, 2.8e6)]:
        errs = {} if bits == 32.0 else {"model.layers.0.self_attn.q_proj": 0.4, "lm_head": 0.38}
        rows.append({"name": name, "bits_per_weight": bits, "linear_bytes": 2**20 * bits / 32 * 16,
                     "linear_bytes_fp32": 2**20 * 16, "perplexity": {"ppl": ppl},
                     "tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.45, "n": 60}}, "per_layer_rel_fro": errs})
    return {"settings": {"tasks": ["arc_easy"], "windows": 2, "seq_len": 2048}, "rows": rows, "seconds": 60,
            "environment": {"threads": 2}}


def test_table_formats_every_row():
    text = table(_fake_result())
    lines = text.splitlines()
    assert lines[0].startswith("| method | bits/weight | linear bytes | vs FP32 | wiki ppl | arc_easy acc / acc_norm |")
    assert "| FP32 (exact rewrite) | 32.00 | 16.00 MiB | 1.0x | 21.00 | 0.500 / 0.450 |" in lines
    assert "| Fairy2i-W2 | 2.00 | 1.00 MiB | 16.0x | 2.80e+06 | 0.500 / 0.450 |" in lines


def test_plot_writes_a_png(tmp_path):
    out = tmp_path / "demo.png"
    plot(_fake_result(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_converted_refuses_an_unconverted_row():
    with pytest.raises(RuntimeError, match="converted no layer"):
        _check_converted("Fairy2i-W2", Fairy2iBackend({"mode": "ptq"}))


def test_qat_script_holds_out_the_last_windows():
    spec = importlib.util.spec_from_file_location("qat_smollm2", REPO / "benchmarks" / "qat_smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tokens = torch.arange(100)
    train, held = mod.split_windows(tokens, 10, 3)
    assert train.shape == (7, 10) and held.shape == (3, 10)
    assert set(train.flatten().tolist()).isdisjoint(held.flatten().tolist())
    with pytest.raises(ValueError, match="leaves none to train on"):
        mod.split_windows(tokens, 10, 10)
    assert mod.parse_args(["--tag", "x", "--generated", "64"]).generated == 64
    with pytest.raises(SystemExit):
        mod.parse_args(["--tag", "x", "--generated", "-1"])


def test_demo_writes_outside_the_tracked_results_by_default():
    from fairy2i_compile import demo

    out = Path(demo.build_parser().parse_args([]).out)
    assert out.parts[0] == "runs" and "benchmarks" not in out.parts
    ignored = (REPO / ".gitignore").read_text().split()
    assert "runs/" in ignored


def test_demo_rejects_unknown_rows_before_loading_anything(capsys):
    from fairy2i_compile import demo

    with pytest.raises(SystemExit) as exc:
        demo.main(["--rows", "Fairy2i-W9"])
    assert exc.value.code == 2
    assert "unknown --rows ['Fairy2i-W9']" in capsys.readouterr().err


def test_demo_rows_include_the_calibrated_ladder():
    from fairy2i_compile import demo

    calibrated = [name for name, _, cal in demo.ROWS if cal]
    assert [n for n in calibrated if n.startswith("Fairy2i")] == [f"Fairy2i-W{t}, calibrated" for t in (1, 2, 3, 4)]
    assert any(name == "Fairy2i-W2, round-to-nearest" for name, _, _ in demo.ROWS)


def test_plot_without_per_layer_errors_writes_nothing(tmp_path):
    result = _fake_result()
    for r in result["rows"]:
        r["per_layer_rel_fro"] = {}
    assert plot(result, tmp_path / "demo.png") is False
    assert not (tmp_path / "demo.png").exists()


@pytest.mark.parametrize("method,stages", [("phase", 2), ("ternary", 1)])
def test_calibrated_rows_come_back_from_the_cache_identical(tmp_path, monkeypatch, method, stages):
    from fairy2i_compile import demo

    from helpers import tiny_llama

    monkeypatch.setenv("FAIRY2I_CACHE", str(tmp_path))
    model = tiny_llama(seed=0, layers=1)
    cal = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    first, info = demo.calibrated_model(model, None, {"method": method, "stages": stages}, cal, progress=False)
    assert "cached" not in info
    second, info = demo.calibrated_model(model, None, {"method": method, "stages": stages}, cal, progress=False)
    assert "cached" in info
    x = cal[:1, :16]
    with torch.no_grad():
        torch.testing.assert_close(second(x).logits, first(x).logits, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the user's model stays tied and float
    # a cache file that does not fit the model is rebuilt, never trusted
    path = Path(info["cached"])
    if method != "phase":
        from safetensors.torch import save_file

        save_file({"lm_head": torch.zeros(3, 3)}, str(path))
        third, info = demo.calibrated_model(model, None, {"method": method, "stages": stages}, cal, progress=False)
        assert "cached" not in info
        with torch.no_grad():
            torch.testing.assert_close(third(x).logits, first(x).logits, rtol=1e-5, atol=1e-5)
