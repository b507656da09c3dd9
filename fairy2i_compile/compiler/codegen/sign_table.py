"""The per-code swap/sign table, derived symbolically (sympy), never typed by hand.

A weight entry coded k (meaning s * i**k, s > 0) times a complex activation z:

    U term:  i**k * z          z = a + i b  (a = x[..., :m], b = x[..., m:])
    W term:  i**k * conj(z)

Expanding with sympy gives each product's real and imaginary part as a signed
pick of a or b, e.g. i * (a + i b) = -b + i a, so code 1 of U contributes
(re, im) = (-b, +a). `TABLE[(conj, k)] = (re_term, im_term)` with each term a
pair (sign, "a" | "b"); the Triton templates turn it into selects and sign flips
(no multiplications). `derive()` recomputes it; tests check it against complex
arithmetic.

Two facts the kernels also need come from the same expansion:

    UNIT[k] = (Re i**k, Im i**k)    the dense value of code k for a unit scale
                                    (the GEMM path decodes codes to +-s tiles)
    AXIS[k] = 0 | 1                 which scale code k takes: 0 = s_re (the
                                    +-1-coded entries), 1 = s_im (the +-i-coded)

`AXIS` is read off `UNIT` (the nonzero component), so the partition of the codes
into "+-1-coded" and "+-i-coded" is derived too, not assumed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, Tuple

__all__ = ["Term", "derive", "derive_units", "TABLE", "UNIT", "AXIS", "codes_on_axis", "term_expr", "describe"]

Term = Tuple[int, str]  # (sign +1 | -1, "a" | "b")


@lru_cache(maxsize=1)
def derive() -> Dict[Tuple[bool, int], Tuple[Term, Term]]:
    """(conj, k) -> ((sign, "a"|"b") of Re, (sign, "a"|"b") of Im) of i**k z (z = a + i b, or its
    conjugate when conj), expanded with sympy: each part is one signed pick of a or b."""
    import sympy as sp

    a, b = sp.symbols("a b", real=True)
    table: Dict[Tuple[bool, int], Tuple[Term, Term]] = {}
    for conj in (False, True):
        z = a - sp.I * b if conj else a + sp.I * b
        for k in range(4):
            prod = sp.expand(sp.I**k * z)
            parts = []
            for part in (sp.re(prod), sp.im(prod)):
                coeffs = {s: part.coeff(s) for s in (a, b)}
                (sym, c), = [(s, c) for s, c in coeffs.items() if c != 0]
                assert c in (1, -1) and sp.simplify(part - c * sym) == 0, (conj, k, part)
                parts.append((int(c), str(sym)))
            table[(conj, k)] = (parts[0], parts[1])
    return table


@lru_cache(maxsize=1)
def derive_units() -> Dict[int, Tuple[int, int]]:
    """k -> (Re i**k, Im i**k) as ints, from sympy."""
    import sympy as sp

    units: Dict[int, Tuple[int, int]] = {}
    for k in range(4):
        v = sp.expand(sp.I**k)
        re, im = sp.re(v), sp.im(v)
        assert re in (-1, 0, 1) and im in (-1, 0, 1) and (re == 0) != (im == 0), (k, v)
        units[k] = (int(re), int(im))
    return units


TABLE = derive()
UNIT = derive_units()
AXIS: Dict[int, int] = {k: (0 if re != 0 else 1) for k, (re, im) in UNIT.items()}


def codes_on_axis(axis: int) -> Tuple[int, ...]:
    """The codes that take scale `axis` (0: s_re, the +-1 codes; 1: s_im, the +-i codes)."""
    return tuple(k for k in range(4) if AXIS[k] == axis)


def term_expr(term: Term, names: Dict[str, str]) -> str:
    """Source text of a term: (+1, "a") -> names["a"], (-1, "b") -> names["-b"]."""
    sign, sym = term
    return names[sym] if sign > 0 else names["-" + sym]


def describe(conj: bool) -> str:
    """One-line summary for generated-code comments, e.g. '0: (+a, +b)  1: (-b, +a)  ...'."""
    def fmt(t: Term) -> str:
        return ("+" if t[0] > 0 else "-") + t[1]

    return "  ".join(f"{k}: ({fmt(TABLE[(conj, k)][0])}, {fmt(TABLE[(conj, k)][1])})" for k in range(4))
