"""Quantization: the one quantizer (`quant`), the packed 2-bit format (`packing`), memory-bounded
quantization of big layers (`chunked`), packed layers and `pack_model` (`packed_model`), and
calibrated conversion (`calibration/`).

Import nothing here: subpackage imports stay free of side effects (see compiler/__init__.py).
"""
