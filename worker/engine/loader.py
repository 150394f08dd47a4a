"""Load a local checkpoint folder: the only place the engine touches the disk.

Everything is read with ``local_files_only=True``: workers run on-prem without a hub connection.
Two kinds of checkpoints: masked diffusion models (AutoModelForMaskedLM, e.g. the built-in
block-causal one) and DiffusionGemma (``DiffusionGemmaForBlockDiffusion``, native in transformers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

# Registers the built-in model type with the Auto classes before anything is loaded.
import worker.engine.builtin  # noqa: F401

# Registers diffbatch's own LLaDA ("llada"), Dream ("Dream"), SDAR ("sdar"), LLaDA2 ("llada2_moe") and
# Fast-dLLM v2 ("Fast_dLLM_Qwen") implementations likewise.
import worker.engine.families  # noqa: F401

# model_type -> attention family, for checkpoints that do not record `diffbatch_family`.
FAMILIES_BY_MODEL_TYPE = {
    "diffbatch_mdm": "block_causal",
    "diffusion_gemma": "diffusion_gemma",
    "llada": "llada",  # LLaDA-8B, LLaDA-1.5: full attention, logits at the mask's position
    "Dream": "dream",  # Dream-v0, DiffuCoder: full attention, logits shifted by one
    "sdar": "sdar",  # SDAR: block-causal, blocks aligned from position 0 (families/sdar.py)
    "llada2_moe": "llada2",  # LLaDA2.0: as SDAR, with experts (families/llada2.py)
    "Fast_dLLM_Qwen": "fast_dllm_v2",  # Fast-dLLM v2: as SDAR, logits shifted by one (families/fast_dllm_v2.py)
}
# Families whose every token attends to every token (approximate prefix / dual KV caches).
FULL_ATTENTION_FAMILIES = ("llada", "dream")
# Block-causal families whose blocks are aligned from position 0, the prompt included: its whole
# blocks are prefilled block-causally and its last partial block opens the first decoded block.
# (The built-in model's prompt is one bidirectional block instead.)
ALIGNED_FAMILIES = ("sdar", "llada2", "fast_dllm_v2")
# Families whose logit for position i is read at position i - LOGITS_SHIFT (AR-initialised models). A
# block-causal one opens each block with the greedy prediction of the position before it (schedulers/block.py).
LOGITS_SHIFT = {"dream": 1, "fast_dllm_v2": 1}
# Model types diffbatch implements itself: their folders' remote code (written for transformers 4)
# is never run, whatever the caller's trust_remote_code.
OWN_MODEL_TYPES = ("diffbatch_mdm", "llada", "Dream", "sdar", "llada2_moe", "Fast_dLLM_Qwen")
# The [MASK] token's spelling in families whose tokenizer does not name it (their samplers take the id
# as an argument: LLaDA2's 156895, Fast-dLLM v2's 151665).
MASK_SPELLING = {"llada2": "<|mask|>", "fast_dllm_v2": "|<MASK>|"}
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
    mask_token_id: int | None  # None for uniform-noise models (DiffusionGemma has no [MASK])
    eos_token_id: int | None
    pad_token_id: int
    # Every end-of-sequence id (chat checkpoints often have several, e.g. <eos> and <end_of_turn>).
    eos_token_ids: tuple[int, ...] = ()


def load_model(
    path: str, *, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False, weights: bool = True
) -> LoadedModel:
    """Config, tokenizer and weights from the folder ``path``, the model in eval mode. dtype "auto": bfloat16
    on CUDA, float32 elsewhere. ``weights=False``: the model on the meta device, enough to tokenize and
    check requests in no memory (the control process)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"model path {str(path)!r} does not exist or is not a folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model path {str(path)!r} has no config.json")
    torch_dtype = _resolve_dtype(dtype, device)

    if _model_type(folder) in OWN_MODEL_TYPES:
        trust_remote_code = False
    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(folder, **kwargs)
    family = getattr(config, "diffbatch_family", None) or FAMILIES_BY_MODEL_TYPE.get(config.model_type)
    if family is None:
        raise ValueError(f"model type {config.model_type!r} is not a supported diffusion model family")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if family == "diffusion_gemma":
        return _load_diffusion_gemma(folder, config, tokenizer, device=device, dtype=torch_dtype, weights=weights)
    mask_token_id = _first_id(getattr(config, "mask_token_id", None), tokenizer.mask_token_id,
                              _vocabulary_id(tokenizer, MASK_SPELLING.get(family)))
    if mask_token_id is None:
        raise ValueError(f"model at {str(path)!r} defines no mask token (config.mask_token_id)")
    eos_token_ids = _eos_ids(folder, config, tokenizer)
    eos_token_id = eos_token_ids[0] if eos_token_ids else None
    pad_token_id = _first_id(getattr(config, "pad_token_id", None), tokenizer.pad_token_id, eos_token_id)
    if pad_token_id is None:
        raise ValueError(f"model at {str(path)!r} defines neither a pad nor an eos token")

    if not weights:
        model = _skeleton(AutoModelForMaskedLM, config, torch_dtype, trust_remote_code=trust_remote_code)
    else:
        model = _load_weights(folder, config, torch_dtype, device, kwargs)
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
        eos_token_ids=eos_token_ids,
    )


def _skeleton(auto_class, config, dtype: torch.dtype, **kwargs):
    """The model's modules with meta tensors: its shapes and code, no memory and no weights."""
    with torch.device("meta"):
        return auto_class.from_config(config, dtype=dtype, **kwargs).eval()


def _load_weights(folder: Path, config, torch_dtype: torch.dtype, device: str, kwargs: dict):
    path = str(folder)
    try:
        model, loading = AutoModelForMaskedLM.from_pretrained(folder, config=config, dtype=torch_dtype,
                                                              output_loading_info=True, **kwargs)
    except RuntimeError as error:  # e.g. stacking LLaDA2's experts with one of their tensors missing
        if "conversion" not in str(error):
            raise
        raise ValueError(f"model at {str(path)!r}: its tensors could not be assembled into the weights its "
                         f"model_type {config.model_type!r} needs (one missing or of another shape; the loading "
                         "report logged above names it)") from error
    # transformers fills a parameter the folder lacks with random values and only logs it: a
    # checkpoint of another layout (a variant with other parameter names) would generate noise.
    missing = sorted(loading["missing_keys"])
    if missing:
        raise ValueError(f"model at {str(path)!r} lacks {len(missing)} of the weights its model_type "
                         f"{config.model_type!r} needs, e.g. {missing[:3]}")
    return model.to(device).eval()


def _load_diffusion_gemma(folder: Path, config, tokenizer, *, device: str, dtype: torch.dtype,
                          weights: bool = True) -> LoadedModel:
    """DiffusionGemma: text only; ids from generation_config.json first (what ``generate`` uses)."""
    from transformers import DiffusionGemmaForBlockDiffusion, GenerationConfig

    # sdpa: the DiffusionGemma engine passes explicit boolean 4D masks (per-row prefixes).
    model: Any  # transformers' wrapped nn.Module.to does not type-check on a concrete model class
    if weights:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            folder, config=config, dtype=dtype, local_files_only=True, attn_implementation="sdpa")
        model.to(device).eval()
        generation = model.generation_config
    else:
        with torch.device("meta"):
            model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.eval()
        generation = (GenerationConfig.from_pretrained(folder, local_files_only=True)
                      if (folder / "generation_config.json").is_file() else GenerationConfig.from_model_config(config))
    text_config = config.get_text_config()
    eos_ids = _all_ids(generation.eos_token_id, text_config.eos_token_id, tokenizer.eos_token_id)
    pad_token_id = _first_id(generation.pad_token_id, text_config.pad_token_id, tokenizer.pad_token_id,
                             eos_ids[0] if eos_ids else None)
    if pad_token_id is None:
        raise ValueError(f"model at {str(folder)!r} defines neither a pad nor an eos token")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        name=getattr(config, "diffbatch_name", None) or folder.resolve().name,
        family="diffusion_gemma",
        max_positions=int(text_config.max_position_embeddings),
        mask_token_id=None,
        eos_token_id=eos_ids[0] if eos_ids else None,
        pad_token_id=pad_token_id,
        eos_token_ids=eos_ids,
    )


# Chat checkpoints end a turn with a token of their own that their configs often leave out of
# eos_token_id (LLaDA-8B-Instruct lists <|endoftext|> and ends turns with <|eot_id|>; Dream-Instruct
# likewise with <|im_end|>). A turn's end ends the completion: no blocks are spent after it.
TURN_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>")


def _eos_ids(folder: Path, config, tokenizer) -> tuple[int, ...]:
    """generation_config.json's eos ids (what ``generate`` stops at), else config.json's, else the
    tokenizer's; plus the tokenizer's end-of-turn token when it has one of TURN_END_TOKENS."""
    generation = None
    if (folder / "generation_config.json").is_file():
        generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    ids = list(_all_ids(generation, getattr(config, "eos_token_id", None), tokenizer.eos_token_id))
    vocabulary = tokenizer.get_vocab()
    ids += [vocabulary[t] for t in TURN_END_TOKENS if t in vocabulary and vocabulary[t] not in ids]
    return tuple(ids)


def _all_ids(*candidates) -> tuple[int, ...]:
    """The first candidate that is set, as a tuple (an id or a list of ids)."""
    for candidate in candidates:
        if candidate is None:
            continue
        ids = candidate if isinstance(candidate, (list, tuple)) else [candidate]
        if ids:
            return tuple(int(i) for i in ids)
    return ()


def _model_type(folder: Path) -> str | None:
    """config.json's model_type, read before transformers resolves any remote code."""
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # let AutoConfig report the broken file


def _resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _vocabulary_id(tokenizer, text: str | None) -> int | None:
    """The id of the token spelled ``text``, or None where the vocabulary has no such token."""
    if text is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(text)
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id


def _first_id(*candidates) -> int | None:
    """The first id that is set; configs may hold a list of eos ids, the first one is used."""
    for candidate in candidates:
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return None
