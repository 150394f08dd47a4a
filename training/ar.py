"""The autoregressive twin of the built-in model: the baseline diffusion has to beat.

Same shape as ``diffbatch_mdm`` (pre-norm decoder, RMSNorm, rotary positions, SwiGLU, tied embeddings),
which is exactly transformers' Llama architecture, so the twin is a ``LlamaForCausalLM``: ``generate()``
runs it with a KV cache, static caches and ``torch.compile`` apply, and nothing of diffbatch's is needed
to serve it. It is trained on the same windows of the same data with the same tokenizer and schedule
(training/loop.py), with the next-token cross-entropy instead of the masked diffusion ELBO.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from worker.engine.params import Healing

from .objective import LossParts


def build_ar_model(tokenizer, *, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                   intermediate_size: int, max_position_embeddings: int = 2048) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).train()


def ar_loss(model, x0: torch.Tensor) -> LossParts:
    """Mean next-token cross-entropy over the windows ``x0`` (B, L): every token after the first is
    scored, so one step of the twin sees as many targets as the diffusion model's fully noised block."""
    logits = model(input_ids=x0[:, :-1]).logits  # (B, L-1, V)
    targets = x0[:, 1:]
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return LossParts(loss=ce.mean(), masked_ce_sum=ce.detach().sum(), masked_count=ce.numel())


class FirstTokenHealing(LogitsProcessor):
    """A healed prompt's first new token must extend the text cut from the prompt, as in the engine.
    Only the first step of healed rows pays for it (prefix_allowed_tokens_fn would build a
    vocabulary-wide mask for every row at every step, a cost the diffusion side does not have)."""

    def __init__(self, width: int, healings: Sequence[Healing | None]) -> None:
        self.width = width
        self.allowed = {row: torch.tensor(sorted(healing.allowed)) for row, healing in enumerate(healings)
                        if healing is not None}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != self.width:
            return scores
        for row, allowed in self.allowed.items():
            keep = scores[row, allowed]
            scores[row] = float("-inf")
            scores[row, allowed] = keep
        return scores


class PresencePenalty(LogitsProcessor):
    """OpenAI's ``presence_penalty`` as the engine applies it (sampling/predict.py): ``penalty`` off the
    logit of every token the row has generated so far (the prompt's tokens do not count)."""

    def __init__(self, width: int, penalty: float) -> None:
        self.width = width
        self.penalty = penalty

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.width:]
        if generated.shape[-1] == 0:
            return scores
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated, True)
        return scores - self.penalty * seen.to(scores.dtype)


@dataclass
class TwinCompletion:
    prompt_ids: list[int]  # healed, as the service would run the prompt
    token_ids: list[int]  # cut at the first end token
    text: str  # what follows the prompt's text (the healed-away text left out)


def twin_complete(model, tokenizer, heal: Callable[[str], tuple[list[int], Healing | None]],
                  prompts: Sequence[str], *, new_tokens: int, batch: int, temperature: float = 0.0,
                  top_p: float = 1.0, presence_penalty: float = 0.0, seed: int = 0,
                  ) -> tuple[list[TwinCompletion], float]:
    """The twin's completions of ``prompts``, ``batch`` at a time (left-padded, KV cache), healed as the
    engine heals (``heal``: Engine.heal of the prompt's ids); greedy at temperature 0, else sampled
    (reproducibly: seeded per batch), with the engine's ``presence_penalty``. Also returns the seconds
    spent in ``generate`` alone."""
    completions, seconds = [], 0.0
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False}
    for first in range(0, len(prompts), batch):
        healed = [heal(prompt) for prompt in prompts[first:first + batch]]
        width = max(len(ids) for ids, _ in healed)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in healed])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in healed])
        processors = LogitsProcessorList([FirstTokenHealing(width, [healing for _, healing in healed])])
        if presence_penalty:
            processors.append(PresencePenalty(width, presence_penalty))
        torch.manual_seed(seed + first)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=new_tokens,
                                 use_cache=True, logits_processor=processors, eos_token_id=eos, pad_token_id=pad,
                                 **sampling)
        seconds += time.perf_counter() - start
        for (ids, healing), row in zip(healed, out[:, width:].tolist(), strict=True):
            row = row[:row.index(eos)] if eos in row else row
            text = tokenizer.decode(row, skip_special_tokens=True)
            completions.append(TwinCompletion(ids, row, text[len(healing.text):] if healing is not None else text))
    return completions, seconds
