"""DiffusionGemma (uniform-noise block diffusion) behind diffbatch's engine interface.

Learned from transformers' ``models/diffusion_gemma/generation_diffusion_gemma.py`` (the algorithm)
and ``modeling_diffusion_gemma.py`` (the encoder cache and decoder attention); the code here is our own.
Kept light on purpose: import the submodules (``engine``, ``continuous``, ``reference``).
"""
