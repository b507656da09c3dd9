"""Quickstart: a small transformers Llama (random weights, built from a config, no
download) through `torch.compile(backend="fairy2i")` in its three modes.

    make quickstart        # or: .venv/bin/python examples/quickstart.py [--dump-dir DIR]

1. exact: the lossless widely-linear rewrite; compiled output == eager output.
2. ptq:   Fairy2i-W2 (2 residual stages of {+1, +i, -1, -i} codes); per-layer error.
3. qat:   a few AdamW steps through the compiled graph (straight-through estimator).
"""

import argparse
import json
import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fairy2i_compile import Fairy2iBackend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump-dir", default=os.path.join(tempfile.gettempdir(), "fairy2i_quickstart"))
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (2, 32))

    # 1. exact -------------------------------------------------------------------
    exact_dir = os.path.join(args.dump_dir, "exact")
    compiled = torch.compile(model, backend="fairy2i", options={"mode": "exact", "dump_dir": exact_dir})
    with torch.no_grad():
        eager, ours = model(ids).logits, compiled(ids).logits
    report = json.load(open(os.path.join(exact_dir, "report.json")))
    print(f"[exact] {report['summary']['converted']} linear layers rewritten to widely-linear form; "
          f"max |compiled - eager| = {(ours - eager).abs().max().item():.2e}")

    # 2. ptq (Fairy2i-W2) ------------------------------------------------------------
    ptq = Fairy2iBackend({"mode": "ptq", "stages": 2, "dump_dir": os.path.join(args.dump_dir, "ptq")})
    with torch.no_grad():
        q_logits = torch.compile(model, backend=ptq)(ids).logits
    layers = ptq.reports[0].layers
    err = sum(r.extra["rel_fro"] for r in layers) / len(layers)
    before, after = sum(r.bytes_before for r in layers), sum(r.bytes_after for r in layers)
    print(f"[ptq W2] mean relative weight error {err:.3f}; W2 codes + scales take {after} bytes vs "
          f"{before} fp32 ({before / after:.1f}x); mean |logit drift| {(q_logits - eager).abs().mean().item():.3f}")

    # 3. qat ---------------------------------------------------------------------------
    student = torch.compile(model, backend=Fairy2iBackend({"mode": "qat", "stages": 2}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(20):
        loss = student(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        if step in (0, 19):
            print(f"[qat W2] step {step:2d} loss {loss.item():.3f}")

    print(f"graph dumps (FX code per stage) and report.json: {args.dump_dir}")


if __name__ == "__main__":
    main()
