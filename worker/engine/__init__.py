"""diffbatch's denoising engine: a pure torch/transformers library.

Kept light on purpose (no torch at import): use the submodules, e.g. ``worker.engine.engine``.
"""
