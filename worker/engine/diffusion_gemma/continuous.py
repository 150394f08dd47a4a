"""Continuous batching for DiffusionGemma: every row denoises its own canvas at its own pace.

``generate()`` (transformers ``generation_diffusion_gemma.py``) is batch-synchronous: all rows start a
canvas together, a row whose canvas stopped early keeps riding along, and no request can join. Here
each slot carries its own canvas state (step count, temperature schedule, self-conditioning logits,
stability history, noise), so at every decoder pass:
- a row whose canvas finished denoising commits it at once: it is evicted if it hit EOS, a stop
  string or max_tokens, else its canvas is encoded into its prefix and a new canvas starts;
- a waiting request takes a free slot and starts its first canvas (its own canvas boundary);
so no decoder pass is spent on a finished canvas. The step itself has no per-row Python loop; its
vocabulary-wide work runs a few canvases at a time (``chunked.py``), and what a slot carries to its next
pass is the self-conditioning embeddings (canvas, hidden), not the (canvas, vocabulary) logits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import chunked
from .adapter import DiffusionGemmaAdapter
from .denoise import entropy_bound_accept, linear_temperature, stable_and_confident
from .noise import draw_canvas_noise
from .settings import DenoiseSettings


@dataclass
class Job:
    """One request as the denoiser sees it; ``done(generated)`` says whether to stop after a canvas."""

    prompt_ids: list[int]
    settings: DenoiseSettings
    seed: int
    done: Callable[[list[int]], bool]
    generated: list[int] = field(default_factory=list)
    forward_passes: int = 0
    elapsed_s: float = 0.0
    generator: torch.Generator | None = None
    started: float = 0.0


class ContinuousDenoiser:
    def __init__(self, adapter: DiffusionGemmaAdapter, *, max_rows: int, stop: DenoiseSettings):
        """``stop``: the checkpoint's adaptive-stop settings (stability and confidence thresholds)."""
        self.adapter, self.max_rows = adapter, max_rows
        self.stability = stop.stability_threshold if stop.adaptive_stop else None
        self.confidence = stop.confidence_threshold if stop.adaptive_stop else None
        # Progress, read by the worker's heartbeat thread: tokens the run's jobs have committed so far
        # (whole canvases; no job's result is handed out before the run ends).
        self.tokens_in_flight = 0

    @torch.inference_mode()
    def run(self, jobs: list[Job]) -> None:
        """Denoise every job to completion, filling ``generated``, ``forward_passes``, ``elapsed_s``."""
        self._allocate(max(job.settings.max_steps for job in jobs))
        waiting = deque(jobs)
        slots: list[Job] = []
        to_encode: list[tuple[Job, list[int]]] = []
        while waiting or slots:
            while waiting and len(slots) < self.max_rows:
                job = waiting.popleft()
                job.generator = torch.Generator(device=self.adapter.device).manual_seed(job.seed)
                job.started = time.perf_counter()
                slots.append(job)
                self._admit(len(slots) - 1, job)
                to_encode.append((job, job.prompt_ids))
            self._encode_and_start(slots, to_encode)
            finished = self._step(len(slots), fresh=len(to_encode))
            to_encode = self._commit(slots, finished)
            if finished:
                self.tokens_in_flight = sum(len(job.generated) for job in jobs)

    # ---- state ---------------------------------------------------------------------------

    def _allocate(self, max_steps: int) -> None:
        rows, length, device = self.max_rows, self.adapter.canvas_length, self.adapter.device
        self.cache = self.adapter.new_cache(rows)
        self.canvas = torch.zeros((rows, length), dtype=torch.long, device=device)
        self.argmax = torch.zeros_like(self.canvas)
        self.uniform = torch.zeros((rows, max_steps, length), device=device)
        self.renoise = torch.zeros((rows, max_steps, length), dtype=torch.long, device=device)
        self.steps_done = torch.zeros(rows, dtype=torch.long, device=device)
        self.max_steps = torch.ones(rows, dtype=torch.long, device=device)
        self.passes = torch.zeros(rows, dtype=torch.long, device=device)
        self.t_min, self.t_max, self.bound = (torch.zeros(rows, device=device) for _ in range(3))
        self.sc_valid = torch.zeros(rows, dtype=torch.bool, device=device)
        # (rows, L, H): the soft embeddings the decoder would derive from the last step's logits.
        self.sc_input = torch.zeros((rows, length, self.adapter.hidden_size), dtype=self.adapter.embed_dtype,
                                    device=device)
        self.per_chunk = chunked.rows_per_chunk(length, self.adapter.vocab_size)
        self.history = (None if not self.stability else
                        torch.full((self.stability, rows, length), -1, dtype=torch.long, device=device))

    def _per_slot(self) -> list[torch.Tensor]:
        return [self.canvas, self.argmax, self.uniform, self.renoise, self.steps_done, self.max_steps,
                self.passes, self.t_min, self.t_max, self.bound, self.sc_valid, self.sc_input]

    def _admit(self, slot: int, job: Job) -> None:
        s = job.settings
        self.max_steps[slot], self.t_min[slot], self.t_max[slot] = s.max_steps, s.t_min, s.t_max
        self.bound[slot], self.passes[slot] = s.entropy_bound, 0
        self.cache.lengths[slot] = 0

    def _encode_and_start(self, slots: list[Job], to_encode: list[tuple[Job, list[int]]]) -> None:
        """Encode new prefixes (prompts or finished canvases) in one call, then start their canvases."""
        if not to_encode:
            return
        index = {id(job): slot for slot, job in enumerate(slots)}
        slot_ids = [index[id(job)] for job, _ in to_encode]
        self.adapter.encode(self.cache, slot_ids, [tokens for _, tokens in to_encode])
        for slot, (job, _) in zip(slot_ids, to_encode, strict=False):
            steps = job.settings.max_steps
            if job.generator is None:
                raise RuntimeError("a job's canvas is drawn after its admission seeded its generator")
            noise = draw_canvas_noise(job.generator, canvas_length=self.adapter.canvas_length, max_steps=steps,
                                      vocab_size=self.adapter.vocab_size, device=self.adapter.device)
            self.canvas[slot], self.uniform[slot, :steps], self.renoise[slot, :steps] = (
                noise.initial, noise.uniform, noise.renoise)
            self.steps_done[slot], self.sc_valid[slot] = 0, False
            if self.history is not None:
                self.history[:, slot] = -1

    # ---- one decoder pass ----------------------------------------------------------------

    def _step(self, n: int, fresh: int) -> list[int]:
        """One denoising step for slots 0..n-1; returns the slots whose canvas finished."""
        # Every row fresh: no signal at all, as generate's first step; else fresh rows get zeros (the mask).
        signal = None if fresh == n else self.sc_input[:n] * self.sc_valid[:n].to(self.sc_input.dtype)[:, None, None]
        hidden = self.adapter.decode(self.cache, self.canvas[:n], signal)
        steps_done, max_steps = self.steps_done[:n], self.max_steps[:n]
        temperature = linear_temperature(self.t_min[:n], self.t_max[:n], max_steps - steps_done, max_steps)
        rows = torch.arange(n, device=hidden.device)
        draws = chunked.denoise_in_chunks(
            hidden, temperature, self.uniform[rows, steps_done], head=self.adapter.head,
            self_conditioning=self.adapter.self_conditioning_input, self_conditioning_out=self.sc_input[:n],
            per_chunk=self.per_chunk)
        accept = entropy_bound_accept(draws.entropy, self.bound[:n])
        # Accepted positions take the denoiser's draw; every other position is renoised.
        self.canvas[:n] = torch.where(accept, draws.drawn, self.renoise[rows, steps_done])
        stop = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        if self.confidence is not None:
            history = None if self.history is None else self.history[:, :n]
            stop, history = stable_and_confident(history, draws.argmax, draws.entropy, self.confidence)
            if history is not None and self.history is not None:
                self.history[:, :n] = history
        self.sc_valid[:n] = True
        self.argmax[:n] = draws.argmax
        self.steps_done[:n] += 1
        self.passes[:n] += 1
        finished = stop | (self.steps_done[:n] >= max_steps)
        return finished.nonzero().flatten().tolist()  # the step's one host sync

    # ---- canvas boundaries ---------------------------------------------------------------

    def _commit(self, slots: list[Job], finished: list[int]) -> list[tuple[Job, list[int]]]:
        """Append finished canvases to their rows; evict rows that are done; return rows to encode."""
        if not finished:
            return []
        canvases = self.argmax[finished].tolist()
        passes = self.passes[finished].tolist()
        to_encode, evict = [], []
        for slot, canvas, count in zip(finished, canvases, passes, strict=False):
            job = slots[slot]
            job.generated.extend(canvas)
            job.forward_passes = count
            if job.done(job.generated):
                job.elapsed_s = time.perf_counter() - job.started
                evict.append(slot)
            else:
                to_encode.append((job, canvas))
        for slot in sorted(evict, reverse=True):  # the last slot fills the hole: slots stay dense
            last = len(slots) - 1
            if slot != last:
                for tensor in self._per_slot():
                    tensor[slot] = tensor[last]
                if self.history is not None:
                    self.history[:, slot] = self.history[:, last]
                self.cache.move(last, slot)
                slots[slot] = slots[last]
            slots.pop()
        return to_encode
