"""benchmarks/calibrated.py's configuration names, results table and saved rows (tiny models only)."""

import importlib.util
import re
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
    gen = bench.parse_config("cal-w2-g64-dist600-gen256-bf16")
    assert (gen["granularity"], gen["distill_steps"], gen["distill_generated"]) == (64, 600, 256)
    assert cfg["distill_generated"] == 0 and cfg["rotate"] is False
    rot = bench.parse_config("cal-w2-rot-dist600-bf16")
    assert rot["rotate"] is True and rot["distill_steps"] == 600 and bench.parse_config("rtn-w4-rot")["rotate"]
    assert rot["calib_samples"] is None and bench.parse_config("cal-w4-row-rot-c64")["calib_samples"] == 64
    with pytest.raises(SystemExit, match="unknown configuration"):
        bench.parse_config("cal-w2-distill")
    with pytest.raises(SystemExit, match="unknown configuration"):
        bench.parse_config("cal-w2-cx")


def test_distillation_is_for_calibrated_fairy2i_rows_only(bench):
    with pytest.raises(SystemExit, match="-dist applies to calibrated Fairy2i rows"):
        bench.build("cal-binary-t2-dist5", None)
    with pytest.raises(SystemExit, match="-bf16 sets the distillation's autocast; add -dist"):
        bench.build("cal-w2-bf16", None)
    with pytest.raises(SystemExit, match=r"-gen\{N\} adds distillation text; add -dist"):
        bench.build("cal-w2-gen64", None)


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


def test_the_table_lists_every_link_of_a_continued_chain(bench):
    settings = {"windows": 8, "seq_len": 2048, "prepended": None, "calib_samples": 16, "calib_seq_len": 512,
                "calib_start": 1, "eval_end": 16384, "tasks": [], "limit": 500}
    distill = {"steps": 150, "train_tokens_per_step": 1024, "lr": 1e-3, "train_windows": 896, "holdout_windows": 128,
               "s_per_step": 31.0, "holdout_kl_before": 0.569, "holdout_kl_after": 0.492, "kept": True}
    link = {"steps": 100, "lr": 5e-4, "seed": 1, "s_per_step": 24.4, "holdout_windows": 32,
            "holdout_kl_before": 0.472, "holdout_kl_after": 0.443, "kept": True}
    second = {**link, "steps": 150, "lr": 3e-4, "seed": 2, "holdout_kl_before": 0.443, "holdout_kl_after": 0.43,
              "kept": False}
    old = {"name": "cal-w3-dist150-more100", "bits_per_weight": 3.29, "ppl": 32.18, "distill": distill,
           "distill_more": link}  # rows written before chains stored one dict
    new = {"name": "cal-w3-dist150-more100-more150", "bits_per_weight": 3.29, "ppl": 31.5, "distill": distill,
           "distill_more": [link, second]}
    text = bench.markdown({"machine": "x86_64, 2 threads", "torch": "2.13.0", "settings": settings, "rows": [old, new]})
    assert text.count("  - then 100 more steps (lr 0.0005, seed 1, 24.4 s/step); KL on 32 held-out windows "
                      "0.472 -> 0.443") == 2
    assert "  - then 150 more steps (lr 0.0003, seed 2, 24.4 s/step); KL on 32 held-out windows 0.443 -> 0.430 " \
           "(not kept)" in text


def test_saved_rows_load_with_how_they_were_built_and_mismatches_are_named(bench, tmp_path):
    from fairy2i_compile import pack_model, save_packed

    from helpers import tiny_llama

    model = tiny_llama(seed=0, layers=1)
    pack_model(model, stages=2)
    settings = {"calib_samples": 16, "calib_seq_len": 512, "eval_end": 16384}
    row = {"name": "cal-w2-dist5", "bits_per_weight": 2.05, "distill": {"steps": 5}, "settings": settings}
    save_packed(model, tmp_path / "cal-w2-dist5.safetensors", extra={"benchmark_row": row})
    loaded, info = bench.load_saved(tmp_path / "cal-w2-dist5.safetensors", "cal-w2-dist5", settings)
    assert info["distill"] == {"steps": 5} and info["loaded_from"].endswith("cal-w2-dist5.safetensors")
    assert sum(1 for _ in loaded.modules()) == sum(1 for _ in model.modules())
    with pytest.raises(SystemExit, match="does not exist; run with --save-models first"):
        bench.load_saved(tmp_path / "nope.safetensors", "nope", settings)
    with pytest.raises(SystemExit, match="holds no benchmark row for 'cal-w4'"):
        bench.load_saved(tmp_path / "cal-w2-dist5.safetensors", "cal-w4", settings)
    with pytest.raises(SystemExit, match="other calibration settings"):
        bench.load_saved(tmp_path / "cal-w2-dist5.safetensors", "cal-w2-dist5", {**settings, "eval_end": 1})


def test_merged_results_keep_each_rows_machine_and_every_source(bench, tmp_path):
    settings = {"windows": 8, "seq_len": 2048, "calib_samples": 16, "calib_seq_len": 512, "eval_end": 16384,
                "calib_start": 613693, "prepended": None, "tasks": [], "limit": 500}
    base = {"machine": "x86_64 Xeon, 1 threads", "torch": "2.13.0+cpu", "settings": settings,
            "parts": ["old_base.json", "p1.json"],
            "rows": [{"name": "fp", "ppl": 21.25, "bits_per_weight": 32.0},
                     {"name": "cal-w4", "ppl": 35.4, "bits_per_weight": 4.04, "machine": "x86_64 EPYC, 1 threads"}]}
    new = {"machine": "x86_64 EPYC, 2 threads", "torch": "2.13.0+cpu", "settings": settings,
           "rows": [{"name": "cal-w4-row-rot-c128", "ppl": 25.5, "bits_per_weight": 4.39}]}
    merged = bench.merge_parts([base, new], ["calibrated.json", "w4c128.json"])
    assert [r["name"] for r in merged["rows"]] == ["fp", "cal-w4", "cal-w4-row-rot-c128"]
    assert [r["machine"] for r in merged["rows"]] == ["x86_64 Xeon, 1 threads", "x86_64 EPYC, 1 threads",
                                                     "x86_64 EPYC, 2 threads"]
    assert merged["machine"] == "x86_64 Xeon, 1 threads; x86_64 EPYC, 1 threads; x86_64 EPYC, 2 threads"
    assert merged["parts"] == ["old_base.json", "p1.json", "w4c128.json"]  # the merged base's own sources
    assert "x86_64 EPYC, 2 threads" in bench.markdown(merged)
    assert bench.machine().endswith(" threads")


def test_merge_updates_a_row_from_its_saved_model_and_refuses_other_repeats(bench):
    settings = {"windows": 8, "seq_len": 2048, "calib_samples": 16, "calib_seq_len": 512, "eval_end": 16384,
                "calib_start": 613693, "prepended": None, "tasks": ["piqa"], "limit": 500}
    base = {"machine": "EPYC, 2 threads", "torch": "2.13.0+cpu", "settings": settings,
            "rows": [{"name": "fp", "ppl": 21.25, "tasks": {}},
                     {"name": "cal-w3-dist5", "ppl": 31.34, "bits_per_weight": 3.29, "build_s": 900.0, "tasks": {}},
                     {"name": "cal-w4", "ppl": 35.4, "tasks": {}}]}
    zs = {"name": "cal-w3-dist5", "ppl": 31.3401, "bits_per_weight": 3.29, "loaded_from": "m/cal-w3-dist5.safetensors",
          "tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.61, "n": 500}}, "eval_s": 2000.0}
    new = {"machine": "EPYC, 1 threads", "torch": "2.13.0+cpu", "settings": settings, "rows": [zs]}
    merged = bench.merge_parts([base, new], ["calibrated.json", "zs.json"])
    assert [r["name"] for r in merged["rows"]] == ["fp", "cal-w3-dist5", "cal-w4"]  # in place, not appended
    row = merged["rows"][1]
    assert row["tasks"]["piqa"]["acc_norm"] == 0.61 and row["build_s"] == 900.0 and row["ppl"] == 31.3401
    assert row["machine"] == "EPYC, 1 threads"
    with pytest.raises(SystemExit, match=r"ppl 40.*earlier row has 31.34: not the same model"):
        bench.merge_parts([base, {**new, "rows": [{**zs, "ppl": 40.0}]}], ["calibrated.json", "zs.json"])
    with pytest.raises(SystemExit, match=r"zs.json has a second row named 'cal-w4' that was measured anew"):
        bench.merge_parts([base, {**new, "rows": [{"name": "cal-w4", "ppl": 35.4}]}], ["calibrated.json", "zs.json"])


def test_a_saved_row_is_evaluated_not_trained_again(bench, tmp_path):
    name = "cal-w3-row-rot-c64-dist150-more100-more150"
    with pytest.raises(SystemExit, match=re.escape("-more{N} needs --from-saved DIR")):
        bench.row_source(name, None)
    assert bench.row_source(name, str(tmp_path)) == "more"  # its own model not saved yet: train on
    (tmp_path / f"{name}.safetensors").write_bytes(b"")
    assert bench.row_source(name, str(tmp_path)) == "saved"  # saved: evaluate it, never distill again
    assert bench.row_source("cal-w4", None) == "build"
    assert bench.row_source("cal-w4", str(tmp_path)) == "saved"  # not there: load_saved's own error names it
    with pytest.raises(SystemExit, match=r"cal-w4.safetensors does not exist; run with --save-models first"):
        bench.load_saved(tmp_path / "cal-w4.safetensors", "cal-w4", {})
