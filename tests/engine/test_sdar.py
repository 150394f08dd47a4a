"""SDAR checkpoints (block-causal, blocks aligned from position 0): loading, architecture, decoding.

The oracles are independent of diffbatch's code: transformers' own Qwen3 for the architecture (SDAR
is Qwen3 with a block-causal mask; under a causal mask, which is block-causal with blocks of one,
the logits must be Qwen3's), and for decoding a plain re-statement of SDAR's published sampler
(JetAstra/SDAR ``generate.py``): the whole sequence recomputed at every step under a block-causal
mask cut from position 0, the prompt's last partial block decoded together with the first new tokens.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from worker.engine.builtin.tokenizer import build_byte_tokenizer
from worker.engine.engine import Engine
from worker.engine.families import SDARConfig, SDARForBlockDiffusion
from worker.engine.loader import load_model
from worker.engine.params import ContextLengthError, GenerationRequest, Healing, SamplingParams
from worker.engine.schedulers import block as scheduler

from .aligned_reference import aligned_block_decode, assert_row_matches
from .preferring import Preferring

BLOCK = 4
SIZES = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def published_config(tokenizer) -> dict:
    """config.json as SDAR-1.7B-Chat writes it (its key set), at the tiny model's sizes."""
    return dict(
        architectures=["SDARForCausalLM"], attention_bias=False, attention_dropout=0.0,
        attn_implementation="flex_attention", auto_map={
            "AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
        block_size=BLOCK, bos_token_id=tokenizer.bos_token_id, debug=False, eos_token_id=tokenizer.eos_token_id,
        ep_size=1, fuse_cross_entropy=True, hidden_act="silu", initializer_range=0.02,
        mask_token_id=tokenizer.mask_token_id, max_window_layers=28, micro_forward=False, model_type="sdar",
        rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000, skip_checkpoint=False, sliding_window=None,
        tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.52.4", use_cache=False,
        use_deepep=False, use_sliding_window=False, vocab_size=len(tokenizer), **SIZES)


@pytest.fixture(scope="module")
def sdar(tmp_path_factory):
    """A published-style SDAR folder whose weights were written by transformers' Qwen3 (the same
    parameter names), with remote code that raises if it runs; and that Qwen3 model."""
    tokenizer = build_byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        qwen3 = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, initializer_range=0.2,
            **SIZES)).eval()
        with torch.no_grad():  # norms away from 1, so a norm left out or misplaced shows
            for name, parameter in qwen3.named_parameters():
                if "norm" in name:
                    parameter.normal_(1.0, 0.3)
    folder = tmp_path_factory.mktemp("sdar") / "SDAR-tiny-Chat"
    qwen3.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = published_config(tokenizer)
    (folder / "config.json").write_text(json.dumps(config))
    for module in {v.split(".")[0] for v in config["auto_map"].values()}:
        (folder / f"{module}.py").write_text("raise RuntimeError('remote code ran')\n")
    return load_model(str(folder), trust_remote_code=True), qwen3


def test_published_folder_loads_as_qwen3_with_a_block_causal_mask(sdar):
    loaded, qwen3 = sdar
    assert type(loaded.model) is SDARForBlockDiffusion and loaded.family == "sdar"
    assert loaded.mask_token_id == loaded.tokenizer.mask_token_id and loaded.config.block_length == BLOCK
    ids = torch.randint(0, loaded.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    causal = torch.ones(13, 13, dtype=torch.bool).tril()[None, None].expand(2, 1, 13, 13)
    with torch.no_grad():
        ours = loaded.model(input_ids=ids, attention_mask=causal).logits
        theirs = qwen3(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5


PROMPT_LENGTHS = (1, 3, 4, 5, 10, 7)  # leads 1, 3, 0, 1, 2, 3; the first two have no whole block


@pytest.mark.parametrize("cache,graphs,prefill_tokens", [
    ("exact", False, 8192), ("exact", False, 1), ("exact", True, 8192), ("none", False, 8192)])
def test_engine_gives_sdar_reference_tokens_in_one_mixed_batch(sdar, cache, graphs, prefill_tokens, monkeypatch):
    """Prompts of every length mod the block (an empty head, a whole-block prompt, leads of 1-3),
    different max_tokens, in one continuous batch of 3: each row gets the reference's tokens, whether
    the prompts are prefilled together or a row a forward."""
    loaded, _ = sdar
    monkeypatch.setattr(scheduler, "PREFILL_TOKENS", prefill_tokens)
    engine = Engine(loaded, max_batch_size=3, cache=cache, graphs=graphs)
    prompts = [[(7 + 31 * n + 17 * i) % 250 + 10 for i in range(n)] for n in PROMPT_LENGTHS]
    requests = [GenerationRequest(p, SamplingParams(max_tokens=5 + 3 * i, block_length=BLOCK))
                for i, p in enumerate(prompts)]
    results = engine.generate(requests)
    for request, result in zip(requests, results, strict=False):
        expected = aligned_block_decode(loaded.model, request.prompt_ids, request.params.max_tokens, block=BLOCK,
                                        mask_token_id=loaded.mask_token_id)
        assert_row_matches(result, request, expected, loaded.eos_token_ids)
        assert result.prompt_tokens == len(request.prompt_ids)


def test_token_healing_binds_the_first_token_after_the_lead(sdar):
    """With a lead, the first generated token is not the block's first position: healing must
    restrict the position after the lead (restricting position 0, the lead's, would do nothing)."""
    loaded, _ = sdar
    engine = Engine(loaded, max_batch_size=2)
    prompt = [40, 50, 60, 70, 80, 90]  # a lead of 2
    free = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=4, block_length=BLOCK))])[0]
    allowed = tuple(t for t in range(10, 20) if t != free.token_ids[0])
    healed = GenerationRequest(prompt, SamplingParams(max_tokens=4, block_length=BLOCK),
                               healing=Healing(text="", allowed=allowed))
    assert len(prompt) % BLOCK and engine.generate([healed])[0].token_ids[0] in allowed


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-protocol"])
def test_an_end_token_in_the_lead_ends_nothing(sdar, graphs):
    """A chat prompt's turn end (an EOS id) that falls in the lead, the prompt's part of the first
    decoded block, is prompt text: the row decodes on to the reference's tokens."""
    loaded, _ = sdar
    engine = Engine(loaded, max_batch_size=2, graphs=graphs)
    prompt = [40, 50, 60, 70, loaded.eos_token_id, 90]  # one whole block, then a lead of 2
    request = GenerationRequest(prompt, SamplingParams(max_tokens=6, block_length=BLOCK))
    result = engine.generate([request])[0]
    expected = aligned_block_decode(loaded.model, prompt, 6, block=BLOCK, mask_token_id=loaded.mask_token_id)
    assert_row_matches(result, request, expected, loaded.eos_token_ids)
    assert loaded.mask_token_id not in result.token_ids and len(result.token_ids) > 0


@pytest.mark.parametrize(("cache", "graphs"), [("exact", False), ("exact", True), ("none", False)],
                         ids=["exact", "graph-protocol", "recompute"])
def test_the_leads_prompt_text_does_not_count_as_generated_for_penalties(sdar, cache, graphs):
    """The lead is the prompt's text in the first decoded block: a presence penalty must not count
    it, so the completion is the same whether the lead holds the model's favourite token or not."""
    loaded, _ = sdar
    favourite, runner_up = 20, 21
    engine = Engine(dataclasses.replace(loaded, model=Preferring(loaded.model, favourite, runner_up)),
                    cache=cache, graphs=graphs)

    def completion(lead_token: int) -> list[int]:
        prompt = [40, 50, 60, 70, lead_token, 90]  # one whole block, then a lead of 2
        params = SamplingParams(max_tokens=6, block_length=BLOCK, presence_penalty=2.0)
        return engine.generate([GenerationRequest(prompt, params)])[0].token_ids

    assert completion(favourite) == completion(7) == [favourite, runner_up, favourite, favourite, favourite,
                                                      favourite]


def test_a_mask_token_where_the_model_would_denoise_it_is_refused(sdar, engine):
    """In the lead, or in a template's text, [MASK] would read as a position to fill and be
    overwritten; before the lead (prefilled) or in a prompt of a model without a lead it is text."""
    loaded, _ = sdar
    mask = loaded.mask_token_id
    sdar_engine, params = Engine(loaded), SamplingParams(max_tokens=4, block_length=BLOCK)
    with pytest.raises(ValueError, match=r"^prompt: it holds the mask token .*last 2 tokens"):
        sdar_engine.check(GenerationRequest([40, 50, 60, 70, mask, 90], params))
    sdar_engine.check(GenerationRequest([40, mask, 60, 70, 80, 90], params))  # prefilled: the model reads it
    template = [100, mask, None, None]
    with pytest.raises(ValueError, match=r"^diffusion.template holds the mask token"):
        sdar_engine.check(GenerationRequest([40, 50, 60, 70], SamplingParams(max_tokens=4, block_length=BLOCK),
                                            template_ids=template))
    builtin_mask = engine.tokenizer.mask_token_id
    engine.check(GenerationRequest([5, builtin_mask], SamplingParams(max_tokens=4)))  # no lead: prompt text


def test_default_block_is_the_trained_one_and_context_counts_aligned_blocks(sdar):
    loaded, _ = sdar
    engine = Engine(loaded)
    assert engine.default_block_length == BLOCK
    prompt = [5] * 250  # 248 in whole blocks + a lead of 2; 2 + 6 new tokens fill two blocks: 256
    engine.check(GenerationRequest(prompt, SamplingParams(max_tokens=6, block_length=BLOCK)))
    with pytest.raises(ContextLengthError, match="needs 260 positions"):
        engine.check(GenerationRequest(prompt, SamplingParams(max_tokens=7, block_length=BLOCK)))


def test_unsupported_sdar_options_are_refused():
    for option, match in [(dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
                          (dict(attention_bias=True), "attention bias"),
                          (dict(use_sliding_window=True), "sliding-window")]:
        with pytest.raises(ValueError, match=match):
            SDARForBlockDiffusion(SDARConfig(**SIZES, vocab_size=300, **option))


def test_a_folder_missing_weights_is_refused(sdar, tmp_path):
    """transformers would fill a missing parameter with random values and only log it."""
    from safetensors.torch import load_file, save_file

    loaded, _ = sdar
    folder = tmp_path / "incomplete"
    shutil.copytree(loaded.config.name_or_path, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.k_norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 of the weights .*k_norm"):
        load_model(str(folder))


def test_an_infilling_template_follows_the_lead(sdar):
    """The template's text comes after the prompt's lead in the canvas, so it lands where it says."""
    loaded, _ = sdar
    engine = Engine(loaded, max_batch_size=2)
    template = [None, None, 100, 101, None, 102, None, None, None, 103]
    for prompt in ([40, 50, 60, 70, 80, 90], [40, 50, 60, 70]):  # leads of 2 and 0
        request = GenerationRequest(prompt, SamplingParams(max_tokens=len(template), block_length=BLOCK),
                                    template_ids=template)
        tokens = engine.generate([request])[0].token_ids
        assert len(tokens) == len(template)
        assert [t for t, fixed in zip(tokens, template, strict=False) if fixed is not None] == [100, 101, 102, 103]


def test_delayed_cache_rows_with_leads_get_their_tokens_alone(sdar):
    """The delayed cache keeps a lead's positions like committed ones: a row's tokens and passes
    must still not depend on its batch-mates' leads."""
    loaded, _ = sdar
    engine = Engine(loaded, max_batch_size=3, cache="delayed")
    prompts = [[(7 + 31 * n + 17 * i) % 250 + 10 for i in range(n)] for n in PROMPT_LENGTHS]
    requests = [GenerationRequest(p, SamplingParams(max_tokens=9, block_length=BLOCK, sampler="threshold",
                                                    threshold=0.3)) for p in prompts]
    for request, together in zip(requests, engine.generate(requests), strict=False):
        alone = engine.generate([request])[0]
        assert (together.token_ids, together.forward_passes) == (alone.token_ids, alone.forward_passes)
