"""Write the tiny randomly initialised built-in checkpoint.

Tests and benchmarks use it: it exercises the whole pipeline (loading, batching, denoising,
decoding) offline in seconds, but its generations are noise. The trained default model ships in
``diffbatch-py-mini/`` beside this file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .configuration import DiffbatchMDMConfig
from .modeling import DiffbatchMDMForMaskedDiffusion
from .tokenizer import build_byte_tokenizer

TINY_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=176,
    max_position_embeddings=2048,
    block_length=32,
)


def config_for(tokenizer, *, name: str, **shape) -> DiffbatchMDMConfig:
    """A built-in model config whose vocabulary and special ids are ``tokenizer``'s."""
    return DiffbatchMDMConfig(
        vocab_size=len(tokenizer),
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        diffbatch_family="block_causal",
        diffbatch_name=name,
        **shape,
    )


def create_tiny_random_model(
    path: str | Path, *, seed: int = 0, name: str = "diffbatch-tiny-random"
) -> Path:
    """Write config.json, model.safetensors and tokenizer files (with chat template) to ``path``.

    The weights depend only on ``seed`` (a private generator, so global RNG state is untouched).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_byte_tokenizer()
    tokenizer.model_max_length = TINY_SHAPE["max_position_embeddings"]
    config = config_for(tokenizer, name=name, **TINY_SHAPE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffbatchMDMForMaskedDiffusion(config)
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
