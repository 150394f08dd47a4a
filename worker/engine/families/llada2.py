"""LLaDA2 (inclusionAI's LLaDA2.0-mini / -flash, ``model_type`` "llada2_moe"): block-causal, with experts.

A published folder holds config.json with the keys of its ``LLaDA2MoeConfig``, the parameter names of
its ``modeling_llada2_moe.py`` (``model.word_embeddings``, ``model.layers.N.attention.query_key_value``,
``.mlp.experts.E.gate_proj``, ...) and that remote code, written for transformers 4. What the
architecture is, read from that modeling code and rewritten here:
  - the attention of Qwen3 (fused q/k/v in that order, grouped-query heads, RMSNorm on each query and
    key head before the rotation), except that only the first ``partial_rotary_factor`` of each head
    rotates, and the q/k/v and output projections may carry biases (``use_qkv_bias``, ``use_bias``);
  - the first ``first_k_dense_replace`` layers have a SwiGLU MLP; the others a mixture of experts:
    a sigmoid router with a bias used only to choose (``expert_bias``), experts chosen within the
    ``topk_group`` best of ``n_group`` groups (a group scores the sum of its two best experts), the
    chosen experts' sigmoid scores normalised to sum to one and scaled by ``routed_scaling_factor``,
    plus shared experts that every token passes through;
  - an untied head, logits read at the masked position (no shift).
Its sampler (the model's ``generate``) lays blocks from position 0 like SDAR's, so the engine treats
it as an aligned family (``ALIGNED_FAMILIES`` in loader.py): the prompt's whole blocks are prefilled
block-causally and its last partial block opens the first decoded block. Its rule at temperature 0 is the
``threshold`` sampler with the same ``steps`` (its default: 32 for blocks of 32): commit every masked
position whose confidence clears the threshold (0.95 by default), or if they are fewer the
block / steps most confident ones. The attention and dense layers are the built-in model's classes; only the
router and experts are new here, the experts on transformers' experts kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming
from transformers.integrations.moe import use_experts_implementation

from ..builtin.configuration import DiffbatchMDMConfig, resolved
from ..builtin.modeling import DiffbatchMDMForMaskedDiffusion, DiffbatchMDMMLP, DiffbatchMDMModel


class LLaDA2Config(DiffbatchMDMConfig):
    """The keys of LLaDA2's config.json, with the defaults of its own config class (a key a
    published file leaves out means what it meant there: ``use_bias`` true, for one)."""

    model_type = "llada2_moe"

    vocab_size: int = 30592
    hidden_size: int = 1024
    intermediate_size: int | None = None  # type: ignore[assignment]  # only the dense layers read it
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 0  # 0: one per query head
    head_dim: int | None = None
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    use_bias: bool = True
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 16384
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    num_experts: int | None = 16
    num_shared_experts: int | None = 0
    num_experts_per_tok: int = 2
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    pad_token_id: int | None = 126081
    mask_token_id: int | None = None  # the tokenizer's <|mask|> (loader.py)
    diffbatch_family: str = "llada2"

    def __post_init__(self, **kwargs):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.qk_norm, self.qkv_bias, self.o_proj_bias = self.use_qk_norm, self.use_qkv_bias, self.use_bias
        super().__post_init__(**kwargs)

    def check_supported(self) -> None:
        problems = [(self.score_function != "sigmoid", f"router score_function {self.score_function!r}")]
        if self.num_experts:  # the router's groups must hold the experts it picks
            per_group = self.num_experts // self.n_group if self.n_group else 0
            problems += [
                (not self.n_group or self.num_experts % self.n_group != 0,
                 f"{self.num_experts} experts in {self.n_group} groups"),
                (not 0 < self.topk_group <= self.n_group, f"topk_group {self.topk_group} of {self.n_group} groups"),
                (per_group < 2, "fewer than 2 experts a group (a group scores its two best)"),
                (not 0 < self.num_experts_per_tok <= self.topk_group * per_group,
                 f"num_experts_per_tok {self.num_experts_per_tok} from {self.topk_group} groups of {per_group}"),
                (not self.moe_intermediate_size, "no moe_intermediate_size"),
            ]
        self.refuse_unsupported("LLaDA2", problems)


class LLaDA2Expert(nn.Module):
    """The shared experts (one SwiGLU), with the checkpoint's separate gate and up projections so the
    published tensors load under their own names."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden):
        return self.down_proj(F.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class LLaDA2Router(nn.Module):
    """Chooses ``num_experts_per_tok`` experts a token and weighs them (float32 throughout, as the
    published router computes)."""

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.scaling = config.routed_scaling_factor
        experts = resolved(config.num_experts)
        self.weight = nn.Parameter(torch.empty(experts, config.hidden_size))
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(experts))
        else:
            self.expert_bias = None

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (T, hidden) -> the chosen experts (T, k), best first, and their weights (T, k) float32.
        No host sync (a CUDA graph can hold it)."""
        scores = F.linear(tokens.float(), self.weight.float()).sigmoid()  # (T, E)
        biased = scores if self.expert_bias is None else scores + self.expert_bias
        grouped = biased.view(len(tokens), self.n_group, -1)  # (T, G, E / G)
        best_groups = grouped.topk(2, dim=-1).values.sum(dim=-1).topk(self.topk_group, dim=-1).indices
        allowed = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
        biased = biased.masked_fill(~allowed.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        chosen = biased.topk(self.top_k, dim=-1).indices  # (T, k)
        weights = scores.gather(1, chosen)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen, weights * self.scaling


@use_experts_implementation
class LLaDA2RoutedExperts(nn.Module):
    """The routed experts' weights stacked, (E, 2 * inner, hidden) and (E, hidden, inner), for transformers'
    experts kernels (``grouped_mm`` by default: no host sync, so a CUDA graph can hold it); ``forward`` is
    the ``experts_implementation="eager"`` path: each expert once on the tokens routed to it."""
    # The published per-expert tensors are stacked on load (llada2_weight_names).

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.num_experts, inner = resolved(config.num_experts), resolved(config.moe_intermediate_size)
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * inner, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, inner))
        self.act_fn = F.silu

    def forward(self, tokens: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        mixed = torch.zeros_like(tokens, dtype=torch.float32)
        for expert in top_k_index.unique().tolist():
            token, slot = (top_k_index == expert).nonzero(as_tuple=True)
            gate, up = F.linear(tokens[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            mixed.index_add_(0, token, out.float() * top_k_weights[token, slot, None])
        return mixed.to(tokens.dtype)


class LLaDA2Experts(nn.Module):
    """The feed-forward block of LLaDA2's expert layers: routed experts, weighed in float32 and
    summed, plus the shared experts every token passes through (the published order)."""

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.gate = LLaDA2Router(config)
        self.experts = LLaDA2RoutedExperts(config)
        shared_width = resolved(config.moe_intermediate_size) * (config.num_shared_experts or 0)
        self.shared_experts = LLaDA2Expert(config.hidden_size, shared_width) if shared_width else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.reshape(-1, hidden.shape[-1])  # (T, hidden)
        mixed = self.experts(tokens, *self.gate(tokens))
        if self.shared_experts is not None:
            mixed = mixed + self.shared_experts(tokens)
        return mixed.view_as(hidden)


class LLaDA2Model(DiffbatchMDMModel):
    config_class = LLaDA2Config

    def layer_mlp(self, config: DiffbatchMDMConfig, index: int) -> nn.Module:
        if isinstance(config, LLaDA2Config) and config.num_experts and index >= config.first_k_dense_replace:
            return LLaDA2Experts(config)
        return DiffbatchMDMMLP(config)


class LLaDA2ForBlockDiffusion(DiffbatchMDMForMaskedDiffusion):
    config_class = LLaDA2Config
    config: LLaDA2Config
    body_class = LLaDA2Model

    def __init__(self, config: LLaDA2Config):
        config.check_supported()
        super().__init__(config)

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers guesses this from the source of the class's module and caches the guess on the
        # class it asked; a guess made first for the built-in parent (no experts) is inherited here.
        return True

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range  # transformers' helpers skip what a checkpoint filled
        if isinstance(module, LLaDA2Router):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.expert_bias is not None:
                init.zeros_(module.expert_bias)
        elif isinstance(module, LLaDA2RoutedExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)


def llada2_weight_names() -> list:
    """The published parameter names onto the built-in classes' (the dense layers' gate and up
    projections fused as the built-in model holds them), and the routed experts' tensors stacked
    (as transformers' Qwen2-MoE mapping does)."""
    renames = {"word_embeddings": "embed_tokens", "attention.query_key_value": "self_attn.qkv_proj",
               "attention.dense": "self_attn.o_proj", "attention.query_layernorm": "self_attn.q_norm",
               "attention.key_layernorm": "self_attn.k_norm"}
    return [
        *(WeightRenaming(rf"\.{source.replace('.', '[.]')}\.", f".{target}.") for source, target in renames.items()),
        WeightConverter(source_patterns=["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                        target_patterns="mlp.gate_up_proj.weight", operations=[Concatenate(dim=0)]),
        WeightConverter(source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
                        target_patterns="mlp.experts.gate_up_proj",
                        operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
        WeightConverter(source_patterns="mlp.experts.*.down_proj.weight", target_patterns="mlp.experts.down_proj",
                        operations=[MergeModulelist(dim=0)]),
    ]
