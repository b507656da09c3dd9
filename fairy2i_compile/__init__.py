"""fairy2i_compile: a torch.compile backend that rewrites real linear layers into
their exactly equivalent widely-linear complex form and quantizes them Fairy2i-style.

    import torch
    compiled = torch.compile(model, backend="fairy2i", options={"mode": "exact"})

The backend is registered through the `torch_dynamo_backends` entry point, so
`backend="fairy2i"` works after `pip install` without importing this package.
Data flow: capture (Dynamo) -> passes/ -> AOTAutograd -> codegen/ or eager -> run.
"""

from __future__ import annotations

from . import ops, packed_ops, quant_ops
from .backend import Fairy2iBackend, compile, fairy2i_backend
from .calibration import calibrate, calibration_windows, distill
from .checkpoint import load_packed, packed_state_info, save_packed
from .config import Fairy2iConfig
from .packed_model import PackedLinear, pack_model

__all__ = [
    "Fairy2iBackend", "Fairy2iConfig", "PackedLinear", "calibrate", "calibration_windows", "compile", "distill",
    "fairy2i_backend", "load_packed", "ops", "pack_model",
    "packed_ops", "packed_state_info", "quant_ops", "save_packed",
]
__version__ = "0.1.0"
