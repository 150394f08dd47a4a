"""Block denoising, batched: LLaDA's reference remasking and Fast-dLLM's parallel acceptance.

Step math: ``noise`` (per-row Gumbel draws), ``predict`` (x0 and its confidence), ``transfer`` (how
many positions a step commits, and which), ``step`` (one step's decision). Block drivers: ``rules``
(a round's per-row settings), ``kept`` and ``editing`` (when a row is done), ``blocks`` (the eager
loop), ``greedy`` (the static-shape loop a CUDA graph can hold).
Rows of one batch may mix samplers; each row's tokens depend on its own seed only.
"""
