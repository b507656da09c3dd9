"""fairy2i_compile: a torch.compile backend that rewrites real linear layers into
their exactly equivalent widely-linear complex form and quantizes them Fairy2i-style.

    import torch
    compiled = torch.compile(model, backend="fairy2i", options={"mode": "exact"})

The backend is registered through the `torch_dynamo_backends` entry point, so
`backend="fairy2i"` works after `pip install` without importing this package.
Data flow: capture (Dynamo) -> compiler/passes/ -> AOTAutograd -> compiler/codegen/ or eager -> run.

Layout: compiler/ (config, options, backend, passes/, ops/, codegen/, dump, report,
mlir_export), quantization/ (quant, packing, chunked, packed_model, calibration/),
checkpoints/ (checkpoint, safetensors_io, convert, models), training/ (train, distributed),
eval/, and at the top cache.py (cache folders, atomic writes: used by every wing), cli.py and
demo.py.

Old import paths. The modules lived at the top of the package before they were grouped;
MOVED_MODULES maps each old path to its home, and a finder placed first on sys.meta_path
answers an old path (a moved package's submodules included: `fairy2i_compile.ops.packed`)
with the module object of the new one, so `from fairy2i_compile.quant import phase_quant`,
`fairy2i_compile.backend:fairy2i_backend` (an entry point written before the move) and
mock.patch("fairy2i_compile.backend....") reach the same objects, and no module is ever
loaded twice (the op modules would register their torch.library ops twice).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Dict, Optional

# old path (relative to the package) -> its home now
MOVED_MODULES: Dict[str, str] = {
    "config": "compiler.config", "options": "compiler.options", "backend": "compiler.backend",
    "dump": "compiler.dump", "report": "compiler.report", "mlir_export": "compiler.mlir_export",
    "passes": "compiler.passes", "ops": "compiler.ops", "codegen": "compiler.codegen",
    "quant": "quantization.quant", "packing": "quantization.packing", "chunked": "quantization.chunked",
    "packed_model": "quantization.packed_model", "calibration": "quantization.calibration",
    "checkpoint": "checkpoints.checkpoint", "safetensors_io": "checkpoints.safetensors_io",
    "convert": "checkpoints.convert", "models": "checkpoints.models",
    "train": "training.train", "distributed": "training.distributed",
}


def moved_to(fullname: str) -> Optional[str]:
    """The new dotted path of an old module path (`fairy2i_compile.ops.packed` ->
    `fairy2i_compile.compiler.ops.packed`), or None when `fullname` did not move."""
    prefix = __name__ + "."
    if not fullname.startswith(prefix):
        return None
    old, _, rest = fullname[len(prefix):].partition(".")
    new = MOVED_MODULES.get(old)
    if new is None:
        return None
    return prefix + new + ("." + rest if rest else "")


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the module object of its new path (importlib keeps the object's
    own __name__, __spec__ and __path__, so both names share one module)."""

    def find_spec(self, fullname, path=None, target=None):
        new = moved_to(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(moved_to(spec.name))

    def exec_module(self, module: ModuleType) -> None:
        pass  # executed under its new name already


if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _OldPathFinder())


def __getattr__(name: str) -> ModuleType:
    # `fairy2i_compile.quant` as an attribute, before anything imported that old path
    if name in MOVED_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from .compiler import ops  # noqa: E402  (first: registers every fairy2i:: op)
from . import packed_ops, quant_ops  # noqa: E402
from .checkpoints.checkpoint import load_packed, packed_state_info, save_packed  # noqa: E402
from .compiler.backend import Fairy2iBackend, compile, fairy2i_backend  # noqa: E402
from .compiler.config import Fairy2iConfig  # noqa: E402
from .quantization.calibration import calibrate, calibration_windows, distill  # noqa: E402
from .quantization.packed_model import PackedLinear, pack_model  # noqa: E402

__all__ = [
    "Fairy2iBackend", "Fairy2iConfig", "MOVED_MODULES", "PackedLinear", "calibrate", "calibration_windows",
    "compile", "distill", "fairy2i_backend", "load_packed", "ops", "pack_model",
    "packed_ops", "packed_state_info", "quant_ops", "save_packed",
]
__version__ = "0.1.0"
