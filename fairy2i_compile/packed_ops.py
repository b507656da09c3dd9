"""Compatibility names for the packed op family, which lives in compiler/ops/packed.py."""

from __future__ import annotations

from .compiler.config import KERNELS
from .compiler.ops import packed
from .compiler.ops.packed import *  # noqa: F401,F403  (the names below)

__all__ = ["KERNELS", *packed.__all__]
