"""One denoising round's step forward, captured once as a CUDA graph and replayed at every step.

On a GPU the block-causal engine is bound by the host: a step of the built-in model is ~220 small
kernels, each launched from Python, while the GPU is busy ~6% of the pass (H200, README). Within a
round (one block of every running row) every step runs the same forward on tensors of the same
shapes: the block's token ids change, nothing else does — the cache buffer, its write offset, the
mask and the position ids are fixed for the round. So the round's forward is captured once and each
step replays it: one launch instead of hundreds. (The technique of vLLM's and SGLang's decode
graphs, and of PyTorch's "CUDA Graphs" notes: static input buffers, a warm-up on a side stream;
written here for a per-round capture.)

Two captures, by what the round's rows need:
  - greedy rows (temperature 0, the default): the whole step, forward and decision
    (samplers.GreedyBlockSteps), is one graph, so a step is one launch and, for reference rows,
    the host waits for the device once a round, not once a step;
  - rows that sample draw their noise from per-request generators, eagerly: only the forward is
    captured (BlockForwardGraph) and the decision runs as before.
What a graph gives up: shapes must be static, so it projects logits for the whole block, where the
eager step projects only the still-masked positions. At one token a pass on a GPU that projection
is not what costs.

On a CPU the same protocol runs eagerly: that is how the tests check it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache

import torch

from .cache import take_slots

log = logging.getLogger(__name__)


class CapturedCall:
    """``fn()`` run eagerly at the first call (a real call, and the warm-up PyTorch's notes ask
    for: libraries set up their workspaces outside the capture, on a side stream), then captured,
    and replayed at every later call. ``fn`` must read and write only tensors that outlive this
    object and return a tensor or None; its output is the graph's static buffer, overwritten by the
    next replay. On a device other than CUDA, or once a capture has failed in this process, it
    calls ``fn`` every time."""

    def __init__(self, fn: Callable[[], torch.Tensor | None], device: torch.device):
        self.fn, self.device = fn, device
        self.capture = device.type == "cuda" and not _capture_failed
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor | None:
        if not self.capture:
            return self.fn()
        if self.graph is not None:
            self.graph.replay()
            return self.output
        output = _on_side_stream(self.device, self.fn)
        try:
            self.graph, self.output = _capture(self.device, self.fn)
        except RuntimeError as error:
            # The eager call already gave this call's answer; a process whose captures fail (a
            # torch or driver that rejects an operation of the step) runs eagerly from now on
            # rather than failing its requests.
            _give_up_capturing(error)
            self.capture = False
        return output


_capture_failed = False


def _give_up_capturing(error: Exception) -> None:
    global _capture_failed
    if not _capture_failed:
        log.warning("CUDA graph capture failed, denoising steps run eagerly from now on: %s", error)
    _capture_failed = True


def _on_side_stream(device: torch.device, fn: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
    with torch.cuda.device(device):  # the model's GPU, whichever is current
        side = _side_stream(torch.cuda.current_device())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            output = fn()
        torch.cuda.current_stream().wait_stream(side)
    return output


def _capture(device: torch.device, fn: Callable[[], torch.Tensor | None]):
    """(graph, output) of ``fn`` captured on the side stream. Capturing runs nothing: it costs host
    time once, and the state fn changes stays as the eager call left it. Each graph has its own
    memory pool, freed with it when the round ends (a pool shared across rounds' captures tripped
    an allocator assertion in torch 2.11 on an H200: the last graph using it had been freed).
    ``torch.cuda.graph`` also synchronises and empties the allocator's cache before each capture,
    which keeps dead rounds' pools from piling up; what that costs per round is not measured."""
    with torch.cuda.device(device):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=_side_stream(torch.cuda.current_device())):
            output = fn()
    return graph, output


class BlockForwardGraph:
    """``forward(block, slots) -> (B, n, V)`` for one round of rows that sample (their noise comes
    from per-request generators, drawn eagerly), and ``commit(block)`` for the round's last pass.

    ``run(ids)`` must be the round's model forward returning the whole block's logits (B, K, V); it
    writes the block's keys and values into the round's cache columns in place, so running it again
    with other ids is harmless (each run overwrites them before attention reads them).
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], block: torch.Tensor):
        self.ids = ids = block.clone()  # the graph's static input: every step copies its block here
        self.call = CapturedCall(lambda: run(ids), block.device)  # (not self: no reference cycle)

    def __call__(self, block: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(block)
        return take_slots(self.call(), slots)

    def commit(self, block: torch.Tensor) -> None:
        """The round's last pass: the committed block's keys and values stay in the cache."""
        self.ids.copy_(block)
        self.call()


@cache
def _side_stream(device: int) -> torch.cuda.Stream:
    """One side stream per device for every round's warm-up and capture. cuBLAS keeps a workspace
    per stream it runs on: a new stream each round held ~1 GB more at batch 1 on an H200."""
    return torch.cuda.Stream(device=device)
