"""Dream (Dream-v0, DiffuCoder): a masked diffusion model adapted from an autoregressive Qwen2.

diffbatch's own transformers-5 implementation: the published checkpoints ship remote code written
for transformers 4. It reads the published folders unchanged: config.json with ``model_type``
"Dream" and Qwen2's keys, parameters ``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``
(with bias), ``model.layers.N.mlp.gate_proj`` ... and ``lm_head``.

Learnt from the official modeling code (Dream-org/Dream-v0-Instruct-7B ``modeling_dream.py`` and
``generation_utils.py``, as carried by NVlabs/Fast-dLLM ``dream/model/``), written anew: a Qwen2
decoder (RMSNorm, q/k/v with bias, SwiGLU MLP, rotate-half RoPE with cos/sin cast to the activation
dtype) without a causal mask. Dream keeps its AR parent's output alignment: the logit for position i
is read from position i - 1 (``LOGITS_SHIFT``); this model returns the raw, unshifted logits and the
engine applies the shift when it picks the active block's logits.

Dream's ``diffusion_generate`` builds its settings from the model config, where transformers 4 puts
top_k=50 on every config: every step, at any temperature, both x0 and the confidence that ranks the
positions come from the 50 largest logits, renormalised (``SAMPLING_TOP_K``; the samplers apply it).
"""

from __future__ import annotations

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

# Dream predicts the token at position i from the hidden state at position i - 1.
LOGITS_SHIFT = 1
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
# Official generation's top-k (module docstring). transformers 5 drops generation keys from a config,
# so a config.json that names its own top_k is not read (Dream-v0-Instruct-7B's names none).
SAMPLING_TOP_K = 50


class DreamConfig(PretrainedConfig):
    """The keys of Dream's config.json (Qwen2's, plus ``mask_token_id``), with Dream's defaults.

    Legacy ``rope_theta`` / ``rope_scaling`` keys are folded into ``rope_parameters`` by
    transformers 5, as for its own Qwen2Config.
    """

    model_type = "Dream"

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = False
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    attention_dropout: float | int = 0.0
    mask_token_id: int | None = 151666
    pad_token_id: int | None = 151643
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    @property
    def kv_heads(self) -> int:
        """num_key_value_heads, the attention heads' count when config.json leaves it out."""
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def rope_base(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))

    def check_supported(self) -> None:
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        problems = [
            (rope_type != "default", f"rope scaling {rope_type!r}"),
            (self.use_sliding_window, "sliding-window attention"),
            (self.hidden_act not in ACTIVATIONS, f"hidden_act {self.hidden_act!r}"),
            (self.hidden_size % self.num_attention_heads != 0, "hidden_size not a multiple of the heads"),
            (self.num_attention_heads % self.kv_heads != 0, "heads not a multiple of kv heads"),
        ]
        unsupported = [text for bad, text in problems if bad]
        if unsupported:
            raise ValueError(f"unsupported Dream config: {'; '.join(unsupported)}")


class DreamRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.kv_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        d, kv = config.hidden_size, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, kv, bias=True)
        self.v_proj = nn.Linear(d, kv, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, hidden, cos, sin, attention_mask, past=None, write_offset=None):
        batch, length, _ = hidden.shape

        def heads(proj, n):  # (B, L, n * D) -> (B, n, L, D)
            return proj(hidden).view(batch, length, n, self.head_dim).transpose(1, 2)

        q = rotate(heads(self.q_proj, self.num_heads), cos, sin)
        k = rotate(heads(self.k_proj, self.num_kv_heads), cos, sin)
        out, kv = attend(q, k, heads(self.v_proj, self.num_kv_heads), attention_mask, past, write_offset)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), kv


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.self_attn = DreamAttention(config)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, cos, sin, attention_mask, past=None, write_offset=None):
        attended, kv = self.self_attn(self.input_layernorm(hidden), cos, sin, attention_mask, past, write_offset)
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), kv


class DreamPreTrainedModel(PreTrainedModel):
    config_class = DreamConfig
    config: DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range  # only for fresh (test) models; checkpoints overwrite it
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DreamRMSNorm):
            init.ones_(module.weight)


class DreamBody(nn.Module):
    """``model.*`` of the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)


class DreamForMaskedDiffusion(DreamPreTrainedModel):
    """The mask predictor; ``logits[:, i]`` scores the token at position i + 1 (see LOGITS_SHIFT).
    ``sampling_top_k``: the candidates a step samples from and scores, as Dream's generation has them."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    logits_shift = LOGITS_SHIFT
    sampling_top_k = SAMPLING_TOP_K

    def __init__(self, config: DreamConfig):
        config.check_supported()
        super().__init__(config)
        self.model = DreamBody(config)
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

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0,
                past_key_values=None, use_cache=False, write_offset=None, **kwargs) -> FamilyOutput:
        batch, length = input_ids.shape
        past_length = past_length_of(past_key_values) if write_offset is None else write_offset
        if position_ids is None:
            position_ids = default_position_ids(input_ids, past_length)
        mask = as_attention_mask(attention_mask, batch, length, key_length_of(past_key_values, length, write_offset))
        hidden = self.model.embed_tokens(input_ids)  # (B, L, hidden)
        cos, sin = rotary_angles(position_ids, self.config.hidden_size // self.config.num_attention_heads,
                                 self.config.rope_base)
        cos, sin = cos.to(hidden.dtype), sin.to(hidden.dtype)  # as Qwen2: tables in the activation dtype
        key_values = []
        for i, layer in enumerate(self.model.layers):
            past = None if past_key_values is None else past_key_values[i]
            hidden, kv = layer(hidden, cos, sin, mask, past, write_offset)
            key_values.append(kv)
        hidden = self.model.norm(keep_positions(hidden, logits_to_keep))
        return FamilyOutput(logits=self.lm_head(hidden), key_values=key_values if use_cache else None)
