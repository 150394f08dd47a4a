"""LLaDA2 checkpoints (block-causal with experts, blocks aligned from position 0): loading, architecture,
decoding.

The oracles are independent of diffbatch's code: the architecture is re-stated below from the
published modeling code's description (plain tensor operations over the published parameter names),
and decoding is a re-statement of the published sampler (the model's ``generate``): the whole
sequence recomputed at every step under a block-causal mask cut from position 0, every masked
position whose confidence exceeds the threshold committed, at least the most confident one.
"""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from worker.engine.builtin.tokenizer import build_byte_tokenizer
from worker.engine.engine import Engine
from worker.engine.families import LLaDA2Config, LLaDA2ForBlockDiffusion
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams
from worker.engine.schedulers import block as scheduler

from .aligned_reference import aligned_block_decode, assert_row_matches, block_causal, editing_block_decode

BLOCK = 4
SIZES = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, num_experts=8, n_group=4,
             topk_group=2, num_experts_per_tok=2, moe_intermediate_size=24, num_shared_experts=1,
             first_k_dense_replace=1)


def published_config(vocab_size: int) -> dict:
    """config.json with LLaDA2.0-mini's keys (``use_bias`` left out: its config class defaults it to
    true), at the tiny model's sizes; q/k/v biases on, so that path is exercised."""
    return dict(
        architectures=["LLaDA2MoeModelLM"], auto_map={
            "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
            "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
            "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        dtype="bfloat16", hidden_act="silu", initializer_range=0.02, model_type="llada2_moe",
        moe_router_enable_expert_bias=True, norm_topk_prob=True, output_router_logits=False,
        pad_token_id=0, partial_rotary_factor=0.5, rms_norm_eps=1e-06, rope_theta=600000,
        routed_scaling_factor=2.5, router_dtype="fp32", score_function="sigmoid", tie_word_embeddings=False,
        use_qk_norm=True, use_qkv_bias=True, vocab_size=vocab_size, **SIZES)


def published_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the published parameter names and shapes."""
    generator = torch.Generator().manual_seed(seed)
    normal = lambda *shape, mean=0.0, std=0.2: mean + std * torch.randn(*shape, generator=generator)  # noqa: E731
    h, d, v = config["hidden_size"], config["head_dim"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    weights = {"model.word_embeddings.weight": normal(v, h), "model.norm.weight": normal(h, mean=1.0, std=0.3),
               "lm_head.weight": normal(v, h)}

    def mlp(prefix: str, inner: int):
        weights.update({f"{prefix}.gate_proj.weight": normal(inner, h), f"{prefix}.up_proj.weight": normal(inner, h),
                        f"{prefix}.down_proj.weight": normal(h, inner)})

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights.update({
            f"{p}.input_layernorm.weight": normal(h, mean=1.0, std=0.3),
            f"{p}.post_attention_layernorm.weight": normal(h, mean=1.0, std=0.3),
            f"{p}.attention.query_key_value.weight": normal((heads + 2 * kv) * d, h),
            f"{p}.attention.query_key_value.bias": normal((heads + 2 * kv) * d),
            f"{p}.attention.dense.weight": normal(h, heads * d), f"{p}.attention.dense.bias": normal(h),
            f"{p}.attention.query_layernorm.weight": normal(d, mean=1.0, std=0.3),
            f"{p}.attention.key_layernorm.weight": normal(d, mean=1.0, std=0.3)})
        if i < config["first_k_dense_replace"]:
            mlp(f"{p}.mlp", config["intermediate_size"])
            continue
        weights[f"{p}.mlp.gate.weight"] = normal(config["num_experts"], h, std=1.0)
        weights[f"{p}.mlp.gate.expert_bias"] = normal(config["num_experts"], std=0.5)
        for e in range(config["num_experts"]):
            mlp(f"{p}.mlp.experts.{e}", config["moe_intermediate_size"])
        mlp(f"{p}.mlp.shared_experts", config["moe_intermediate_size"] * config["num_shared_experts"])
    return weights


def oracle_logits(w: dict, c: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LLaDA2's forward, written out: ids (B, L), mask (B, 1, L, L) bool -> logits (B, L, V)."""
    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]))

    def swiglu(x, p):
        return F.linear(F.silu(F.linear(x, w[f"{p}.gate_proj.weight"])) * F.linear(x, w[f"{p}.up_proj.weight"]),
                        w[f"{p}.down_proj.weight"])

    batch, length = ids.shape
    heads, kv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    rot = int(d * c["partial_rotary_factor"])
    inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, rot, 2).float() / rot)
    angles = torch.arange(length).float()[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate(x):  # only the first `rot` dimensions of each head, rotate-half style
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        half = torch.cat([-x_rot[..., rot // 2:], x_rot[..., : rot // 2]], -1)
        return torch.cat([x_rot * cos + half * sin, x_pass], -1)

    x = w["model.word_embeddings.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        qkv = F.linear(rms(x, w[f"{p}.input_layernorm.weight"]), w[f"{p}.attention.query_key_value.weight"],
                       w[f"{p}.attention.query_key_value.bias"]).view(batch, length, heads + 2 * kv, d).transpose(1, 2)
        q, k, v = qkv.split([heads, kv, kv], dim=1)
        q = rotate(rms(q, w[f"{p}.attention.query_layernorm.weight"]))
        k = rotate(rms(k, w[f"{p}.attention.key_layernorm.weight"])).repeat_interleave(heads // kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(-1) @ v.repeat_interleave(heads // kv, dim=1)
        x = x + F.linear(out.transpose(1, 2).reshape(batch, length, -1), w[f"{p}.attention.dense.weight"],
                         w[f"{p}.attention.dense.bias"])
        hidden = rms(x, w[f"{p}.post_attention_layernorm.weight"])
        if i < c["first_k_dense_replace"]:
            x = x + swiglu(hidden, f"{p}.mlp")
            continue
        scores = torch.sigmoid(hidden @ w[f"{p}.mlp.gate.weight"].T)  # (B, L, E)
        biased = scores + w[f"{p}.mlp.gate.expert_bias"]
        per_group = c["num_experts"] // c["n_group"]
        moe = torch.zeros_like(hidden)
        for b in range(batch):
            for t in range(length):
                groups = biased[b, t].view(c["n_group"], per_group)
                best = groups.topk(2, -1).values.sum(-1).topk(c["topk_group"]).indices
                allowed = [e for e in range(c["num_experts"]) if e // per_group in best.tolist()]
                ranked = sorted(allowed, key=lambda e: -biased[b, t, e].item())[: c["num_experts_per_tok"]]
                gate = scores[b, t, ranked]
                gate = gate / gate.sum() * c["routed_scaling_factor"]
                for e, g in zip(ranked, gate, strict=False):
                    moe[b, t] += g * swiglu(hidden[b, t], f"{p}.mlp.experts.{e}")
        x = x + moe + swiglu(hidden, f"{p}.mlp.shared_experts")
    return F.linear(rms(x, w["model.norm.weight"]), w["lm_head.weight"])


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    """A published-style LLaDA2 folder (its config keys and parameter names, remote code that raises
    if it runs, a tokenizer that names no mask token but spells <|mask|>) and its weights."""
    tokenizer = build_byte_tokenizer()
    config = published_config(len(tokenizer))
    weights = published_weights(config)
    folder = tmp_path_factory.mktemp("llada2") / "LLaDA2-tiny"
    folder.mkdir()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("mask_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "config.json").write_text(json.dumps(config))
    for module in {v.split(".")[0] for v in config["auto_map"].values()}:
        (folder / f"{module}.py").write_text("raise RuntimeError('remote code ran')\n")
    return load_model(str(folder), trust_remote_code=True), weights, config


def test_published_folder_loads_and_computes_llada2s_forward(llada2):
    loaded, weights, config = llada2
    assert type(loaded.model) is LLaDA2ForBlockDiffusion and loaded.family == "llada2"
    assert loaded.mask_token_id == loaded.tokenizer.convert_tokens_to_ids("<|mask|>")
    assert loaded.tokenizer.mask_token_id is None  # found by its spelling, as in LLaDA2's vocabulary
    assert loaded.model.model.layers[0].self_attn.o_proj.bias is not None  # use_bias's default
    assert loaded.model.config._experts_implementation == "grouped_mm"  # transformers' default kernel
    ids = torch.randint(0, config["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))
    try:
        for experts in ("grouped_mm", "eager"):  # the library's kernel and the module's own loop
            loaded.model.set_experts_implementation(experts)
            for mask in (block_causal(13, BLOCK).expand(2, 1, 13, 13),
                         torch.ones(2, 1, 13, 13, dtype=torch.bool)):
                with torch.no_grad():
                    ours = loaded.model(input_ids=ids, attention_mask=mask).logits
                    theirs = oracle_logits(weights, config, ids, mask)
                assert theirs.abs().max() > 1 and (ours - theirs).abs().max().item() < 1e-4
    finally:
        loaded.model.set_experts_implementation("grouped_mm")


PROMPT_LENGTHS = (1, 3, 4, 5, 10, 7)  # leads 1, 3, 0, 1, 2, 3; the first two have no whole block


@pytest.mark.parametrize("threshold,steps", [(0.2, None), (0.5, 2)])
@pytest.mark.parametrize("cache,graphs", [("exact", False), ("exact", True), ("none", False)])
def test_engine_gives_llada2s_tokens_in_one_mixed_batch(llada2, cache, graphs, threshold, steps, monkeypatch):
    """Prompts of every length mod the block, different max_tokens, continuous batch of 3, the
    threshold sampler (with ``steps``: at least block / steps a step, LLaDA2's rule for fewer steps
    than the block): each row gets the published sampler's tokens, several a pass at times."""
    loaded, _, _ = llada2
    monkeypatch.setattr(scheduler, "PREFILL_TOKENS", 16)  # and prefill spread over forwards
    engine = Engine(loaded, max_batch_size=3, cache=cache, graphs=graphs)
    prompts = [[(7 + 31 * n + 17 * i) % 250 + 10 for i in range(n)] for n in PROMPT_LENGTHS]
    requests = [GenerationRequest(p, SamplingParams(max_tokens=5 + 3 * i, block_length=BLOCK, sampler="threshold",
                                                    threshold=threshold, steps=steps)) for i, p in enumerate(prompts)]
    parallel = False
    for request, result in zip(requests, engine.generate(requests), strict=False):
        expected = aligned_block_decode(loaded.model, request.prompt_ids, request.params.max_tokens, block=BLOCK,
                                        mask_token_id=loaded.mask_token_id, threshold=threshold, steps=steps)
        assert_row_matches(result, request, expected, loaded.eos_token_ids)
        parallel |= result.forward_passes < len(result.token_ids)
    assert parallel


@pytest.mark.parametrize("max_post_steps", [16, 1])
@pytest.mark.parametrize("cache,graphs", [("exact", False), ("exact", True), ("none", False)])
def test_token_editing_gives_llada21s_tokens_beside_rows_that_do_not_edit(llada2, cache, graphs, max_post_steps,
                                                                           monkeypatch):
    """LLaDA2.1's decoding (threshold plus editing_threshold, max_post_steps): rows that edit get the
    tokens of a re-statement of its ``generate``, edits made, in a continuous batch whose other rows
    do not edit and get LLaDA2.0's tokens, eagerly and through the graph protocol (its editing
    state on the device). An editing row runs as many passes as the re-statement: it stops a block
    after a pass that changed nothing."""
    loaded, _, _ = llada2
    protocol_rounds = []

    class Counted(scheduler.GreedyBlockSteps):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            protocol_rounds.append(self.rules.any_editing)

    monkeypatch.setattr(scheduler, "GreedyBlockSteps", Counted)
    engine = Engine(loaded, max_batch_size=3, cache=cache, graphs=graphs)
    prompts = [[(7 + 31 * n + 17 * i) % 250 + 10 for i in range(n)] for n in PROMPT_LENGTHS]
    edit = dict(editing_threshold=0.1, max_post_steps=max_post_steps)
    requests = [GenerationRequest(p, SamplingParams(max_tokens=5 + 3 * i, block_length=BLOCK, sampler="threshold",
                                                    threshold=0.6, **(edit if i % 2 == 0 else {})))
                for i, p in enumerate(prompts)]
    edits = 0
    for request, result in zip(requests, engine.generate(requests), strict=False):
        options = dict(block=BLOCK, mask_token_id=loaded.mask_token_id, threshold=0.6)
        if request.params.edits:
            expected, made, passes = editing_block_decode(
                loaded.model, request.prompt_ids, request.params.max_tokens, editing_threshold=0.1,
                max_post_steps=max_post_steps, **options)
            edits += made
            assert result.forward_passes == passes or result.finish_reason == "stop"  # an EOS: fewer blocks
        else:
            expected = aligned_block_decode(loaded.model, request.prompt_ids, request.params.max_tokens, **options)
        assert_row_matches(result, request, expected, loaded.eos_token_ids)
    assert edits > 0
    assert any(protocol_rounds) == graphs  # editing rounds took the graph protocol where it is on


def test_editing_is_refused_with_the_delayed_cache_and_other_samplers(llada2):
    """The delayed cache keeps a committed token's keys, which an edit would leave stale."""
    loaded, _, _ = llada2
    editing = SamplingParams(block_length=BLOCK, sampler="threshold", editing_threshold=0.5)
    with pytest.raises(ValueError, match="diffusion.editing_threshold does not run with the delayed cache"):
        Engine(loaded, cache="delayed").check(GenerationRequest([5, 6, 7], editing))
    Engine(loaded).check(GenerationRequest([5, 6, 7], editing))
    with pytest.raises(ValueError, match="diffusion.editing_threshold applies to the threshold sampler only"):
        Engine(loaded).check(GenerationRequest([5], SamplingParams(sampler="factor", editing_threshold=0.5)))
    with pytest.raises(ValueError, match="diffusion.editing_threshold does not combine with frequency_penalty"):
        Engine(loaded).check(GenerationRequest([5], SamplingParams(sampler="threshold", editing_threshold=0.5,
                                                                   presence_penalty=0.5)))


def test_unsupported_llada2_options_are_refused():
    for option, match in [(dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
                          (dict(score_function="softmax"), "score_function"),
                          (dict(num_experts=6), "6 experts in 4 groups"),
                          (dict(topk_group=5), "topk_group 5 of 4 groups"),
                          (dict(num_experts_per_tok=5), "num_experts_per_tok 5 from 2 groups of 2"),
                          (dict(moe_intermediate_size=None), "no moe_intermediate_size")]:
        with pytest.raises(ValueError, match=match):
            LLaDA2ForBlockDiffusion(LLaDA2Config(**{**SIZES, "vocab_size": 300, **option}))


@pytest.mark.parametrize("tensor,error", [
    ("model.layers.2.mlp.gate.weight", r"lacks 1 of the weights .*layers\.2\.mlp\.gate\.weight"),
    ("model.layers.2.mlp.experts.5.up_proj.weight", r"could not be assembled .*'llada2_moe'")])
def test_a_folder_missing_a_tensor_is_refused(llada2, tmp_path, tensor, error):
    """Not loaded with random values in its place (transformers' default for a missing parameter)."""
    loaded, _, _ = llada2
    folder = tmp_path / "incomplete"
    shutil.copytree(loaded.config.name_or_path, folder)
    weights = load_file(folder / "model.safetensors")
    del weights[tensor]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=error):
        load_model(str(folder))
