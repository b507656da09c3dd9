"""Orthogonal rotations that leave a float decoder's function unchanged and spread its outliers.

Incoherence processing (QuIP, QuIP#, QuaRot): a weight whose input basis is rotated by a
random orthogonal Q has entries that look Gaussian, with no column far larger than the rest,
and the activations it reads lose their few huge channels. Rounding onto a small codebook
such as {±1, ±i} with a few scales errs much less on such a weight. For a pre-norm decoder
(Llama, Mistral, Qwen2, SmolLM2) the rotation can be folded into the weights so that the
model computes exactly the same function, with no extra op at run time:

    hidden state (row vector) h -> h' = h Q, Q orthogonal [d, d]
    RMSNorm(h') = RMSNorm(h) Q    once each norm's weight γ is folded into the linears after it
                                  (all but a constant c = rms(γ), which commutes with Q)
    reads h   (q/k/v, gate/up, lm_head):  W -> W diag(γ / c) Q,  the norm's weight -> c · 1
    writes h  (o_proj, down_proj):        W -> Qᵀ W,  b -> b Q
    embedding rows:                       E -> E Q

and per attention head (value rows and the o_proj columns they feed; attention mixes
tokens, not the channels of a head, so any orthogonal R per key/value head commutes):

    v_proj rows of kv head g:  W_g -> Rᵀ W_g,   o_proj columns of every head reading g: W_h -> W_h R

Why the constant c stays in the norm: SmolLM2's γ are small (rms 0.04 in block 0, 0.2–0.4 in
the others), so folding all of γ shrank the weights of q/k/v/gate/up 4–28×. The rounding does not
care (it is scale-equivariant), but training does: Adam moves every latent weight by about its
learning rate per step whatever the weight's size, so end-to-end distillation from the rotated
codes flipped codes 4–28× more often than from the unrotated ones and its loss rose at first.
Keeping rms(γ) in the norm leaves every folded weight at its original magnitude on average.

The inputs of down_proj (after the SwiGLU product) would need a rotation at run time and are
left as they are; their massive activations keep the outlier columns of the rounding.

Q and R are random Hadamard matrices H diag(s) / √n (s random signs), built as the Kronecker
product of a Sylvester matrix of order 2^k and a Paley matrix (order q + 1 for a prime
q ≡ 3 mod 4, 2(q + 1) for q ≡ 1 mod 4): 576 = 16 · 36 (q = 17), 64 = 2^6, 1536 = 128 · 12
(q = 11). Their entries all have magnitude 1/√n, the most incoherent an orthogonal matrix can
be. A size with no such construction gets a random orthogonal matrix (QR of a Gaussian).

``rotate_decoder`` checks its work: the logits of a short random token sequence before and
after must agree (relative error below ``RTOL``, float32 arithmetic), so an architecture this
does not understand (Gemma's 1 + γ norms, fused qkv, LayerNorm with a mean) is refused with
its reason instead of silently changing the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ...training.train import forward_kwargs, model_logits

__all__ = ["hadamard_order", "random_hadamard", "rotate_decoder", "RotationInfo", "RTOL"]

RTOL = 1e-3  # relative logit error a float32 rotation stays far below (measured ~1e-6 on SmolLM2)


@dataclass(frozen=True)
class RotationInfo:
    """What ``rotate_decoder`` did: sizes, how each matrix was built, the measured logit error."""

    hidden: int
    head_dim: Optional[int]
    hidden_kind: str
    head_kind: Optional[str]
    seed: int
    logit_rel_error: float

    def summary(self) -> Dict[str, object]:
        return {"hidden": self.hidden, "head_dim": self.head_dim, "hidden_kind": self.hidden_kind,
                "head_kind": self.head_kind, "seed": self.seed, "logit_rel_error": self.logit_rel_error}


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def _paley(q: int) -> Tensor:
    """A Hadamard matrix of order q + 1 (q ≡ 3 mod 4) or 2(q + 1) (q ≡ 1 mod 4), q prime, ±1 entries."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]  # Jacobsthal matrix Q[i, j] = χ(j - i)
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 1:] = jac
    if q % 4 == 3:  # skew conference matrix S: H = I + S
        c[1:, 0] = -1
        return torch.eye(n, dtype=torch.float64) + c
    c[1:, 0] = 1  # symmetric conference matrix: 0 -> [[1, -1], [-1, -1]], ±1 -> ±[[1, 1], [1, -1]]
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron((c == 0).double(), zero)


def hadamard_order(n: int) -> Optional[Tuple[int, int]]:
    """(2^k, m): 2^k · m = n, a Paley matrix of order m (m = 1: Sylvester alone), 2^k as large as can be; None if none."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"a Hadamard order must be a positive int, got {n!r}")
    p = n & -n  # the largest power of two dividing n: Sylvester as far as it goes, then Paley
    while p >= 1:
        m = n // p
        if m == 1 or (m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3) or \
                (m % 4 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1):
            return p, m
        p //= 2
    return None


def random_hadamard(n: int, generator: torch.Generator) -> Tuple[Tensor, str]:
    """An orthogonal [n, n] float64 matrix H diag(s) / √n, or a random orthogonal one; and which it is."""
    order = hadamard_order(n)
    if order is None:
        g = torch.randn(n, n, dtype=torch.float64, generator=generator)
        q, r = torch.linalg.qr(g)
        return q * torch.sign(torch.diagonal(r))[None, :], "random orthogonal"
    p, m = order
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if m > 1:
        q = m - 1 if _is_prime(m - 1) and (m - 1) % 4 == 3 else m // 2 - 1
        h = torch.kron(h, _paley(q))
    if not torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)):
        raise AssertionError(f"the Hadamard construction for n={n} (2^k={p}, m={m}) is not orthogonal")
    signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
    kind = f"Hadamard {p}x{m}" if m > 1 else f"Hadamard {p}"
    return h * signs[None, :] / n ** 0.5, kind


def _need(module: nn.Module, name: str, what: str) -> nn.Module:
    sub = getattr(module, name, None)
    if not isinstance(sub, nn.Module):
        raise ValueError(f"rotate=True supports Llama-style decoders (model.model.embed_tokens, layers[i]."
                         f"{{input_layernorm, self_attn.q/k/v/o_proj, post_attention_layernorm, mlp.gate/up/down_proj}}, "
                         f"norm, lm_head); {what} has no {name!r} ({type(module).__name__}); pass rotate=False")
    return sub


def _rms_weight(norm: nn.Module, what: str) -> nn.Parameter:
    if "rmsnorm" not in type(norm).__name__.lower() or getattr(norm, "bias", None) is not None or \
            not isinstance(getattr(norm, "weight", None), torch.Tensor):
        raise ValueError(f"rotate=True needs RMSNorm layers (a scale and no bias, no mean): {what} is "
                         f"{type(norm).__name__}; pass rotate=False")
    return norm.weight


def _set(linear: nn.Module, weight: Tensor, bias: Optional[Tensor] = None) -> None:
    # new Parameters: a weight tied to another module (lm_head ~ embedding) is untied, not overwritten
    linear.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(linear.bias.dtype), requires_grad=linear.bias.requires_grad)


def _norm_constant(gamma: Tensor) -> float:
    """The part c = rms(γ) of a norm's weight that stays in the norm (module docstring); 1 for γ = 0."""
    c = float(gamma.detach().double().pow(2).mean().sqrt())
    return c if c > 0.0 else 1.0


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model_logits(model, ids, forward_kwargs(model)).detach().double()


@torch.no_grad()
def rotate_decoder(model: nn.Module, *, seed: int = 0, heads: bool = True, check_tokens: int = 16) -> RotationInfo:
    """Rotate a Llama-style decoder in place (module docstring); returns what was done.

    seed:          the random signs (and a random orthogonal fallback) come from it.
    heads:         also rotate each value head and the o_proj columns it feeds.
    check_tokens:  the function check runs this many random tokens (0: no check).
    Raises ValueError for an architecture it does not fit: on a missing or non-RMSNorm module or
    mismatched head sizes before any weight changes; when the logit check fails, after (call it on
    a copy, as ``calibrate`` does).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    base = getattr(model, "model", model)
    embed = _need(base, "embed_tokens", type(base).__name__)
    blocks = _need(base, "layers", type(base).__name__)
    final_norm = _need(base, "norm", type(base).__name__)
    lm_head = _need(model, "lm_head", type(model).__name__)
    if not isinstance(blocks, nn.ModuleList) or not isinstance(embed, nn.Embedding) or \
            not isinstance(lm_head, nn.Linear):
        raise ValueError(f"rotate=True needs an nn.Embedding, an nn.ModuleList of layers and an nn.Linear lm_head; "
                         f"got {type(embed).__name__}, {type(blocks).__name__}, {type(lm_head).__name__}; "
                         "pass rotate=False")
    config = getattr(model, "config", None)
    d = embed.weight.shape[1]
    ids = None
    if check_tokens:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, embed.weight.shape[0], (1, check_tokens), generator=gen).to(embed.weight.device)
        before = _logits(model, ids)

    # every module and norm is found and checked before any weight changes
    plan = []  # per block: ((norm, γ, readers) for both norms, the linears writing the residual stream)
    for i, block in enumerate(blocks):
        attn, mlp = _need(block, "self_attn", f"layers[{i}]"), _need(block, "mlp", f"layers[{i}]")
        reads = {"input_layernorm": [_need(attn, n, f"layers[{i}].self_attn") for n in ("q_proj", "k_proj", "v_proj")],
                 "post_attention_layernorm": [_need(mlp, n, f"layers[{i}].mlp") for n in ("gate_proj", "up_proj")]}
        norms = []
        for name, readers in reads.items():
            norm = _need(block, name, f"layers[{i}]")
            norms.append((norm, _rms_weight(norm, f"layers[{i}].{name}"), readers))
        writes = [_need(attn, "o_proj", f"layers[{i}].self_attn"), _need(mlp, "down_proj", f"layers[{i}].mlp")]
        plan.append((norms, writes))
    final_gamma = _rms_weight(final_norm, "model.norm")
    head_sizes = _head_sizes(blocks, config) if heads else None

    gen = torch.Generator().manual_seed(seed)
    q, hidden_kind = random_hadamard(d, gen)
    q = q.to(embed.weight.device)
    for norms, writes in plan:
        for norm, gamma, readers in norms:
            c = _norm_constant(gamma)
            for lin in readers:
                _set(lin, (lin.weight.double() * (gamma.double() / c)[None, :]) @ q)
            norm.weight.fill_(c)
        for lin in writes:
            _set(lin, q.T @ lin.weight.double(), None if lin.bias is None else lin.bias.double() @ q)
    c = _norm_constant(final_gamma)
    head_w = (lm_head.weight.double() * (final_gamma.double() / c)[None, :]) @ q
    final_norm.weight.fill_(c)
    embed.weight = nn.Parameter((embed.weight.double() @ q).to(embed.weight.dtype),
                                requires_grad=embed.weight.requires_grad)
    _set(lm_head, head_w)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # lm_head now differs from the embedding

    head_dim, head_kind = None, None
    if head_sizes is not None:
        head_dim, head_kind = _rotate_heads(blocks, *head_sizes, gen, q.device)

    err = 0.0
    if ids is not None:
        after = _logits(model, ids)
        err = float((after - before).norm() / before.norm().clamp_min(1e-30))
        if not err < RTOL:
            raise ValueError(f"rotating {type(model).__name__} changed its logits by {err:.2e} (relative; a "
                             f"function-preserving rotation stays below {RTOL:g}): its layers do not follow the "
                             "Llama pre-RMSNorm layout this rotation assumes; pass rotate=False")
    return RotationInfo(d, head_dim, hidden_kind, head_kind, seed, err)


def _head_sizes(blocks: nn.ModuleList, config) -> Tuple[int, int, int]:
    """(attention heads, key/value heads, head size), checked against every block's v_proj and o_proj."""
    n_heads = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if not isinstance(n_heads, int) or not isinstance(n_kv, int) or n_heads % n_kv:
        raise ValueError(f"rotating heads needs config.num_attention_heads and num_key_value_heads (dividing it), "
                         f"got {n_heads!r} and {n_kv!r}; pass heads=False")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    for i, block in enumerate(blocks):
        v, o = block.self_attn.v_proj, block.self_attn.o_proj
        if v.weight.shape[0] != n_kv * head_dim or o.weight.shape[1] != n_heads * head_dim:
            raise ValueError(f"layers[{i}]: v_proj has {v.weight.shape[0]} outputs and o_proj {o.weight.shape[1]} "
                             f"inputs, expected {n_kv}·{head_dim} and {n_heads}·{head_dim}; pass heads=False")
    return n_heads, n_kv, head_dim


def _rotate_heads(blocks: nn.ModuleList, n_heads: int, n_kv: int, head_dim: int, gen: torch.Generator,
                  device) -> Tuple[int, str]:
    r, kind = random_hadamard(head_dim, gen)
    r = r.to(device)
    for block in blocks:
        v, o = block.self_attn.v_proj, block.self_attn.o_proj
        wv = v.weight.double().reshape(n_kv, head_dim, -1)
        wv = torch.einsum("ji,gjc->gic", r, wv).reshape(n_kv * head_dim, -1)  # Rᵀ W_g per kv head
        bv = None if v.bias is None else (v.bias.double().reshape(n_kv, head_dim) @ r).reshape(-1)
        _set(v, wv, bv)
        wo = o.weight.double().reshape(o.weight.shape[0], n_heads, head_dim)
        _set(o, torch.einsum("ohj,ji->ohi", wo, r).reshape(o.weight.shape[0], -1))  # W_h R per head
    return head_dim, kind
