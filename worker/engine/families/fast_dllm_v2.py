"""Fast-dLLM v2 (NVlabs' Fast_dLLM_v2_7B, ``model_type`` "Fast_dLLM_Qwen"): block-causal, AR-initialised.

A published folder holds Qwen2.5's config.json keys plus ``bd_size`` (its block, 32), Qwen2's
parameter names (q/k/v projections with biases, the output projection without, an untied head)
and remote code written for transformers 4. So the architecture is the built-in model's classes
with a bias on the fused q/k/v projection; this module maps the config and the biases.

How it decodes, read from its modeling code and published sampler (``batch_sample``) and written
anew in the engine (an aligned family with ``LOGITS_SHIFT`` 1 and ``AR_FIRST_FAMILIES``, loader.py):
  - blocks are cut from position 0 as SDAR's; the prompt's whole blocks are prefilled
    block-causally and its last partial block opens the first decoded block;
  - it was trained from an autoregressive model with the causal shift kept: the output at position
    i predicts token i + 1, so a masked position reads the logits of the position before it;
  - a block's first position is therefore never denoised: it is the greedy next token of the
    previous clean block's last position (or of the prompt's, when the prompt fills whole blocks);
  - within a block, sub-blocks of ``small_block_size`` (8) are decoded left to right, each with the
    ``threshold`` rule; ``diffbatch_sub_block`` carries that size.
"""

from __future__ import annotations

from transformers.core_model_loading import Concatenate, WeightConverter

from ..builtin import fused_projections
from ..builtin.configuration import DiffbatchMDMConfig
from ..builtin.modeling import DiffbatchMDMForMaskedDiffusion


class FastDLLMv2Config(DiffbatchMDMConfig):
    """Fast_dLLM_v2_7B's config.json keys (Qwen2.5-7B-Instruct's plus ``bd_size``) and defaults."""

    model_type = "Fast_dLLM_Qwen"

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    bd_size: int = 32
    mask_token_id: int | None = None  # the tokenizer's |<MASK>| (loader.py)
    diffbatch_sub_block: int = 8  # the published sampler's small_block_size
    diffbatch_family: str = "fast_dllm_v2"

    def __post_init__(self, **kwargs):
        self.block_length = self.bd_size
        super().__post_init__(**kwargs)

    def check_supported(self) -> None:
        self.refuse_unsupported("Fast-dLLM v2", [
            (self.bd_size % self.diffbatch_sub_block != 0,
             f"bd_size {self.bd_size} not a multiple of the sub-block {self.diffbatch_sub_block}")])


class FastDLLMv2ForBlockDiffusion(DiffbatchMDMForMaskedDiffusion):
    config_class = FastDLLMv2Config
    config: FastDLLMv2Config

    def __init__(self, config: FastDLLMv2Config):
        config.check_supported()
        super().__init__(config)


def fast_dllm_v2_weight_names() -> list:
    """Qwen2's separate q/k/v weights and biases joined into the fused projection, gate/up likewise."""
    return [*fused_projections(),
            WeightConverter(source_patterns=[f"self_attn.{p}_proj.bias" for p in "qkv"],
                            target_patterns="self_attn.qkv_proj.bias", operations=[Concatenate(dim=0)])]
