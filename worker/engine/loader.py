"""Load a local checkpoint folder: the only place the engine touches the disk.

Everything is read with ``local_files_only=True``: workers run on-prem without a hub connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

# Registers the built-in model type with the Auto classes before anything is loaded.
import worker.engine.builtin  # noqa: F401

# model_type -> attention family, for checkpoints that do not record `diffbatch_family`.
FAMILIES_BY_MODEL_TYPE = {"diffbatch_mdm": "block_causal"}
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    config: Any
    name: str
    family: str
    max_positions: int
    mask_token_id: int
    eos_token_id: int | None
    pad_token_id: int


def load_model(
    path: str, *, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False
) -> LoadedModel:
    """Load config, tokenizer and weights from the folder ``path`` and put the model in eval mode.

    dtype "auto" is bfloat16 on CUDA and float32 elsewhere.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"model path {str(path)!r} does not exist or is not a folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model path {str(path)!r} has no config.json")
    torch_dtype = _resolve_dtype(dtype, device)

    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(folder, **kwargs)
    family = getattr(config, "diffbatch_family", None) or FAMILIES_BY_MODEL_TYPE.get(config.model_type)
    if family is None:
        raise ValueError(f"model type {config.model_type!r} is not a supported diffusion model family")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    mask_token_id = _first_id(getattr(config, "mask_token_id", None), tokenizer.mask_token_id)
    if mask_token_id is None:
        raise ValueError(f"model at {str(path)!r} defines no mask token (config.mask_token_id)")
    eos_token_id = _first_id(getattr(config, "eos_token_id", None), tokenizer.eos_token_id)
    pad_token_id = _first_id(getattr(config, "pad_token_id", None), tokenizer.pad_token_id, eos_token_id)
    if pad_token_id is None:
        raise ValueError(f"model at {str(path)!r} defines neither a pad nor an eos token")

    model = AutoModelForMaskedLM.from_pretrained(folder, config=config, dtype=torch_dtype, **kwargs)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        name=getattr(config, "diffbatch_name", None) or folder.resolve().name,
        family=family,
        max_positions=int(config.max_position_embeddings),
        mask_token_id=mask_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def _resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _first_id(*candidates) -> int | None:
    """The first id that is set; configs may hold a list of eos ids, the first one is used."""
    for candidate in candidates:
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return None
