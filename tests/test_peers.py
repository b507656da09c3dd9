"""benchmarks/peers.py: HQQ quantize -> dequantize in place on a tiny linear stack.

Skipped without hqq (not part of `make setup-eval`; `make setup-peers` installs it).
Tolerances: exact where the answer is bits or untouched weights; the error ordering is
a strict inequality between HQQ widths, not a tolerance.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("hqq.core.quantize", reason="hqq is not installed; `make setup-peers` installs it")

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("peers", REPO / "benchmarks" / "peers.py")
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)


class TinyLM(nn.Module):
    """embedding -> two linears -> head tied to the embedding, like SmolLM2's lm_head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(128, 64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)
        self.head = nn.Linear(64, 128, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):  # x: [B, L] -> [B, L, 128]
        return self.head(self.down(torch.relu(self.up(self.embed(x)))))


def test_hqq_dequantized_in_place_error_falls_with_bits_and_counts_meta():
    errors = []
    for nbits in (2, 3, 4):
        model = TinyLM()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        up_weight = model.up.weight
        info = peers.hqq_dequantized(model, nbits, group_size=64)
        assert model.up.weight is up_weight  # replaced in place
        for name in ("up", "down", "head"):
            assert not torch.equal(getattr(model, name).weight, before["embed.weight" if name == "head" else f"{name}.weight"])
        assert torch.equal(model.embed.weight, before["embed.weight"])  # the tied embedding stays dense
        assert torch.equal(model.up.bias, before["up.bias"])
        assert info["untied"] == ["head"] and set(info["layers"]) == {"up", "down", "head"}
        assert info["weights"] == 3 * 64 * 128
        # One fp16 scale and one fp16 zero per 64 weights: 32 / 64 bits on top of the codes.
        assert info["bits_per_weight"] == nbits + 0.5
        if nbits != 3:
            assert info["packed_bits_per_weight"] == nbits + 0.5
        else:  # 10 codes per int32 word: 3.2 bits and a partly filled last word
            assert 3.7 <= info["packed_bits_per_weight"] < 3.8
        errors.append(info["rel_err"])
        assert 0 < info["rel_err"] < 1
    assert errors[0] > errors[1] > errors[2], errors


def test_hqq_dequantized_rejects_what_it_cannot_group():
    with pytest.raises(ValueError, match="straddle rows"):
        peers.hqq_dequantized(nn.Sequential(nn.Linear(96, 64)), 4, group_size=64)
    with pytest.raises(ValueError, match="nbits=7"):
        peers.hqq_dequantized(TinyLM(), 7)
    with pytest.raises(ValueError, match="no nn.Linear"):
        peers.hqq_dequantized(nn.Sequential(nn.ReLU()), 4)
