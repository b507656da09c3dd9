"""Quantization error of PhaseQuant (T = 1..4) and the real baselines at equal bits.

Three parts, all through ``fairy2i_compile.quantization.quant``:

1. complex Gaussian U [size, size]: PhaseQuant error for T = 1..4 per granularity
   (sanity figures, DESIGN.md §1.3: 0.603 / 0.361 / 0.242 for T = 1 / 2 / 3);
2. real Gaussian A [size, size]: A -> (U, W) (DESIGN.md §1.1), PhaseQuant on U and
   W, rebuild A_hat, error on A; against real binary / ternary on A itself,
   ordered by bits per real weight (the baseline in the same run);
3. with ``--checkpoint``: the same comparison on every 2-D weight with even dims
   of a safetensors file, aggregated as sqrt(sum err^2 / sum ref^2).

Bits count the codes only; ``scale_bits`` adds float32 scales per real weight.

    .venv/bin/python benchmarks/quant_error.py [--size 1024] [--seed 0]
        [--granularity tensor row 128] [--checkpoint model.safetensors]
        [--out benchmarks/results/quant_error]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from results_io import write_results  # noqa: E402

from fairy2i_compile.compiler.ops import real_to_widely, widely_to_real  # noqa: E402
from fairy2i_compile.quantization.quant import (  # noqa: E402
    bits_per_real_weight,
    phase_quant,
    quant_error,
    real_quant,
    scale_groups,
    validate_granularity,
)

STAGES = (1, 2, 3, 4)
# linear-layer weights of HF Llama / GPT-2 style checkpoints (not embeddings or norms)
LINEAR_WEIGHTS = r"(_proj|c_attn|c_fc|lm_head|dense\w*)\.weight$"
SCALE_BITS = 32  # float32 scales, as quant.storage_bytes and report.json count them


def _parse_granularity(s: str):
    g = int(s) if s.lstrip("-").isdigit() else s
    validate_granularity(g, 1 << 30)
    return g


def phase_on_real(a: torch.Tensor, stages: int, granularity):
    """A [2n, 2m] -> A_hat through U, W PhaseQuant; returns (A_hat, scale_bits per real weight)."""
    u_re, u_im, w_re, w_im = real_to_widely(a)
    qu = phase_quant(u_re, u_im, stages, granularity)
    qw = phase_quant(w_re, w_im, stages, granularity)
    a_hat = widely_to_real(qu.re, qu.im, qw.re, qw.im)
    scales = qu.s_re.numel() + qu.s_im.numel() + qw.s_re.numel() + qw.s_im.numel()
    return a_hat, SCALE_BITS * scales / a.numel()


def real_on_real(a: torch.Tensor, method: str, stages: int, granularity):
    a_hat = real_quant(a, method, stages, granularity)
    # dequant needs one scale per group per stage (binary's mean only picks signs)
    scales = stages * scale_groups(a.shape[0], a.shape[1], granularity)
    return a_hat, SCALE_BITS * scales / a.numel()


def _row(part, method, stages, granularity, err, scale_bits, shape, secs):
    return {
        "part": part,
        "method": method,
        "stages": stages,
        "bits": bits_per_real_weight(method, stages),
        "scale_bits": scale_bits,
        "granularity": granularity,
        "shape": list(shape),
        "rel_fro": err["rel_fro"],
        "sqnr_db": err["sqnr_db"],
        "seconds": secs,
    }


def _real_rows(a: torch.Tensor, granularities, part: str):
    """Phase (via U, W) vs binary vs ternary on one real matrix A, T = 1..4."""
    rows = []
    for g in granularities:
        for method in ("phase", "binary", "ternary"):
            for T in STAGES:
                t0 = time.perf_counter()
                if method == "phase":
                    a_hat, sb = phase_on_real(a, T, g)
                else:
                    a_hat, sb = real_on_real(a, method, T, g)
                secs = time.perf_counter() - t0
                rows.append(_row(part, method, T, g, quant_error(a, a_hat), sb, a.shape, secs))
    return rows


def gaussian_complex(size: int, seed: int, granularities):
    gen = torch.Generator().manual_seed(seed)
    re = torch.randn(size, size, generator=gen)
    im = torch.randn(size, size, generator=gen)
    rows = []
    for g in granularities:
        for T in STAGES:
            t0 = time.perf_counter()
            q = phase_quant(re, im, T, g)
            secs = time.perf_counter() - t0
            err = quant_error(torch.stack([re, im]), torch.stack([q.re, q.im]))
            sb = SCALE_BITS * (q.s_re.numel() + q.s_im.numel()) / (2 * re.numel())
            rows.append(_row("gaussian_complex", "phase", T, g, err, sb, re.shape, secs))
    return rows


def gaussian_real(size: int, seed: int, granularities):
    if size % 2:
        raise ValueError(f"--size must be even for the real A -> (U, W) part, got {size}")
    gen = torch.Generator().manual_seed(seed + 1)
    a = torch.randn(size, size, generator=gen)
    return _real_rows(a, granularities, "gaussian_real")


def checkpoint_rows(path: str, granularities, max_layers: int | None, match: str = LINEAR_WEIGHTS):
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(f"--checkpoint needs the safetensors package ({e})") from e
    per_layer, skipped = [], []
    with safe_open(path, framework="pt") as f:
        names = sorted(f.keys())
        for name in names:
            if max_layers is not None and len({r["name"] for r in per_layer}) >= max_layers:
                break
            if not re.search(match, name):
                continue
            t = f.get_tensor(name)
            if t.dim() != 2 or not t.is_floating_point():
                continue
            if t.shape[0] % 2 or t.shape[1] % 2:
                skipped.append({"name": name, "shape": list(t.shape), "why": "odd dim"})
                continue
            rows = _real_rows(t.float(), granularities, "checkpoint")
            ref_sq = float(t.double().pow(2).sum())
            for r in rows:
                r["name"] = name
                r["ref_sq"] = ref_sq
            per_layer.extend(rows)
    # energy-weighted aggregate per (method, T, granularity)
    agg = {}
    for r in per_layer:
        key = (r["method"], r["stages"], str(r["granularity"]))
        a = agg.setdefault(key, {"ref_sq": 0.0, "err_sq": 0.0, "row": r})
        a["ref_sq"] += r["ref_sq"]
        a["err_sq"] += (r["rel_fro"] ** 2) * r["ref_sq"]
    summary = []
    for (method, T, _), a in agg.items():
        rel = math.sqrt(a["err_sq"] / a["ref_sq"]) if a["ref_sq"] else 0.0
        summary.append({
            "part": "checkpoint",
            "method": method,
            "stages": T,
            "bits": bits_per_real_weight(method, T),
            "scale_bits": None,
            "granularity": a["row"]["granularity"],
            "shape": None,
            "rel_fro": rel,
            "sqnr_db": -20 * math.log10(rel) if rel > 0 else float("inf"),
            "seconds": None,
        })
    return summary, per_layer, skipped


# ----------------------------------------------------------------------------
# output


def _fmt(x, nd=4):
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{nd}f}"
    return str(x)


def table(rows, title: str) -> str:
    cols = ["method", "stages", "bits", "scale_bits", "granularity", "rel_fro", "sqnr_db"]
    rows = sorted(rows, key=lambda r: (str(r["granularity"]), r["bits"], r["method"]))
    out = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join([
            r["method"], str(r["stages"]), _fmt(r["bits"], 2), _fmt(r["scale_bits"], 3),
            str(r["granularity"]), _fmt(r["rel_fro"]), _fmt(r["sqnr_db"], 2),
        ]) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024, help="Gaussian matrices are size x size (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--granularity", nargs="+", default=["tensor", "row", "128"],
                   help="'tensor', 'row' and/or int group sizes (default: tensor row 128)")
    p.add_argument("--checkpoint", default=None, help="safetensors file: also run on its 2-D weights with even dims")
    p.add_argument("--max-layers", type=int, default=None, help="with --checkpoint: stop after this many weights")
    p.add_argument("--match", default=LINEAR_WEIGHTS,
                   help=f"with --checkpoint: regex over tensor names to include (default linear weights: {LINEAR_WEIGHTS})")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quant_error"),
                   help="output path prefix; writes PREFIX.json and PREFIX.md")
    args = p.parse_args(argv)
    if args.size < 2:
        p.error(f"--size must be >= 2, got {args.size}")
    try:
        grans = [_parse_granularity(g) for g in args.granularity]
    except ValueError as e:
        p.error(str(e))

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    parts = {
        "gaussian_complex": gaussian_complex(args.size, args.seed, grans),
        "gaussian_real": gaussian_real(args.size, args.seed, grans),
    }
    per_layer, skipped = [], []
    if args.checkpoint:
        parts["checkpoint"], per_layer, skipped = checkpoint_rows(args.checkpoint, grans, args.max_layers, args.match)
    total = time.perf_counter() - t0

    titles = {
        "gaussian_complex": f"PhaseQuant on i.i.d. complex Gaussian U [{args.size}, {args.size}] "
                            "(paper: 0.603 / 0.361 / 0.242 for T = 1 / 2 / 3)",
        "gaussian_real": f"Real Gaussian A [{args.size}, {args.size}]: phase (via U, W) vs binary vs ternary, "
                         "error on A, ordered by bits per real weight",
        "checkpoint": f"Checkpoint {args.checkpoint}: aggregate over {len({r['name'] for r in per_layer})} "
                      f"weights (sqrt(sum err^2 / sum ref^2)); {len(skipped)} skipped (odd dims)",
    }
    md = [
        "# Quantization error (benchmarks/quant_error.py)",
        "",
        f"torch {torch.__version__}, {platform.machine()}, seed {args.seed}, {total:.1f} s. "
        "bits = code bits per real weight; scale_bits = float32 scale bits per real weight.",
        "",
    ]
    for k, rows in parts.items():
        md += [table(rows, titles[k]), ""]
    text = "\n".join(md)
    print(text)

    payload = {
        "config": {"size": args.size, "seed": args.seed, "granularity": grans,
                   "checkpoint": args.checkpoint, "match": args.match, "command": " ".join(sys.argv), "torch": torch.__version__,
                   "seconds": total},
        "results": parts,
        "checkpoint_per_layer": per_layer,
        "checkpoint_skipped": skipped,
    }
    write_results(args.out, payload, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
