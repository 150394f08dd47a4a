"""One denoising round's step forward, captured once as a CUDA graph and replayed at every step.

Within a round every step runs the same forward on tensors of the same shapes (only the block's
token ids change), so one launch replaces the hundreds a step of small kernels costs from Python.
Greedy rounds capture the whole step (sampling.greedy.GreedyBlockSteps); rounds with rows that sample
capture the forward alone (BlockForwardGraph), their noise drawn eagerly. Shapes are static, so a graph
projects logits for the whole block. On a CPU the same protocol runs eagerly: that is how the tests
check it. (The technique of vLLM's and SGLang's decode graphs and PyTorch's "CUDA Graphs" notes.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache
from typing import Generic, TypeVar

import torch

from .caches.base import take_slots

log = logging.getLogger(__name__)
T = TypeVar("T", bound="torch.Tensor | None")  # what a captured call returns


class CapturedCall(Generic[T]):
    """``fn()`` run eagerly at the first call, then captured and replayed at every later call (eagerly
    every time off CUDA, or once a capture failed in this process). ``fn`` reads and writes only tensors
    that outlive this object; its output is the graph's static buffer, overwritten by the next replay."""

    # The eager first call is also the warm-up PyTorch's notes ask for: libraries set up their
    # workspaces outside the capture, on a side stream.

    def __init__(self, fn: Callable[[], T], device: torch.device):
        self.fn: Callable[[], T] = fn
        self.device = device
        self.capture = device.type == "cuda" and not _capture_failed
        self.captured: tuple[torch.cuda.CUDAGraph, T] | None = None  # the graph and its output buffer

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The captured graph, None before a capture (and always off CUDA)."""
        return None if self.captured is None else self.captured[0]

    def __call__(self) -> T:
        if not self.capture:
            return self.fn()
        if self.captured is not None:
            graph, static_output = self.captured
            graph.replay()
            return static_output
        output = _on_side_stream(self.device, self.fn)
        try:
            self.captured = _capture(self.device, self.fn)
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


def _on_side_stream(device: torch.device, fn: Callable[[], T]) -> T:
    with torch.cuda.device(device):  # the model's GPU, whichever is current
        side = _side_stream(torch.cuda.current_device())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            output = fn()
        torch.cuda.current_stream().wait_stream(side)
    return output


def _capture(device: torch.device, fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """(graph, output) of ``fn`` captured on the side stream. Capturing runs nothing: the state fn
    changes stays as the eager call left it."""
    # Each graph has its own memory pool, freed with it when the round ends: a pool shared across
    # rounds' captures tripped an allocator assertion (torch 2.11, H200) once its last graph was freed.
    # torch.cuda.graph also synchronises and empties the allocator's cache before each capture, which
    # keeps dead rounds' pools from piling up.
    with torch.cuda.device(device):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=_side_stream(torch.cuda.current_device())):
            output = fn()
    return graph, output


class BlockForwardGraph:
    """A ``StepForward`` ``(block, slots) -> (B, n, V)`` for one round of rows that sample, and ``commit``
    for its last pass. ``run(ids)``: the round's forward, the whole block's logits (B, K, V); it writes
    the block's keys and values into the cache in place, so running it again with other ids is harmless."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], block: torch.Tensor):
        self.ids = ids = block.clone()  # the graph's static input: every step copies its block here
        self.call: CapturedCall[torch.Tensor] = CapturedCall(lambda: run(ids), block.device)  # no self: no cycle

    def __call__(self, block: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(block)
        return take_slots(self.call(), slots)

    def commit(self, block: torch.Tensor) -> None:
        """The round's last pass: the committed block's keys and values stay in the cache."""
        self.ids.copy_(block)
        self.call()


@cache
def _side_stream(device: int) -> torch.cuda.Stream:
    """One side stream per device for every round's warm-up and capture."""
    # cuBLAS keeps a workspace per stream it runs on: a new stream each round held ~1 GB more (H200).
    return torch.cuda.Stream(device=device)
