"""Configuration of the built-in block-causal masked diffusion model.

transformers 5 turns every ``PreTrainedConfig`` subclass into a keyword-only dataclass, so the
fields are declared as annotated class attributes rather than through a hand-written ``__init__``.
"""

from transformers import PretrainedConfig


def resolved(size: int | None) -> int:
    """A size that config.json may leave out (head_dim, num_key_value_heads...), once the config has
    filled it in; a model reading it before then is a bug."""
    if size is None:
        raise ValueError("a model size was read before the config filled it in")
    return size


class DiffbatchMDMConfig(PretrainedConfig):
    """A small pre-norm transformer trained as a block-causal masked diffusion model. ``block_length``: the
    training block (bidirectional within, causal across blocks); ``mask_token_id``: the [MASK] it fills.
    """

    model_type = "diffbatch_mdm"

    vocab_size: int = 263
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # grouped-query attention; None: one per query head
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    qk_norm: bool = False  # RMSNorm on each query and key head before rotation (Qwen3, SDAR)
    qkv_bias: bool = False  # a bias on the fused query/key/value projection (LLaDA2's use_qkv_bias)
    o_proj_bias: bool = False  # a bias on the attention's output projection (LLaDA2's use_bias)
    partial_rotary_factor: float = 1.0  # the share of each head's dimensions that rotate (LLaDA2: 0.5)
    intermediate_size: int = 176
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # Keys of the published families' config.json that diffbatch implements only at these values
    # (refuse_unsupported): rotary scaling, sliding-window attention, another activation.
    rope_scaling: dict | None = None
    use_sliding_window: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    block_length: int = 32
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    tie_word_embeddings: bool = True
    # The engine picks its attention layout from the family; the name labels the model in the API.
    diffbatch_family: str = "block_causal"
    diffbatch_name: str | None = None

    def __post_init__(self, **kwargs):
        # Published config.json files name the attention their remote code ran (SDAR's
        # "flex_attention"); diffbatch's classes run their own (torch's scaled_dot_product_attention).
        kwargs.pop("attn_implementation", None)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of "
                    f"num_attention_heads ({self.num_attention_heads})"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rotary_dim % 2 != 0 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"the rotated part of each head ({self.rotary_dim} of {self.head_dim} dimensions) "
                             "must be even and not empty for rotary position embeddings")
        super().__post_init__(**kwargs)

    def refuse_unsupported(self, checkpoint: str, problems: list[tuple[bool, str]]) -> None:
        """Raise naming every option of this checkpoint's config.json that diffbatch does not implement:
        ``problems`` (set, what) plus those of the Qwen-style config keys the published families share."""
        problems = [(self.rope_scaling is not None, f"rope scaling {self.rope_scaling!r}"),
                    (self.use_sliding_window, "sliding-window attention"),
                    (self.hidden_act != "silu", f"hidden_act {self.hidden_act!r}"), *problems]
        unsupported = [what for bad, what in problems if bad]
        if unsupported:
            raise ValueError(f"this {checkpoint} checkpoint's config.json has {', '.join(unsupported)}, which "
                             "diffbatch does not implement")

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dimensions rotate (a property: not saved in config.json)."""
        return int(resolved(self.head_dim) * self.partial_rotary_factor)
