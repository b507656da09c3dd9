"""Quantization-aware training: the resumable QAT loop with atomic checkpoints (`train`) and its
multi-process form (`distributed`).

Import nothing here: subpackage imports stay free of side effects (see compiler/__init__.py).
"""
