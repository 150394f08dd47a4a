"""The autoregressive twin of the built-in model: the baseline diffusion has to beat.

Same shape as ``diffbatch_mdm`` (pre-norm decoder, RMSNorm, rotary positions, SwiGLU, tied embeddings),
which is exactly transformers' Llama architecture, so the twin is a ``LlamaForCausalLM``: ``generate()``
runs it with a KV cache, static caches and ``torch.compile`` apply, and nothing of diffbatch's is needed
to serve it. It is trained on the same windows of the same data with the same tokenizer and schedule
(training/loop.py), with the next-token cross-entropy instead of the masked diffusion ELBO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

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
