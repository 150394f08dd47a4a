"""One denoising round's step forward, captured once as a CUDA graph and replayed at every step.

On a GPU the block-causal engine is bound by the host: a step of the built-in model is ~220 small
kernels, each launched from Python, while the GPU is busy ~6% of the pass (H200, README). Within a
round (one block of every running row) every step runs the same forward on tensors of the same
shapes: the block's token ids change, nothing else does — the cache buffer, its write offset, the
mask and the position ids are fixed for the round. So the round's forward is captured once and each
step replays it: one launch instead of hundreds. (The technique of vLLM's and SGLang's decode
graphs, and of PyTorch's "CUDA Graphs" notes: static input buffers, a warm-up on a side stream;
written here for a per-round capture.)

What the graph gives up: shapes must be static, so it projects logits for the whole block and the
still-masked slots are gathered afterwards (``take_slots``), where the eager step projects only
those. At one token a pass on a GPU that projection is not what costs.

``capture=False`` runs the same protocol eagerly (static input buffer, whole-block logits, slots
taken afterwards): that is how the CPU tests check it, and what a device without graphs gets.
"""

from __future__ import annotations

from functools import cache

import torch

from .cache import take_slots


class BlockStepGraph:
    """``forward(block, slots) -> (B, n, V)`` for one round, and ``commit(block)`` for its last pass.

    ``run(ids)`` must be the round's model forward returning the whole block's logits (B, K, V); it
    writes the block's keys and values into the round's cache columns in place, so running it again
    with other ids is harmless (each run overwrites them before attention reads them).
    """

    def __init__(self, run, block: torch.Tensor, *, capture: bool):
        self.run, self.capture = run, capture
        self.ids = block.clone()  # the graph's static input: every step copies its block here
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, block: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return take_slots(self._logits(block), slots)

    def commit(self, block: torch.Tensor) -> None:
        """The round's last pass: the committed block's keys and values stay in the cache."""
        self._logits(block)

    def _logits(self, block: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(block)
        if not self.capture:
            return self.run(self.ids)
        if self.graph is None:
            return self._warm_up_and_capture()
        self.graph.replay()
        return self.logits

    def _warm_up_and_capture(self) -> torch.Tensor:
        # The first step runs eagerly on a side stream (libraries set up their workspaces outside the
        # capture, as PyTorch's notes ask) and its logits are this step's answer; the capture itself
        # runs nothing, so it costs host time once and the next steps replay it.
        side = _side_stream(self.ids.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self.run(self.ids)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Its own memory pool: freed with the graph when the round ends (a pool shared across rounds'
        # captures tripped an allocator assertion in torch 2.11 on an H200).
        with torch.cuda.graph(self.graph, stream=side):
            self.logits = self.run(self.ids)
        return logits


@cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every round's warm-up and capture. cuBLAS keeps a workspace
    per stream it runs on: a new stream each round held ~1 GB more at batch 1 on an H200."""
    return torch.cuda.Stream(device=device)
