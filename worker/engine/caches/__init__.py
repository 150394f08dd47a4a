"""How a denoising step gets its block's logits: the caches, one block loop whatever the cache.

Every cache is a ``StepForward`` (base.py). Block-causal models: ``exact`` (the running batch's
KV cache, finished blocks computed once), ``delayed`` (exact across blocks, committed positions kept
within the block), ``recompute``. Full-attention models: ``approx`` (Fast-dLLM's prefix and dual caches).
"""
