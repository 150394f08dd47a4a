"""Full-attention families (LLaDA, Dream) and their caches: checkpoint contract, padding, shift, engine.

Tiny random models only. The parameter names below are the contract with the published checkpoints:
they are the names of the official modeling code (LLaDA's ``LLaDAModelLM``, Dream's ``DreamModel``),
so a folder saved by that code loads into diffbatch's classes unchanged.
"""

import json

import pytest
import torch

from worker.engine.builtin.tokenizer import build_byte_tokenizer
from worker.engine.caches.approx import DualCache, FullRecompute, PrefixCache
from worker.engine.caches.modes import resolve_cache_mode
from worker.engine.engine import Engine
from worker.engine.families import DreamConfig, DreamForMaskedDiffusion, LLaDAConfig, LLaDAForMaskedDiffusion
from worker.engine.layout import build_layout
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams

FAMILIES = ("llada", "dream")
MODES = ("none", "prefix", "dual")
PROMPTS = ["hi", "a much longer prompt than the others", "mid length"]

LLADA_NAMES = [  # LLaDAModelLM: model.transformer.{wte, blocks.N.*, ln_f, ff_out}
    "model.transformer.wte.weight",
    "model.transformer.blocks.0.attn_norm.weight",
    "model.transformer.blocks.0.ff_norm.weight",
    "model.transformer.blocks.0.q_proj.weight",
    "model.transformer.blocks.0.k_proj.weight",
    "model.transformer.blocks.0.v_proj.weight",
    "model.transformer.blocks.0.attn_out.weight",
    "model.transformer.blocks.0.ff_proj.weight",
    "model.transformer.blocks.0.up_proj.weight",
    "model.transformer.blocks.0.ff_out.weight",
    "model.transformer.ln_f.weight",
    "model.transformer.ff_out.weight",
]
DREAM_NAMES = [  # DreamModel: Qwen2's names, q/k/v with bias
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.k_proj.bias",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.v_proj.bias",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def tiny_model(family: str, tokenizer, num_layers: int = 2):
    ids = dict(mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if family == "llada":  # LLaDA-8B's choices (llama block, silu, RMS, RoPE, untied head), tiny; GQA too
        config = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=num_layers, mlp_hidden_size=48,
                             activation_type="silu", block_type="llama", layer_norm_type="rms", rope=True,
                             rope_theta=500000.0, vocab_size=len(tokenizer), embedding_size=len(tokenizer),
                             weight_tying=False, max_sequence_length=512, init_std=0.2, **ids)
        return LLaDAForMaskedDiffusion(config)
    config = DreamConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=512, rope_theta=1000000.0, initializer_range=0.2, **ids)
    return DreamForMaskedDiffusion(config)


def save_tiny(family: str, folder, num_layers: int = 2):
    tokenizer = build_byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tiny_model(family, tokenizer, num_layers)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def family_loaded(request, tmp_path_factory):
    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param) / request.param)
    return request.param, load_model(str(folder))


def requests_for(engine, **params):
    return [GenerationRequest(engine.encode_completion(p), SamplingParams(**params)) for p in PROMPTS]


def test_parameter_names_are_the_official_ones(family_loaded):
    family, loaded = family_loaded
    names = {name for name, _ in loaded.model.named_parameters()}
    expected = LLADA_NAMES if family == "llada" else DREAM_NAMES
    assert set(expected) <= names
    per_layer = {n for n in expected if ".0." in n}
    all_layers = {n.replace(".0.", f".{i}.") for n in per_layer for i in (0, 1)}
    assert names == set(expected) - per_layer | all_layers
    assert loaded.family == family
    assert loaded.config.model_type == {"llada": "llada", "dream": "Dream"}[family]


def published_config(family: str, tokenizer) -> dict:
    """config.json as the published checkpoints write it (LLaDA-8B-Instruct's and Dream-v0-Instruct-7B's
    key sets and values), at the tiny model's sizes and the byte tokenizer's ids."""
    ids = dict(mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if family == "llada":
        return dict(
            activation_type="silu", alibi=False, alibi_bias_max=8.0, architectures=["LLaDAModelLM"],
            attention_dropout=0.0, attention_layer_norm=False, attention_layer_norm_with_affine=True,
            auto_map={"AutoConfig": "configuration_llada.LLaDAConfig",
                      "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                      "AutoModel": "modeling_llada.LLaDAModelLM"},
            bias_for_layer_norm=False, block_group_size=1, block_type="llama", d_model=32,
            embedding_dropout=0.0, embedding_size=len(tokenizer), flash_attention=False, include_bias=False,
            include_qkv_bias=False, init_cutoff_factor=None, init_device="meta", init_fn="mitchell",
            init_std=0.02, input_emb_norm=False, layer_norm_type="rms", layer_norm_with_affine=True,
            max_sequence_length=512, mlp_hidden_size=48, mlp_ratio=4, model_type="llada",
            multi_query_attention=None, n_heads=4, n_kv_heads=2, n_layers=2, precision="amp_bf16",
            residual_dropout=0.0, rms_norm_eps=1e-05, rope=True, rope_full_precision=True,
            rope_theta=500000.0, scale_logits=False, transformers_version="4.46.3", use_cache=False,
            vocab_size=len(tokenizer), weight_tying=False, **ids)
    return dict(
        architectures=["DreamModel"], attention_dropout=0.0,
        auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        bos_token_id=tokenizer.bos_token_id, hidden_act="silu", hidden_size=32, initializer_range=0.02,
        intermediate_size=48, max_position_embeddings=512, max_window_layers=28, model_type="Dream",
        num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-06,
        rope_scaling=None, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
        torch_dtype="bfloat16", transformers_version="4.46.2", use_cache=False, use_sliding_window=False,
        vocab_size=len(tokenizer), **ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_published_folder_loads_without_running_its_remote_code(family, tmp_path):
    """A published folder: its config.json keys, and auto_map naming transformers-4 remote code that
    must never run (here it would raise), even when the caller trusts remote code."""
    folder = save_tiny(family, tmp_path / family)
    weights = load_model(str(folder)).model.state_dict()
    config = published_config(family, build_byte_tokenizer())
    (folder / "config.json").write_text(json.dumps(config))
    for module in {v.split(".")[0] for v in config["auto_map"].values()}:
        (folder / f"{module}.py").write_text("raise RuntimeError('remote code ran')\n")
    loaded = load_model(str(folder), trust_remote_code=True)
    assert type(loaded.model) is (LLaDAForMaskedDiffusion if family == "llada" else DreamForMaskedDiffusion)
    assert loaded.max_positions == 512 and loaded.mask_token_id == config["mask_token_id"]
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, weights[name])
    if family == "dream":
        assert loaded.config.rope_base == 1000000.0


def test_unsupported_architecture_options_are_refused():
    with pytest.raises(ValueError, match="block_type"):
        LLaDAForMaskedDiffusion(LLaDAConfig(d_model=32, n_heads=4, n_layers=1, rope=True,
                                            block_type="sequential"))
    with pytest.raises(ValueError, match="rope scaling"):
        linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
        DreamForMaskedDiffusion(DreamConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                            num_hidden_layers=1, intermediate_size=32, rope_scaling=linear))


def test_padded_batch_logits_equal_single_rows(family_loaded):
    _, loaded = family_loaded
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    layout = build_layout(prompts, gen_length=8, block_length=8, pad_token_id=loaded.pad_token_id,
                          mask_token_id=loaded.mask_token_id, device="cpu", full_attention=True)
    with torch.no_grad():
        batched = loaded.model(input_ids=layout.x, attention_mask=layout.attention_mask,
                               position_ids=layout.position_ids).logits
        for row, prompt in enumerate(prompts):
            first = layout.prompt_length - len(prompt)  # the row's first real column
            alone = loaded.model(input_ids=layout.x[row : row + 1, first:]).logits
            torch.testing.assert_close(batched[row, first:], alone[0],
                                       atol=1e-5, rtol=1e-5)


def test_full_attention_layout_masks_padding_only():
    layout = build_layout([[5, 6], [7]], gen_length=4, block_length=2, pad_token_id=0, mask_token_id=1,
                          device="cpu", full_attention=True)
    real = torch.tensor([[True] * 6, [False] + [True] * 5])
    assert torch.equal(layout.attention_mask, real[:, None, None, :].expand(2, 1, 6, 6))
    assert layout.position_ids[1].tolist() == [0, 0, 1, 2, 3, 4]


def test_layout_of_rows_at_different_blocks():
    """Continuous batching lays rows out again each round: a row's committed blocks follow its prompt,
    each its own block of the block-causal mask, and its canvas ends at its own length."""
    layout = build_layout([[5, 6], [7]], committed=[[], [8, 9]], gen_length=[4, 2], block_length=2,
                          pad_token_id=0, mask_token_id=1, device="cpu")
    assert layout.prompt_length == 3 and layout.block_span(0) == (3, 5)
    assert layout.x.tolist() == [[0, 5, 6, 1, 1, 1, 1], [7, 8, 9, 1, 1, 0, 0]]
    assert layout.position_ids[1, :5].tolist() == [0, 1, 2, 3, 4]
    # Row 1: its prompt [7] is block 0, [8, 9] block 1, the active block [1, 1] block 2.
    sees = layout.attention_mask[1, 0].int().tolist()
    assert sees[0] == [1, 0, 0, 0, 0, 0, 0]  # the prompt sees no generated token
    assert sees[1] == sees[2] == [1, 1, 1, 0, 0, 0, 0]
    assert sees[3] == [1, 1, 1, 1, 1, 0, 0]  # the right padding is nobody's key
    assert layout.attention_mask[0, 0, 3].int().tolist() == [0, 1, 1, 1, 1, 0, 0]
    full = build_layout([[5, 6], [7]], committed=[[], [8, 9]], gen_length=[4, 2], block_length=2,
                        pad_token_id=0, mask_token_id=1, device="cpu", full_attention=True)
    assert full.attention_mask[1, 0, 0].int().tolist() == [1, 1, 1, 1, 1, 0, 0]


def test_block_logits_are_read_with_the_family_shift(family_loaded):
    """LLaDA scores column i at column i; Dream at column i - 1 (its AR parent's alignment)."""
    family, loaded = family_loaded
    shift = 1 if family == "dream" else 0
    layout = build_layout([loaded.tokenizer("shift")["input_ids"]], gen_length=8, block_length=4,
                          pad_token_id=loaded.pad_token_id, mask_token_id=loaded.mask_token_id,
                          device="cpu", full_attention=True)
    with torch.no_grad():
        everything = loaded.model(input_ids=layout.x, attention_mask=layout.attention_mask,
                                  position_ids=layout.position_ids).logits
        for block in range(layout.num_blocks):
            start, end = layout.block_span(block)
            slots = torch.tensor([[2, 0, 3]])  # the block positions asked for, in this order
            for cache in (FullRecompute, PrefixCache, DualCache):  # first call of a block: exact
                got = cache(loaded.model, layout, logits_shift=shift)(layout.x[:, :end], slots)
                want = everything[:, start - shift : end - shift][:, [2, 0, 3]]
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


MIXED = [  # lengths, samplers and seeds that differ, so batch-mates differ in every way
    ("hi", dict(max_tokens=20, temperature=0.0)),
    ("a much longer prompt than the others", dict(max_tokens=5, temperature=0.9, seed=3)),
    ("mid length", dict(max_tokens=12, sampler="threshold", threshold=0.2)),
    ("x", dict(max_tokens=8, temperature=0.7, seed=5, steps=2, presence_penalty=0.5)),
    ("edit", dict(max_tokens=9, sampler="threshold", threshold=0.5, editing_threshold=0.1, max_post_steps=3)),
]


@pytest.mark.parametrize("mode", MODES)
def test_a_row_gets_the_tokens_it_gets_alone_whatever_its_batch_mates(family_loaded, mode):
    """Under full attention a row sees its whole canvas, the still-masked blocks included, so its
    canvas must end at its own max_tokens, not at its longest batch-mate's (the old fixed batches
    gave a row other tokens next to a longer one). Continuous batching (2 rows at a time) must not
    change a token either."""
    _, loaded = family_loaded
    engine = Engine(loaded, max_batch_size=2, cache=mode)
    requests = [GenerationRequest(engine.encode_completion(p), SamplingParams(block_length=4, **kw))
                for p, kw in MIXED]
    batched = engine.generate(requests)
    for (_, kw), request, together in zip(MIXED, requests, batched, strict=False):
        alone = engine.generate([request])[0]
        assert together.token_ids == alone.token_ids and together.forward_passes == alone.forward_passes
        assert loaded.mask_token_id not in together.token_ids
        assert together.finish_reason in ("stop", "length") and len(together.token_ids) <= kw["max_tokens"]
        blocks = -(-kw["max_tokens"] // 4)
        post_steps = kw.get("max_post_steps", 0)  # an editing row's passes after a block's last mask
        assert together.forward_passes <= blocks * (4 + post_steps)  # at least one token a pass before


@pytest.mark.parametrize("mode", MODES)
def test_finished_rows_leave_and_waiting_ones_join(family_loaded, mode):
    """A batch of 2 serves 4 requests: the 20-token row is admitted first (shortest prompt), and the
    short ones pass through the other slot and stream out while it runs, instead of waiting for it."""
    _, loaded = family_loaded
    engine = Engine(loaded, max_batch_size=2, cache=mode)
    specs = [("z", 20), ("aa", 4), ("bb", 4), ("cc", 4)]
    requests = [GenerationRequest(engine.encode_completion(p), SamplingParams(max_tokens=n, block_length=4,
                                                                              temperature=0.0))
                for p, n in specs]
    assert [i for i, _ in engine.stream(requests)] == [1, 2, 3, 0]


@pytest.mark.parametrize("mode", MODES)
def test_infilling_holes_see_the_template_text_after_them(family_loaded, mode):
    """Full attention sees the whole canvas: a hole in the first block is filled knowing the
    template's text in later blocks (block-causal models cannot), the text is kept as written, and
    a batch-mate changes nothing."""
    _, loaded = family_loaded
    engine = Engine(loaded, max_batch_size=4, cache=mode)
    prompt = engine.encode_completion("def f(a):")
    fills = []
    for suffix in ("return a", "pass # a", "print(a)"):  # one length: only the text differs
        canvas = engine.encode_template("{{fill:4}}" + suffix + "{{fill:2}}")
        request = GenerationRequest(prompt, SamplingParams(max_tokens=len(canvas), block_length=4,
                                                           temperature=0.0), template_ids=canvas)
        [result] = engine.generate([request])
        assert len(result.token_ids) == len(canvas)
        assert all(got == want for got, want in zip(result.token_ids, canvas, strict=False) if want is not None)
        mates = requests_for(engine, max_tokens=8, block_length=4, temperature=0.5, seed=1)
        assert engine.generate([*mates, request])[-1].token_ids == result.token_ids
        fills.append(result.token_ids[:4])
    assert len({tuple(f) for f in fills}) > 1  # the first hole depends on the text that follows it


@pytest.mark.parametrize("mode", ("prefix", "dual"))
def test_caches_equal_recompute_when_each_block_is_one_step(family_loaded, mode):
    """A block's first step runs on the refresh pass, a full recompute: with one step per block the
    approximate caches are exact for the whole generation."""
    _, loaded = family_loaded
    reference = Engine(loaded, cache="none")
    cached = Engine(loaded, cache=mode)
    requests = requests_for(reference, max_tokens=12, block_length=4, steps=1)
    want = [r.token_ids for r in reference.generate(requests)]
    assert [r.token_ids for r in cached.generate(requests)] == want


@pytest.mark.parametrize("family", FAMILIES)
def test_caches_are_exact_for_a_one_layer_model(family, tmp_path):
    """With one layer a column's keys and values depend on its own token only, so nothing cached goes
    stale: prefix and dual caches must then give recompute's tokens at every step of every block.
    (With more layers the cached columns' keys were computed while the block was masked: Fast-dLLM's
    approximation, not exact even on the first block.)"""
    loaded = load_model(str(save_tiny(family, tmp_path / family, num_layers=1)))
    reference = Engine(loaded, cache="none")
    requests = requests_for(reference, max_tokens=12, block_length=4, temperature=0.0)
    want = [r.token_ids for r in reference.generate(requests)]
    for mode in ("prefix", "dual"):
        assert [r.token_ids for r in Engine(loaded, cache=mode).generate(requests)] == want


def test_cache_modes_are_checked_per_family(family_loaded, loaded):
    _, full = family_loaded
    assert Engine(full).cache_mode == "dual" and Engine(full, kv_cache=False).cache_mode == "none"
    with pytest.raises(ValueError, match="does not apply to full-attention"):
        Engine(full, cache="exact")
    with pytest.raises(ValueError, match="does not apply to block-causal"):
        Engine(loaded, cache="dual")  # the built-in block-causal model
    with pytest.raises(ValueError, match="cache must be one of"):
        resolve_cache_mode("approximate", full_attention=True)
