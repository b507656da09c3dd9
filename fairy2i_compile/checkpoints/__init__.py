"""Models and checkpoints on disk: packed checkpoints (`checkpoint`: save_packed / load_packed),
the safetensors reader and writer (`safetensors_io`), whole Hugging Face folders converted under a
memory bound (`convert`), and the SmolLM2 model built from its GGUF file (`models`).

Import nothing here: subpackage imports stay free of side effects (see compiler/__init__.py).
"""
