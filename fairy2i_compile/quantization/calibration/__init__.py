"""Calibrated conversion: Hessian-aware rounding onto the Fairy2i codebook.

    from fairy2i_compile.quantization.calibration import calibrate, calibration_windows
    result = calibrate(model, calibration_windows(tokens, 64, 512, avoid=8 * 2048), stages=2)

``observer.py``  input second moments H per layer (the ``fairy2i.observe`` op the
                 ``observe`` pass inserts in calibrate mode, and eager hooks)
``rounding.py``  GPTQ/OBS-style rounding of one layer onto {±1, ±i} with T stages
``driver.py``    the block-by-block walk over a model, packing, the result object
``rotation.py``  random Hadamard rotations folded into a Llama-style decoder before rounding
                 (same float function, no outlier channels in the residual stream; on by default
                 where the model fits, ``rotate="auto"``)
``repair.py``    per-block reconstruction after rounding (optional, ``repair_steps``)
``distill.py``   end-to-end distillation of a packed model to the float model
"""

from .distill import DistillResult, distill, rounded_from_packed, split_holdout
from .driver import (CalibrationResult, LayerCalibration, calibrate, calibration_windows, find_blocks,
                     packed_from_rounded)
from .observer import HessianAccumulator, Observations, hook_inputs, observing
from .rotation import RotationInfo, rotate_decoder
from .rounding import RoundedLayer, gptq_round, output_error, rtn_round, select_outliers

__all__ = [
    "calibrate",
    "calibration_windows",
    "distill",
    "DistillResult",
    "rounded_from_packed",
    "split_holdout",
    "packed_from_rounded",
    "CalibrationResult",
    "LayerCalibration",
    "find_blocks",
    "HessianAccumulator",
    "Observations",
    "observing",
    "hook_inputs",
    "gptq_round",
    "rtn_round",
    "output_error",
    "RoundedLayer",
    "select_outliers",
    "rotate_decoder",
    "RotationInfo",
]
