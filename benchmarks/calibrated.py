"""Calibrated conversion vs round-to-nearest vs the peers, SmolLM2-135M, one process.

    .venv/bin/python benchmarks/calibrated.py                      # every configuration below
    .venv/bin/python benchmarks/calibrated.py --configs fp cal-w2 hqq-4 --tasks arc_easy piqa --limit 500

Every row converts ALL linear layers, lm_head included (its weight is the tied token
embedding: the head gets its own quantized copy, the embedding stays float), and is
measured on the same evaluation text:

* perplexity on the first ``--windows`` windows of ``--seq-len`` tokens of the enwiki
  sample (``peers.eval_windows``: what the tokenizer prepends, nothing for SmolLM2);
* optional zero-shot accuracy on the first ``--limit`` records of each ``--tasks``;
* calibration text: ``--calib-samples`` windows of ``--calib-seq-len`` tokens from the END
  of the same sample (``calibration.calibration_windows``), never overlapping the
  evaluation windows (it raises if it would).

Bits per weight include the scales (float32 for ours, fp16 scale + zero for HQQ) and are
averaged over every quantized linear weight.

Configurations (``--configs``; names say what they are):

    fp                      the float model
    rtn-w{T}                Fairy2i PhaseQuant, T stages, round-to-nearest (today's PTQ)
    cal-w{T}[-row|-g{G}]    calibrated (block by block, true-sequential, activation order: the defaults of
                            `calibrate`), per-tensor scales unless named; suffixes combine:
      -par                  from the float model's activations instead of block by block (ablation)
      -noact / -nts         without activation order / without true-sequential groups (ablations)
      -refit                least-squares scale refit after rounding
      -nosearch             stage-1 scales by the paper's rule, no per-layer search (ablation)
      -noout                no outlier-column correction (``max_outliers=0``; ablation)
      -rot                  rotate the residual stream and value heads first (``calibrate(rotate=True)``:
                            random Hadamard matrices folded into the weights, same float function)
      -c{N}                 N calibration windows instead of ``--calib-samples`` (same length, also the last
                            windows of the sample: more windows are a superset of fewer)
      -rep{N}               per-block repair, N steps per block (``repair_steps=N``)
      -dist{N}              then N steps of end-to-end distillation to the float model
                            (``calibration.distill``; ``--distill-windows`` windows of ``--calib-seq-len``
                            tokens from the end of the sample, the last eighth held out; ``--distill-lr``,
                            ``--distill-batch`` windows per step)
      -bf16                 the distillation's forwards under bf16 autocast (``distill(autocast="bfloat16")``)
      -more{N}              (last; with --from-saved DIR) N further distillation steps on the model saved in DIR
                            under the name without it (e.g. cal-w3-row-rot-c64-dist150-more100; chains: ...-more100-more50
                            continues the saved ...-more100; when DIR already holds this row's own model, that
                            is evaluated instead, as with any row): the same
                            training windows, a fresh warmup and cosine from --distill-lr, data order seed =
                            the number of -more in the name (the first run's was seed 0), the KL measured on the last quarter of the held-out
                            eighth (32 of 128 windows for 1024)
      -gen{N}               N more distillation windows that the float model writes itself
                            (``training.generated.generate_windows``: first token drawn from the training
                            text, 3 greedy tokens, then sampling; cached); the held-out eighth stays real text
    cal-binary-t{T}, cal-ternary-t{T}   the real baselines through the same calibration
    rtn-binary-t{T}, rtn-ternary-t{T}   and without it
    hqq-{b}                 HQQ b-bit, groups of 64 (``peers.hqq_dequantized``; ``make setup-peers``)
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from fairy2i_compile import eval as ev  # noqa: E402
from fairy2i_compile.quantization import quant  # noqa: E402
from fairy2i_compile.quantization.calibration import calibrate, calibration_windows, rtn_round  # noqa: E402
from fairy2i_compile.quantization.calibration.rounding import MAX_OUTLIERS  # noqa: E402
from fairy2i_compile.checkpoints.models import load_smollm2  # noqa: E402
from fairy2i_compile.quantization.packed_model import PackedLinear, outlier_nbytes  # noqa: E402
from peers import eval_windows, hqq_available, hqq_dequantized  # noqa: E402
from results_io import cpu_description, write_results  # noqa: E402

DEFAULT_CONFIGS = ["fp", "rtn-w2", "cal-w1", "cal-w2", "cal-w3", "cal-w4", "cal-w2-g64", "cal-w4-g64",
                   "cal-binary-t2", "cal-ternary-t1", "hqq-2", "hqq-3", "hqq-4"]
_CAL = re.compile(r"^(rtn|cal)-(w|binary-t|ternary-t)(\d)((?:-(?:row|g\d+|par|noact|nts|refit|nosearch|noout|rep\d+|dist\d+|gen\d+|bf16|rot|c\d+|more\d+))*)$")


def parse_config(name: str) -> Dict[str, Any]:
    """'cal-w2-g64' -> {kind: cal, method: phase, stages: 2, granularity: 64, sequential: True, act_order: False}."""
    if name == "fp":
        return {"kind": "fp"}
    m = re.fullmatch(r"hqq-(\d)", name)
    if m:
        return {"kind": "hqq", "nbits": int(m.group(1)), "group_size": 64}
    m = _CAL.match(name)
    if not m:
        raise SystemExit(f"unknown configuration {name!r}; see the module docstring for the names")
    kind, meth, stages, opts = m.groups()
    opts = [o for o in opts.split("-") if o]
    gran: Any = "tensor"
    for o in opts:
        if o == "row":
            gran = "row"
        elif re.fullmatch(r"g\d+", o):
            gran = int(o[1:])
    return {"kind": kind, "method": {"w": "phase", "binary-t": "binary", "ternary-t": "ternary"}[meth],
            "stages": int(stages), "granularity": gran, "sequential": "par" not in opts,
            "act_order": "noact" not in opts, "true_sequential": "nts" not in opts, "refit_scales": "refit" in opts,
            "scale_search": "nosearch" not in opts, "outliers": "noout" not in opts and "refit" not in opts,
            "repair_steps": next((int(o[3:]) for o in opts if o.startswith("rep")), 0),
            "distill_steps": next((int(o[4:]) for o in opts if o.startswith("dist")), 0),
            "distill_autocast": "bfloat16" if "bf16" in opts else None,
            "distill_generated": next((int(o[3:]) for o in opts if o.startswith("gen")), 0),
            "rotate": "rot" in opts,
            "more_steps": next((int(o[4:]) for o in reversed(opts) if o.startswith("more")), 0),  # the last
            "calib_samples": next((int(o[1:]) for o in opts if re.fullmatch(r"c\d+", o)), None)}


def _untie_all(model: nn.Module) -> None:
    """Give every linear its own weight (lm_head ~ embedding) so quantizing it leaves the embedding float."""
    emb = model.get_input_embeddings().weight
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod.weight is emb:
            mod.weight = nn.Parameter(emb.detach().clone(), requires_grad=False)


def _bits(model_before: nn.Module, method: str, stages: int, gran: Any) -> float:
    """Bits per quantized real weight, scales included, over every linear layer."""
    total_bits = weights = 0
    for mod in model_before.modules():
        if isinstance(mod, nn.Linear):
            out_f, in_f = mod.weight.shape
            total_bits += 8 * quant.storage_bytes(method, stages, out_f, in_f, gran)
            weights += out_f * in_f
    return total_bits / weights


def _outlier_bits(columns: Dict[str, tuple], weights: int) -> float:
    """Bits per quantized weight the outlier corrections add (``packed_model.outlier_nbytes``);
    ``columns``: {layer: (k, out_features)}."""
    return sum(8 * outlier_nbytes(k, out_f) for k, out_f in columns.values()) / weights


def load_saved(path: Path, name: str, settings: Dict[str, Any]) -> tuple:
    """(packed model, its row info) from a ``--save-models`` file of configuration ``name``."""
    from fairy2i_compile.checkpoints.checkpoint import load_packed, packed_state_info

    if not path.is_file():
        raise SystemExit(f"--from-saved: {path} does not exist; run with --save-models first")
    row = packed_state_info(path)["extra"].get("benchmark_row")
    if not isinstance(row, dict) or row.get("name") != name:
        raise SystemExit(f"--from-saved: {path} holds no benchmark row for {name!r} (got {row and row.get('name')!r})")
    saved = row.get("settings")
    if saved is not None and any(saved.get(k) != settings.get(k) for k in ("calib_samples", "calib_seq_len", "eval_end")):
        raise SystemExit(f"--from-saved: {path} was made with other calibration settings ({saved}); use the same")
    return load_packed(path), {**row, "loaded_from": str(path)}


def row_source(name: str, from_saved: Optional[str]) -> str:
    """How ``main`` gets the model of configuration ``name``: "saved" (with ``--from-saved DIR``: the
    row's own model there, evaluated as it is and never trained again, so a ``-more`` row's zero-shot
    can be added later; ``load_saved`` refuses a missing file), "more" (a ``-more{N}`` row whose own
    model is not in DIR yet: N steps on the saved row it continues) or "build"."""
    more = parse_config(name).get("more_steps")
    if more and not from_saved:
        raise SystemExit(f"{name}: -more{{N}} needs --from-saved DIR holding the row it continues")
    if not from_saved:
        return "build"
    return "more" if more and not (Path(from_saved) / f"{name}.safetensors").is_file() else "saved"


def distill_more(name: str, from_saved: Path, settings: Dict[str, Any], train: torch.Tensor, lr: float,
                 batch: int, checkpoints: Optional[Path], progress: bool) -> tuple:
    """(model, row info) for a ``-more{N}`` row: the saved model of the name without it, N more steps."""
    from fairy2i_compile.quantization.calibration import distill, split_holdout

    last = re.search(r"-more(\d+)$", name)
    if last is None:
        raise SystemExit(f"{name}: -more{{N}} goes last (it continues the row named without it)")
    base, steps = name[:last.start()], parse_config(name)["more_steps"]  # a chain continues the row before it
    if not parse_config(base).get("distill_steps"):
        raise SystemExit(f"{name}: -more{{N}} continues a distilled row (-dist{{N}}); {base!r} is not one")
    model, info = load_saved(from_saved / f"{base}.safetensors", base, settings)
    teacher, _ = load_smollm2(progress=False)
    windows, holdout = split_holdout(train)
    holdout = holdout[-max(1, holdout.shape[0] // 4):]
    t0 = time.perf_counter()
    ckpt = None if checkpoints is None else Path(checkpoints) / f"{name}.pt"
    d = distill(model, teacher.eval(), windows, steps=steps, lr=lr, batch_size=batch, progress=progress,
                holdout=holdout, seed=name.count("-more"), checkpoint_path=ckpt)  # each link its own data order
    times = d.history["time_s"]
    earlier = info.get("distill_more") or []
    earlier = [earlier] if isinstance(earlier, dict) else list(earlier)  # rows saved before chains kept a list
    info = {**info, "name": name, "more_steps": steps, "build_s": round(info.get("build_s", 0) + time.perf_counter() - t0, 1),
            "distill_more": earlier + [{**d.summary(), "loss": d.history["loss"], "step_s": [round(x, 2) for x in times],
                                                "s_per_step": sum(times) / max(1, len(times)),
                                                "median_s_per_step": statistics.median(times) if times else None}]}
    info.pop("saved", None)
    return d.model, info


def _weights(model: nn.Module) -> int:
    return sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, nn.Linear))


@torch.no_grad()
def build(name: str, cal_windows: torch.Tensor, distill_windows: Optional[torch.Tensor] = None,
          distill_lr: float = 1e-3, distill_batch: int = 1, distill_checkpoints: Optional[Path] = None,
          distill_progress: bool = False, first_tokens: Optional[torch.Tensor] = None) -> tuple:
    """(model ready to evaluate, row info) for one configuration."""
    cfg = parse_config(name)
    if cfg.get("distill_steps") and (cfg["kind"] != "cal" or cfg["method"] != "phase"):
        raise SystemExit(f"{name}: -dist applies to calibrated Fairy2i rows (cal-w...)")
    if cfg.get("distill_autocast") and not cfg.get("distill_steps"):
        raise SystemExit(f"{name}: -bf16 sets the distillation's autocast; add -dist{{N}}")
    if cfg.get("distill_generated") and not cfg.get("distill_steps"):
        raise SystemExit(f"{name}: -gen{{N}} adds distillation text; add -dist{{N}}")
    model, _ = load_smollm2(progress=False)
    teacher = model if cfg.get("distill_steps") else None  # calibration never changes the float model
    info: Dict[str, Any] = {"name": name, **{k: v for k, v in cfg.items() if k != "kind"}, "kind": cfg["kind"]}
    t0 = time.perf_counter()
    if cfg["kind"] == "fp":
        info["bits_per_weight"] = 32.0
    elif cfg["kind"] == "hqq":
        out = hqq_dequantized(model, cfg["nbits"], cfg["group_size"])
        info.update(bits_per_weight=out["bits_per_weight"], hqq_version=out["hqq_version"], rel_err=out["rel_err"])
    elif cfg["kind"] == "rtn":
        info["bits_per_weight"] = _bits(model, cfg["method"], cfg["stages"], cfg["granularity"])
        if cfg["rotate"]:
            from fairy2i_compile.quantization.calibration.rotation import rotate_decoder

            info["rotation"] = rotate_decoder(model).summary()
        _untie_all(model)
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                a = mod.weight
                mod.weight = nn.Parameter(rtn_round(a, cfg["stages"], cfg["granularity"], method=cfg["method"])
                                          .to(a.dtype), requires_grad=False)
    elif (cfg["method"] == "phase" and cfg["granularity"] == "tensor" and cfg["sequential"] and cfg["act_order"]
          and cfg["true_sequential"] and not cfg["refit_scales"] and cfg["scale_search"] and cfg["outliers"]
          and not cfg["repair_steps"] and not cfg["rotate"]
          and cal_windows.shape == (16, 512)):
        # exactly the demo's calibrated rows: calibrate through the demo's cache, so `make demo` reuses them
        from fairy2i_compile.demo import calibrated_model

        info["bits_per_weight"] = _bits(model, cfg["method"], cfg["stages"], cfg["granularity"])
        packed, extra = calibrated_model(model, None, {"method": "phase", "stages": cfg["stages"]}, cal_windows,
                                         progress=False)
        info.update({k: v for k, v in extra.items() if k not in ("bits_per_weight", "per_layer_output_error")})
        if "per_layer_output_error" in extra:
            info["layers"] = extra["per_layer_output_error"]
        cols = {n: (m.outliers, m.out_features) for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
        info["outlier_columns"] = sum(k for k, _ in cols.values())
        info["bits_per_weight"] += _outlier_bits(cols, _weights(model))
        del model
        model = packed
    else:
        info["bits_per_weight"] = _bits(model, cfg["method"], cfg["stages"], cfg["granularity"])
        res = calibrate(model, cal_windows, stages=cfg["stages"], scale_granularity=cfg["granularity"],
                        method=cfg["method"], sequential=cfg["sequential"], act_order=cfg["act_order"],
                        true_sequential=cfg["true_sequential"], refit_scales=cfg["refit_scales"],
                        scale_search=cfg["scale_search"], max_outliers=MAX_OUTLIERS if cfg["outliers"] else 0,
                        repair_steps=cfg["repair_steps"], rotate=cfg["rotate"],
                        pack=bool(cfg["distill_steps"]), progress=False, min_tokens=1)
        s = res.summary()
        info["bits_per_weight"] += _outlier_bits({n: (lc.outliers, lc.shape[0]) for n, lc in res.layers.items()},
                                                 _weights(model))
        info.update(calibration_s=round(res.seconds, 1), mean_rtn_output_error=s["mean_rtn_error"],
                    mean_calibrated_output_error=s["mean_calibrated_error"],
                    outlier_columns=s["outlier_columns"], repair=res.repair,
                    rotation=res.settings.get("rotation"),
                    layers={n: [lc.rtn_error, lc.calibrated_error] for n, lc in res.layers.items()})
        del model
        model = res.model
    if cfg.get("distill_steps"):
        from fairy2i_compile.quantization.calibration import distill

        ckpt = None if distill_checkpoints is None else Path(distill_checkpoints) / f"{name}.pt"
        holdout, gen_s = None, None
        if cfg["distill_generated"]:
            from fairy2i_compile.quantization.calibration import split_holdout
            from fairy2i_compile.training.generated import generate_windows, mix_windows

            distill_windows, holdout = split_holdout(distill_windows)  # held out: real text
            t_gen = time.perf_counter()
            made = generate_windows(teacher, cfg["distill_generated"], distill_windows.shape[1],
                                    first_tokens=first_tokens, batch_size=16, progress=distill_progress)
            gen_s = round(time.perf_counter() - t_gen, 1)
            distill_windows = mix_windows(distill_windows, made)
        d = distill(model, teacher.eval(), distill_windows, steps=cfg["distill_steps"], lr=distill_lr,
                    batch_size=distill_batch, progress=distill_progress, autocast=cfg["distill_autocast"],
                    checkpoint_path=ckpt, holdout=holdout)
        times = d.history["time_s"]  # per step, so a slow stretch of a long run shows where it was
        info["distill"] = {**d.summary(), "loss": d.history["loss"], "step_s": [round(x, 2) for x in times],
                           "s_per_step": sum(times) / max(1, len(times)),
                           "median_s_per_step": statistics.median(times) if times else None,
                           "generated_windows": cfg["distill_generated"], "generation_s": gen_s}
        model = d.model
        del teacher
    info["build_s"] = round(time.perf_counter() - t0, 1)
    return model, info


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x:.4g}" if x < 1e4 else f"{x:.3g}"


def machine() -> str:
    """'x86_64 AMD EPYC (family 23 model 1, AVX2), 2 threads': the CPU model too, since this project's
    VMs change between runs."""
    return f"{cpu_description()}, {torch.get_num_threads()} threads"


def merge_parts(parts: list, files: list) -> Dict[str, Any]:
    """One payload from earlier runs' payloads (same settings, checked by the caller), rows in order.

    Each row keeps the machine it ran on; the payload's machine lists them all, and its parts name
    every file the rows came from (a part that was itself merged contributes its own parts).

    A later row named like an earlier one must be a re-evaluation of that row's saved model
    (``--from-saved``, e.g. to add its zero-shot accuracy): its perplexity must equal the earlier
    one (relative 1e-3: thread counts reorder float sums) and it updates the earlier row in place.
    Any other repeated name is refused, so that no measurement is silently overwritten."""
    rows, sources, machines = [], [], []
    at: Dict[str, int] = {}
    for part, f in zip(parts, files):
        for r in part["rows"]:
            r = {**r, "machine": r.get("machine", part["machine"])}
            if r["name"] not in at:
                at[r["name"]] = len(rows)
                rows.append(r)
                continue
            old = rows[at[r["name"]]]
            if "loaded_from" not in r:
                raise SystemExit(f"--merge: {f} has a second row named {r['name']!r} that was measured anew; "
                                 "rename one of them (e.g. with a ' (run 2)' suffix) or re-evaluate the saved "
                                 "model with --from-saved")
            if abs(r["ppl"] - old["ppl"]) > 1e-3 * old["ppl"]:
                raise SystemExit(f"--merge: {f} re-evaluated {r['name']!r} (from {r['loaded_from']}) at ppl "
                                 f"{r['ppl']:.6g}, but the earlier row has {old['ppl']:.6g}: not the same model")
            rows[at[r["name"]]] = {**old, **{k: v for k, v in r.items() if v not in ({}, None)}}
        sources += part.get("parts") or [str(f)]
    for r in rows:
        if r["machine"] not in machines:
            machines.append(r["machine"])
    return {**parts[0], "rows": rows, "parts": sources, "machine": "; ".join(machines)}


def markdown(payload: Dict[str, Any]) -> str:
    s = payload["settings"]
    fp = next((r["ppl"] for r in payload["rows"] if r["name"] == "fp"), None)
    tasks = s["tasks"]
    head = "| configuration | bits/weight (scales incl.) | wiki ppl | × FP |" + "".join(f" {t} acc_norm |" for t in tasks)
    lines = [
        f"# Calibrated conversion, SmolLM2-135M ({payload['machine']}, torch {payload['torch']})", "",
        f"Perplexity: first {s['windows']} windows of {s['seq_len']} tokens of the enwiki sample "
        f"(prepended: {s['prepended']}). Calibration: {s['calib_samples']} × {s['calib_seq_len']} tokens from the "
        f"end of the same sample (token {s['calib_start']} on; evaluation text ends at {s['eval_end']}). All linear "
        f"layers incl. lm_head quantized; embedding float. Rows named -c{{N}}: N such windows instead."
        + (f" Zero-shot: first {s['limit']} records per task." if tasks else ""), "",
        head, "|---|---|---|---|" + "---|" * len(tasks)]
    for r in payload["rows"]:
        ratio = r["ppl"] / fp if fp else None
        accs = "".join(f" {r['tasks'][t]['acc_norm']:.3f} |" if t in r.get("tasks", {}) else " – |" for t in tasks)
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {_fmt(r['ppl'])} | {_fmt(ratio)} |{accs}")
    lines += ["", "Mean H-weighted relative output error over the layers, tr(E H Eᵀ)/tr(A H Aᵀ) with each layer's "
              "own calibration H (round-to-nearest -> calibrated):", ""]
    for r in payload["rows"]:
        if r.get("mean_rtn_output_error") is not None:
            extra = f", {r['outlier_columns']} outlier columns" if r.get("outlier_columns") is not None else ""
            if r.get("repair"):
                before = sum(b["loss_before"] for b in r["repair"]) / len(r["repair"])
                after = sum(b["loss_after"] for b in r["repair"]) / len(r["repair"])
                extra += f", repair: mean block loss {before:.4f} -> {after:.4f}"
            lines.append(f"- {r['name']}: {r['mean_rtn_output_error']:.4f} -> {r['mean_calibrated_output_error']:.4f} "
                         f"(calibration {r.get('calibration_s', '?')} s{extra})")
    distilled = [r for r in payload["rows"] if r.get("distill")]
    if distilled:
        lines += ["", "Distillation after calibration (held-out KL to the float model per token, final codes; "
                  "times on the shared machine):", ""]
    for r in distilled:
        d = r["distill"]
        lines.append(f"- {r['name']}: {d['steps']} steps of {d['train_tokens_per_step']} tokens, lr {d['lr']:g}, "
                     f"{d['train_windows']} training / {d['holdout_windows']} held-out windows, "
                     f"{d['s_per_step']:.1f} s/step" + (f" (median {d['median_s_per_step']:.1f})"
                                                        if d.get("median_s_per_step") else "") + (f" ({d['autocast']} autocast)" if d.get("autocast") else "")
                     + f"; KL {d['holdout_kl_before']:.3f} -> {d['holdout_kl_after']:.3f}"
                     + ("" if d["kept"] else " (not kept)"))
        more = r.get("distill_more") or []
        for m in [more] if isinstance(more, dict) else more:
            lines.append(f"  - then {m['steps']} more steps (lr {m['lr']:g}, seed {m['seed']}, {m['s_per_step']:.1f} s/step); "
                         f"KL on {m['holdout_windows']} held-out windows {m['holdout_kl_before']:.3f} -> "
                         f"{m['holdout_kl_after']:.3f}" + ("" if m["kept"] else " (not kept)"))
    return "\n".join(lines) + "\n"


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--save-models", default=None, metavar="DIR",
                   help="also write each packed model as DIR/<configuration>.safetensors (save_packed; "
                        "e.g. for a later zero-shot run with `fairy2i eval`)")
    p.add_argument("--from-saved", default=None, metavar="DIR",
                   help="evaluate DIR/<configuration>.safetensors (written by an earlier --save-models run of the "
                        "same settings) instead of building it again (a -more row that is not saved yet: "
                        "trained on from the row it continues); the row keeps how it was built")
    p.add_argument("--distill-windows", type=int, default=256)
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--distill-batch", type=int, default=1, help="windows per distillation step")
    p.add_argument("--distill-checkpoints", default=None, metavar="DIR",
                   help="train_qat checkpoints of each -dist row as DIR/<configuration>.pt: a killed run resumes "
                        "from its last checkpoint when started again with the same arguments")
    p.add_argument("--distill-progress", action="store_true", help="a progress bar for each distillation (stderr)")
    p.add_argument("--tasks", nargs="*", default=[])
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--zero-shot-configs", nargs="*", default=None,
                   help="configurations that also get zero-shot (default: all when --tasks is given)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "calibrated"))
    p.add_argument("--merge", nargs="+", default=None, metavar="PART.json",
                   help="write --out from the rows of earlier runs' JSON files (same settings), in the given order")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        keys = ("windows", "seq_len", "calib_samples", "calib_seq_len", "eval_end", "calib_start")  # distill: per row
        for part in parts[1:]:
            if any(part["settings"][k] != parts[0]["settings"][k] for k in keys):
                raise SystemExit(f"--merge: the parts were measured with different settings ({keys})")
        merged = merge_parts(parts, args.merge)
        write_results(args.out, merged, markdown(merged))
        return 0
    for name in args.configs:
        cfg = parse_config(name)
        if cfg["kind"] == "hqq" and not hqq_available():
            raise SystemExit(f"{name} needs hqq: make setup-peers")

    _, tokenizer = load_smollm2(progress=False)
    windows = eval_windows(tokenizer, args.seq_len, args.windows)
    eval_end = int(windows.numel())
    text = ev.wiki_tokens(tokenizer)  # tokenizes the whole sample: once
    cal = calibration_windows(text, args.calib_samples, args.calib_seq_len, avoid=eval_end)
    train = calibration_windows(text, args.distill_windows, args.calib_seq_len, avoid=eval_end)
    payload: Dict[str, Any] = {
        "machine": machine(),
        "torch": torch.__version__,
        "settings": {"windows": args.windows, "seq_len": args.seq_len, "calib_samples": args.calib_samples,
                     "calib_seq_len": args.calib_seq_len, "eval_end": eval_end,
                     "calib_start": int(text.numel() - cal.numel()),
                     "prepended": ev.prefix_text(tokenizer, ev.special_prefix(tokenizer)),
                     "tasks": args.tasks, "limit": args.limit},
        "rows": [],
    }
    zs = set(args.configs if args.zero_shot_configs is None else args.zero_shot_configs)
    examples = {t: ev.load_task(t, limit=args.limit) for t in args.tasks}
    for name in args.configs:
        cfg = parse_config(name)
        n_cal = cfg.get("calib_samples")
        row_cal = cal if n_cal is None else calibration_windows(text, n_cal, args.calib_seq_len, avoid=eval_end)
        source = row_source(name, args.from_saved)
        if source == "saved":
            model, info = load_saved(Path(args.from_saved) / f"{name}.safetensors", name, payload["settings"])
        elif source == "more":
            model, info = distill_more(name, Path(args.from_saved), payload["settings"], train, args.distill_lr,
                                       args.distill_batch, args.distill_checkpoints, args.distill_progress)
        else:
            model, info = build(name, row_cal, train, args.distill_lr, args.distill_batch, args.distill_checkpoints,
                                args.distill_progress, first_tokens=text[eval_end:])
        t = time.perf_counter()
        info["ppl"] = ev.perplexity(model, windows, progress=False)["ppl"]
        info["tasks"] = {}
        if args.save_models and any(isinstance(m, PackedLinear) for m in model.modules()):
            # before the zero-shot, so that a long evaluation cut short never costs the model
            from fairy2i_compile.checkpoints.checkpoint import save_packed

            Path(args.save_models).mkdir(parents=True, exist_ok=True)
            info["saved"] = str(Path(args.save_models) / f"{name}.safetensors")
            save_packed(model, info["saved"], extra={"benchmark_row": {
                **{k: v for k, v in info.items() if k not in ("layers", "tasks")}, "settings": payload["settings"]}})
            print(f"{name}: ppl {info['ppl']:.4g}, model saved to {info['saved']}", flush=True)
        if name in zs:
            for task, exs in examples.items():
                r = ev.score_multiple_choice(model, tokenizer, exs, progress=False)
                info["tasks"][task] = {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"]}
        info["eval_s"] = round(time.perf_counter() - t, 1)
        print(f"{name}: bits {info['bits_per_weight']:.3f} ppl {info['ppl']:.4g} {info['tasks']} "
              f"(build {info['build_s']} s, eval {info['eval_s']} s)", flush=True)
        payload["rows"].append(info)
        write_results(args.out, payload, markdown(payload))  # after every row: a long run keeps what it has
        del model
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
