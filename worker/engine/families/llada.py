"""LLaDA (LLaDA-8B, LLaDA-1.5): a masked diffusion transformer with full bidirectional attention.

diffbatch's own transformers-5 implementation: the published checkpoints ship remote code that does
not load under transformers 5 (ML-GSAI/LLaDA issue #130, ``all_tied_weights_keys``). It reads the
published folders unchanged: the config.json keys of LLaDA's OLMo-style ``ModelConfig`` (``d_model``,
``n_heads``, ``block_type`` ...) and the parameter names ``model.transformer.wte``,
``model.transformer.blocks.N.{q,k,v}_proj`` ... of ``LLaDAModelLM``.

Learnt from the official modeling code (GSAI-ML/LLaDA-8B-Instruct ``modeling_llada.py``, as carried
by NVlabs/Fast-dLLM ``llada/model/``), written anew: the "llama" block (pre-norm attention, then
``ff_out(act(ff_proj(x)) * up_proj(x))``), RoPE rotated in float32 when ``rope_full_precision``,
no causal mask, and logits at the mask's own position (no shift). Options the published
checkpoints do not use (ALiBi, the fused "sequential" block, QK layer norm, block groups) are
refused with ValueError rather than half-supported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init

from .common import (
    FamilyOutput,
    as_attention_mask,
    attend,
    default_position_ids,
    keep_positions,
    key_length_of,
    past_length_of,
    rotary_angles,
    rotate,
)

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
LAYER_NORMS = ("rms", "gemma_rms", "default", "low_precision")


class LLaDAConfig(PretrainedConfig):
    """The keys of LLaDA's config.json (its ``ModelConfig`` fields), with LLaDA's defaults."""

    model_type = "llada"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads",
                     "num_hidden_layers": "n_layers", "max_position_embeddings": "max_sequence_length"}

    d_model: int = 768
    n_heads: int = 12
    n_kv_heads: int | None = None
    n_layers: int = 12
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = None
    activation_type: str = "swiglu"
    block_type: str = "sequential"
    block_group_size: int = 1
    alibi: bool = False
    alibi_bias_max: float = 8.0
    rope: bool = False
    rope_full_precision: bool = True
    flash_attention: bool = False
    attention_dropout: float = 0.1
    multi_query_attention: bool | None = None
    attention_layer_norm: bool = False
    residual_dropout: float = 0.1
    embedding_dropout: float = 0.1
    input_emb_norm: bool = False
    layer_norm_type: str = "default"
    layer_norm_with_affine: bool = True
    rms_norm_eps: float = 1e-05
    attention_layer_norm_with_affine: bool = True
    max_sequence_length: int = 1024
    train_max_sequence_length: int = 1024
    rope_theta: float = 10000.0
    include_qkv_bias: bool | None = False
    include_bias: bool = False
    bias_for_layer_norm: bool | None = None
    scale_logits: bool = False
    vocab_size: int = 50257
    embedding_size: int | None = 50304
    weight_tying: bool = True
    eos_token_id: int | None = 50256
    pad_token_id: int | None = 50256
    mask_token_id: int | None = 50256
    init_device: str | None = None
    init_fn: str = "normal"
    init_std: float = 0.02
    init_cutoff_factor: float | None = None
    precision: str | None = None
    use_cache: bool = False
    # LLaDA ties through ``weight_tying`` (no ff_out at all), never through transformers' tying.
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.tie_word_embeddings = False
        super().__post_init__(**kwargs)

    @property
    def num_key_value_heads(self) -> int:
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    def check_supported(self) -> None:
        """Raise ValueError for options that change the architecture in ways not implemented."""
        problems = [
            (not self.rope or self.alibi, "LLaDA checkpoints use RoPE (rope=true, alibi=false)"),
            (self.block_type != "llama", f"block_type {self.block_type!r} (only 'llama')"),
            (self.block_group_size != 1, "block_group_size > 1"),
            (self.attention_layer_norm, "attention_layer_norm (QK norm)"),
            (self.activation_type not in ACTIVATIONS, f"activation_type {self.activation_type!r}"),
            (self.layer_norm_type not in LAYER_NORMS, f"layer_norm_type {self.layer_norm_type!r}"),
            (self.d_model % self.n_heads != 0, "d_model not a multiple of n_heads"),
            (self.n_heads % self.num_key_value_heads != 0, "n_heads not a multiple of the kv heads"),
        ]
        unsupported = [text for bad, text in problems if bad]
        if unsupported:
            raise ValueError(f"unsupported LLaDA config: {'; '.join(unsupported)}")


class LLaDANorm(nn.Module):
    """LLaDA's layer norms: RMS (``rms``), Gemma RMS (``1 + weight``) or plain LayerNorm."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.kind = config.layer_norm_type
        self.eps = config.rms_norm_eps if self.kind in ("rms", "gemma_rms") else 1e-05
        self.size = config.d_model
        self.weight = nn.Parameter(torch.ones(self.size)) if config.layer_norm_with_affine else None
        use_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        has_bias = config.layer_norm_with_affine and use_bias
        self.bias = nn.Parameter(torch.zeros(self.size)) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("default", "low_precision"):
            return F.layer_norm(x, (self.size,), self.weight, self.bias, self.eps)
        # Normalise in float32 so bf16 activations keep their variance, then scale in the input dtype.
        normed = x.float()
        normed = (normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is None:
            return normed
        scaled = normed * (1 + self.weight) if self.kind == "gemma_rms" else self.weight * normed
        return scaled if self.bias is None else scaled + self.bias


class LLaDALlamaBlock(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.num_heads, self.num_kv_heads = config.n_heads, config.num_key_value_heads
        self.head_dim = config.d_model // config.n_heads
        hidden = config.mlp_hidden_size or config.mlp_ratio * config.d_model
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)
        d, kv = config.d_model, self.num_kv_heads * self.head_dim
        self.attn_norm, self.ff_norm = LLaDANorm(config), LLaDANorm(config)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=config.include_bias)
        self.ff_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.up_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.ff_out = nn.Linear(hidden, d, bias=config.include_bias)
        self.act = ACTIVATIONS[config.activation_type]

    def forward(self, x, cos, sin, attention_mask, past=None, write_offset=None):
        batch, length, _ = x.shape
        normed = self.attn_norm(x)

        def heads(proj, n):  # (B, L, n * D) -> (B, n, L, D)
            return proj(normed).view(batch, length, n, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj, self.num_heads), heads(self.k_proj, self.num_kv_heads), heads(
            self.v_proj, self.num_kv_heads)
        if self.config.rope_full_precision:  # as the official code: rotate in float32, cast back
            q, k = rotate(q.float(), cos, sin).to(q.dtype), rotate(k.float(), cos, sin).to(k.dtype)
        else:
            q, k = rotate(q, cos.to(q.dtype), sin.to(q.dtype)), rotate(k, cos.to(k.dtype), sin.to(k.dtype))
        out, kv = attend(q, k, v, attention_mask, past, write_offset)  # keys cached after RoPE: positions baked in
        x = x + self.attn_out(out.transpose(1, 2).reshape(batch, length, -1))
        normed = self.ff_norm(x)
        return x + self.ff_out(self.act(self.ff_proj(normed)) * self.up_proj(normed)), kv


class LLaDABody(nn.Module):
    """Holds ``transformer`` (a ModuleDict) so parameter names match ``LLaDAModelLM.model``."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        modules = dict(
            wte=nn.Embedding(config.embedding_size or config.vocab_size, config.d_model),
            blocks=nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers)),
            ln_f=LLaDANorm(config),
        )
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.embedding_size or config.vocab_size,
                                          bias=config.include_bias)
        self.transformer = nn.ModuleDict(modules)


class LLaDAPreTrainedModel(PreTrainedModel):
    config_class = LLaDAConfig
    config: LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.init_std  # only for fresh (test) models; checkpoints overwrite it
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LLaDANorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class LLaDAForMaskedDiffusion(LLaDAPreTrainedModel):
    """The mask predictor: logits at every kept position, for the token at that same position."""

    def __init__(self, config: LLaDAConfig):
        config.check_supported()
        super().__init__(config)
        self.model = LLaDABody(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0,
                past_key_values=None, use_cache=False, write_offset=None, **kwargs) -> FamilyOutput:
        config, transformer = self.config, self.model.transformer
        batch, length = input_ids.shape
        past_length = past_length_of(past_key_values) if write_offset is None else write_offset
        if position_ids is None:
            position_ids = default_position_ids(input_ids, past_length)
        mask = as_attention_mask(attention_mask, batch, length, key_length_of(past_key_values, length, write_offset))
        x = transformer.wte(input_ids)  # (B, L, d_model)
        if config.input_emb_norm:
            x = x * config.d_model**0.5
        cos, sin = rotary_angles(position_ids, config.d_model // config.n_heads, config.rope_theta)
        key_values = []
        for i, block in enumerate(transformer.blocks):
            x, kv = block(x, cos, sin, mask, None if past_key_values is None else past_key_values[i], write_offset)
            key_values.append(kv)
        x = transformer.ln_f(keep_positions(x, logits_to_keep))
        logits = F.linear(x, transformer.wte.weight) if config.weight_tying else transformer.ff_out(x)
        if config.scale_logits:
            logits = logits / math.sqrt(config.d_model)
        return FamilyOutput(logits=logits, key_values=key_values if use_cache else None)
