"""The built-in block-causal masked diffusion transformer.

A small pre-norm transformer (RMSNorm, rotary positions, SwiGLU MLP) with no built-in causal mask:
the caller passes the attention layout. The denoising engine builds a block-causal mask (a
bidirectional prompt block, then bidirectional generation blocks that see only earlier blocks), the
layout of SDAR / Fast-dLLM v2 style block diffusion models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration import DiffbatchMDMConfig, resolved


class DiffbatchMDMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16 activations do not lose the variance; torch's rms_norm is one
        # fused kernel on CUDA, where the five-op spelling was five launches per norm.
        x = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=self.eps)
        return self.weight * x.to(hidden.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for ``position_ids`` (B, L), each (B, L, rotary_dim)."""
    # Computed on the fly rather than kept in a buffer: it is cheap, and non-persistent buffers are
    # easy to lose when transformers materialises a model from meta tensors.
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32) / rotary_dim)
    )
    freqs = position_ids[..., None].float() * inv_freq  # (B, L, rotary_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, L, rotary_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, L, D) by the position tables (B, L, R): its first R dimensions (all of
    them unless the model rotates only part of each head, as LLaDA2 does), the rest pass through."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    half = rotary_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class DiffbatchMDMAttention(nn.Module):
    """Attention with one fused q/k/v projection (``qkv_proj``), rotary over queries and keys together;
    options: grouped-query heads and per-head q/k RMSNorm (Qwen3's, for SDAR), projection biases and a
    partial rotation (LLaDA2's)."""

    # A denoising step is many small forwards, and on an accelerator each costs launches, not arithmetic.
    # Checkpoints keep separate q_proj/k_proj/v_proj tensors; the conversion in ``__init__.py`` joins them.

    def __init__(self, config: DiffbatchMDMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, resolved(config.num_key_value_heads)
        self.head_dim = resolved(config.head_dim)
        self.qkv_proj = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                  bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = DiffbatchMDMRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = DiffbatchMDMRMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, hidden, cos, sin, attention_mask, past=None, write_offset=None):
        """The output and (keys, values) of past + these tokens, (B, H_kv, Lpast + L, D) each. With
        ``write_offset``, ``past`` is a buffer: these tokens' keys and values go to its columns
        [write_offset, write_offset + L) in place (a step copies L columns, not the cache)."""
        batch, length, _ = hidden.shape
        queries_keys = self.num_heads + self.num_kv_heads
        heads = self.qkv_proj(hidden).view(batch, length, queries_keys + self.num_kv_heads, self.head_dim)
        qk = heads[:, :, :queries_keys]
        if self.qk_norm:  # one norm over query and key heads, each scaled by its own weight
            weight = torch.cat([self.q_norm.weight.expand(self.num_heads, -1),
                                self.k_norm.weight.expand(self.num_kv_heads, -1)])  # (Hq + Hkv, D)
            qk = weight * F.rms_norm(qk.float(), (self.head_dim,), eps=self.q_norm.eps).to(qk.dtype)
        q, k = apply_rotary(qk.transpose(1, 2), cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        v = heads[:, :, queries_keys:].transpose(1, 2)
        if write_offset is not None:
            end = write_offset + length
            past[0][:, :, write_offset:end], past[1][:, :, write_offset:end] = k, v
            k, v = past[0][:, :, :end], past[1][:, :, :end]
        elif past is not None:  # keys of earlier, finished blocks: exact, they never attend forward
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # No is_causal: masked diffusion attends both ways; the mask alone decides the layout.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask,
                                             enable_gqa=self.num_kv_heads != self.num_heads)  # (B, H, L, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), (k, v)


class DiffbatchMDMMLP(nn.Module):
    """SwiGLU with the gate and up projections fused (``gate_up_proj``, split on save like qkv)."""

    def __init__(self, config: DiffbatchMDMConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden):
        gate, up = self.gate_up_proj(hidden).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DiffbatchMDMLayer(nn.Module):
    def __init__(self, config: DiffbatchMDMConfig, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = DiffbatchMDMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DiffbatchMDMAttention(config)
        self.post_attention_layernorm = DiffbatchMDMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(self, hidden, cos, sin, attention_mask, past=None, write_offset=None):
        attended, kv = self.self_attn(self.input_layernorm(hidden), cos, sin, attention_mask, past, write_offset)
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), kv


class DiffbatchMDMPreTrainedModel(PreTrainedModel):
    config_class = DiffbatchMDMConfig
    config: DiffbatchMDMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DiffbatchMDMLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # transformers' init helpers skip tensors already loaded from a checkpoint.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DiffbatchMDMRMSNorm):
            init.ones_(module.weight)


class DiffbatchMDMModel(DiffbatchMDMPreTrainedModel):
    """The transformer body: token ids in, final normalised hidden states out."""

    def __init__(self, config: DiffbatchMDMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DiffbatchMDMLayer(config, self.layer_mlp(config, index))
                                    for index in range(config.num_hidden_layers))
        self.norm = DiffbatchMDMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def layer_mlp(self, config: DiffbatchMDMConfig, index: int) -> nn.Module:
        """The feed-forward block of layer ``index``; a family with experts overrides it (LLaDA2)."""
        return DiffbatchMDMMLP(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, write_offset=None,
                use_cache=False):
        """Hidden states (B, L, hidden) and, with ``use_cache``, per layer (keys, values) of past + these
        tokens. ``past_key_values``: per layer (B, H, Lpast, D); the mask then covers Lpast + L keys and
        ``position_ids`` must be given; with ``write_offset`` they are buffers written in place."""
        batch, length = input_ids.shape
        past_length = (0 if past_key_values is None else
                       write_offset if write_offset is not None else past_key_values[0][0].shape[2])
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length,
                                        device=input_ids.device).expand(batch, length)
        attention_mask = _as_attention_mask(attention_mask, batch, length, past_length + length)
        hidden = self.embed_tokens(input_ids)  # (B, L, hidden)
        if attention_mask is not None:
            # Additive once here: attention turns a bool mask into this form in every layer, each time.
            attention_mask = torch.zeros(attention_mask.shape, dtype=hidden.dtype, device=hidden.device
                                         ).masked_fill_(~attention_mask, torch.finfo(hidden.dtype).min)
        cos, sin = rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta, hidden.dtype)
        key_values = []
        for i, layer in enumerate(self.layers):
            hidden, kv = layer(hidden, cos, sin, attention_mask, None if past_key_values is None
                               else past_key_values[i], write_offset)
            if use_cache and past_key_values is None:
                # A prefill's keys and values are views into the layer's whole q/k/v projection; kept
                # as they are, the cache held those (2.6x its size for the built-in model).
                kv = (kv[0].contiguous(), kv[1].contiguous())
            key_values.append(kv if use_cache else None)
        return self.norm(hidden), key_values


def _as_attention_mask(attention_mask, batch: int, length: int, key_length: int):
    """Normalise the mask to a bool (B, 1, Lq, Lk) tensor, True = may attend; None = full attention.

    A 2-D (B, L) mask is read as key padding (True/1 = real token), the usual transformers meaning.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if attention_mask.shape != (batch, key_length):
            raise ValueError(f"a 2-D attention_mask must be (B, Lk) = {(batch, key_length)}")
        return attention_mask.bool()[:, None, None, :]
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (length, key_length):
        raise ValueError(
            f"attention_mask must be (B, Lk) or (B, 1, Lq, Lk) with Lq = {length}, Lk = {key_length}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool:
        raise ValueError("a 4-D attention_mask must be a bool tensor (True = may attend)")
    return attention_mask


@dataclass
class DiffbatchMDMOutput(ModelOutput):
    """Logits, and with ``use_cache`` the per-layer (keys, values) of past + input positions.

    (Not named ``past_key_values``: transformers 5's ModelOutput renames that field to ``cache``.)
    """

    logits: torch.Tensor | None = None
    key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class DiffbatchMDMForMaskedDiffusion(DiffbatchMDMPreTrainedModel):
    """The mask predictor: logits over the vocabulary at every kept position. ``logits_to_keep`` (int)
    projects the last N positions only (the active block); ``logits_at`` (B, n) narrows them to those
    positions of each row (the still-masked ones), logits (B, n, V)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    body_class = DiffbatchMDMModel

    def __init__(self, config: DiffbatchMDMConfig):
        super().__init__(config)
        self.model = self.body_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        use_cache: bool = False,
        write_offset: int | None = None,
        logits_at: torch.Tensor | None = None,
        **kwargs,
    ) -> DiffbatchMDMOutput:
        hidden, key_values = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                        past_key_values=past_key_values, write_offset=write_offset,
                                        use_cache=use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if logits_at is not None:
            hidden = hidden.gather(1, logits_at[..., None].expand(-1, -1, hidden.shape[-1]))
        return DiffbatchMDMOutput(logits=self.lm_head(hidden),  # (B, L or logits_to_keep or n, V)
                                  key_values=key_values if use_cache else None)
