"""A tiny random DiffusionGemma checkpoint on disk, for tests and the CPU benchmark.

Weights are random: the point is the algorithm and the plumbing, not the text. The tokenizer is the
project's byte-level one (worker/engine/builtin/tokenizer.py), so the checkpoint has a chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
)

from worker.engine.builtin.tokenizer import build_byte_tokenizer


def tiny_config(tokenizer, *, canvas_length: int = 16, hidden_size: int = 32, num_layers: int = 2,
                max_positions: int = 512, sliding_window: int = 24,
                vocab_size: int | None = None) -> DiffusionGemmaConfig:
    """Two layers (one sliding, one full), two experts, a 2-layer vision tower nobody calls. ``vocab_size``
    (default: the tokenizer's) may exceed the tokenizer, e.g. DiffusionGemma's 262,144 for memory figures."""
    text = dict(
        vocab_size=len(tokenizer) if vocab_size is None else vocab_size, hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        global_head_dim=16, num_experts=2, top_k_experts=1, moe_intermediate_size=hidden_size,
        max_position_embeddings=max_positions, sliding_window=sliding_window,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"],
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=64)
    # The image token ids keep their (out-of-vocabulary) defaults: text prompts never hold them.
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length)


def create_tiny_diffusion_gemma(path: str | Path, *, seed: int = 0, max_denoising_steps: int = 6,
                                confidence_threshold: float = 0.005, stability_threshold: int = 1,
                                init_scale: float = 1.0,
                                **config_kwargs) -> Path:
    """Save config, weights, generation config and tokenizer (with chat template) under ``path``.
    ``init_scale`` > 1 sharpens the random model's distributions, so that several tokens pass the
    entropy bound per step and canvases can stop early, as with a trained model."""
    path = Path(path)
    tokenizer = build_byte_tokenizer()
    config = tiny_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    if init_scale != 1.0:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(init_scale)
    model.generation_config = DiffusionGemmaGenerationConfig(
        max_denoising_steps=max_denoising_steps, sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=0.4, t_max=0.8, stability_threshold=stability_threshold,
        confidence_threshold=confidence_threshold,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
