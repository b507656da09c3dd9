"""benchmarks/calibrated.py's configuration names and results table (no model is loaded)."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("calibrated_bench", REPO / "benchmarks" / "calibrated.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_configuration_names_combine_suffixes(bench):
    cfg = bench.parse_config("cal-w2-row-rep50-dist80")
    assert (cfg["kind"], cfg["method"], cfg["stages"], cfg["granularity"]) == ("cal", "phase", 2, "row")
    assert cfg["repair_steps"] == 50 and cfg["distill_steps"] == 80
    assert bench.parse_config("cal-w4")["distill_steps"] == 0
    assert cfg["distill_autocast"] is None and bench.parse_config("cal-w2-dist80-bf16")["distill_autocast"] == "bfloat16"
    with pytest.raises(SystemExit, match="unknown configuration"):
        bench.parse_config("cal-w2-distill")


def test_distillation_is_for_calibrated_fairy2i_rows_only(bench):
    with pytest.raises(SystemExit, match="-dist applies to calibrated Fairy2i rows"):
        bench.build("cal-binary-t2-dist5", None)
    with pytest.raises(SystemExit, match="-bf16 sets the distillation's autocast; add -dist"):
        bench.build("cal-w2-bf16", None)


def test_the_table_lists_each_distillation(bench):
    settings = {"windows": 8, "seq_len": 2048, "prepended": None, "calib_samples": 16, "calib_seq_len": 512,
                "calib_start": 1, "eval_end": 16384, "tasks": [], "limit": 500}
    distill = {"steps": 80, "train_tokens_per_step": 1024, "lr": 1e-3, "train_windows": 224, "holdout_windows": 32,
               "s_per_step": 31.2, "holdout_kl_before": 2.181, "holdout_kl_after": 1.556, "kept": True}
    rows = [{"name": "fp", "bits_per_weight": 32.0, "ppl": 21.25},
            {"name": "cal-w2-dist80", "bits_per_weight": 2.046, "ppl": 131.4, "distill": distill}]
    text = bench.markdown({"machine": "x86_64, 1 threads", "torch": "2.13.0", "settings": settings, "rows": rows})
    assert "| cal-w2-dist80 | 2.046 | 131.4 | 6.184 |" in text
    assert "- cal-w2-dist80: 80 steps of 1024 tokens, lr 0.001, 224 training / 32 held-out windows, 31.2 s/step; " \
           "KL 2.181 -> 1.556" in text
