"""SDAR (JetAstra's block diffusion models, e.g. SDAR-1.7B-Chat, SDAR-8B-Chat-b32): block-causal.

A published SDAR folder holds config.json with ``model_type`` "sdar" and Qwen3's keys plus
``block_size``, Qwen3's parameter names (``model.layers.N.self_attn.q_proj``, ``.q_norm``, ...,
``lm_head``) and remote code written for transformers 4. The architecture is Qwen3 (grouped-query
attention, RMSNorm on each query and key head before the rotation, SwiGLU, untied head) with the
causal mask replaced by a block-causal one, which is the built-in model's layout
(builtin/modeling.py, which carries Qwen3's options for this). So this module only maps the
config; the weights load into the built-in model's classes, fused projections and all.

What the engine must do differently, learnt from SDAR's reference sampler (JetAstra/SDAR
``generate.py``) and its modeling code (``modeling_sdar.py``), written anew here:
  - blocks are aligned from position 0: the prompt is not one bidirectional block but its own
    blocks of ``block_length``, block-causal like the rest (its whole blocks are prefilled), and
    the prompt's last partial block opens the first decoded block as fixed tokens
    (``ALIGNED_FAMILIES`` in loader.py; the scheduler's ``lead``);
  - the logit for position i is read at position i (no shift);
  - the [MASK] id is the tokenizer's ``<|MASK|>`` (config.json may name it too).
SDAR's "low_confidence_static" remasking is the ``reference`` sampler, and "low_confidence_dynamic"
is ``threshold``, each with the same ``steps``.
"""

from __future__ import annotations

from ..builtin.configuration import DiffbatchMDMConfig
from ..builtin.modeling import DiffbatchMDMForMaskedDiffusion


class SDARConfig(DiffbatchMDMConfig):
    """SDAR-1.7B-Chat's config.json keys and defaults; ``block_size`` is the block it was trained
    with, which the engine uses unless a request names another."""

    model_type = "sdar"

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    qk_norm: bool = True
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    block_size: int = 4
    mask_token_id: int | None = None
    diffbatch_family: str = "sdar"

    def __post_init__(self, **kwargs):
        self.block_length = self.block_size
        super().__post_init__(**kwargs)

    def check_supported(self) -> None:
        self.refuse_unsupported("SDAR", [(self.attention_bias, "attention bias"),
                                         (not self.qk_norm, "no query/key norm")])


class SDARForBlockDiffusion(DiffbatchMDMForMaskedDiffusion):
    config_class = SDARConfig
    config: SDARConfig

    def __init__(self, config: SDARConfig):
        config.check_supported()
        super().__init__(config)
