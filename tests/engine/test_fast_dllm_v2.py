"""Fast-dLLM v2 checkpoints (block-causal, AR-initialised: logits shifted by one, each block opened by
an autoregressive token, sub-blocks left to right): loading, architecture, decoding.

The oracles are independent of diffbatch's code: transformers' own Qwen2 for the architecture (under
a causal mask the logits must be Qwen2's), and for decoding a plain re-statement of the published
sampler (``batch_sample``, greedy, one row), recomputing the whole sequence at every step.
"""

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from worker.engine.builtin.tokenizer import build_byte_tokenizer
from worker.engine.engine import Engine
from worker.engine.families import FastDLLMv2ForBlockDiffusion
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, Healing, SamplingParams

from .aligned_reference import assert_row_matches, block_causal

BLOCK, SUB_BLOCK = 8, 4
SIZES = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def fast_dllm(tmp_path_factory):
    """A published-style folder: Qwen2's weights (q/k/v biases, untied head) written by transformers'
    Qwen2, Fast_dLLM_v2_7B's config keys, remote code that raises, and a tokenizer whose [MASK] is
    the added token |<MASK>| it does not name as its mask token; and that Qwen2 model."""
    tokenizer = build_byte_tokenizer()
    tokenizer.add_tokens(["|<MASK>|"], special_tokens=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=False,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                             initializer_range=0.3, **SIZES)).eval()
        with torch.no_grad():  # biases and norms away from their initial zeros and ones
            for name, parameter in qwen2.named_parameters():
                if "bias" in name or "norm" in name:
                    parameter.normal_(1.0 if "norm" in name else 0.0, 0.3)
    folder = tmp_path_factory.mktemp("fast_dllm") / "Fast_dLLM_v2-tiny"
    qwen2.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("mask_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    config = dict(
        architectures=["Fast_dLLM_QwenForCausalLM"], auto_map={
            "AutoConfig": "configuration.Fast_dLLM_QwenConfig", "AutoModel": "modeling.Fast_dLLM_QwenModel",
            "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
        attention_dropout=0.0, bd_size=BLOCK, bos_token_id=tokenizer.bos_token_id, conplemenrary_mask=True,
        eos_token_id=tokenizer.eos_token_id, hidden_act="silu", initializer_range=0.02, max_window_layers=28,
        model_type="Fast_dLLM_Qwen", rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000.0,
        sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16", use_cache=True,
        use_sliding_window=False, vocab_size=len(tokenizer), diffbatch_sub_block=SUB_BLOCK, **SIZES)
    (folder / "config.json").write_text(json.dumps(config))
    for module in ("configuration", "modeling"):
        (folder / f"{module}.py").write_text("raise RuntimeError('remote code ran')\n")
    return load_model(str(folder), trust_remote_code=True), qwen2


def test_published_folder_loads_as_qwen2_with_a_block_causal_mask(fast_dllm):
    loaded, qwen2 = fast_dllm
    assert type(loaded.model) is FastDLLMv2ForBlockDiffusion and loaded.family == "fast_dllm_v2"
    assert loaded.tokenizer.mask_token_id is None
    assert loaded.mask_token_id == loaded.tokenizer.convert_tokens_to_ids("|<MASK>|")
    ids = torch.randint(0, loaded.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    causal = torch.ones(13, 13, dtype=torch.bool).tril()[None, None].expand(2, 1, 13, 13)
    with torch.no_grad():
        ours = loaded.model(input_ids=ids, attention_mask=causal).logits
        theirs = qwen2(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def fast_dllm_v2_decode(model, prompt: list[int], gen_length: int, *, mask_token_id: int, threshold: float,
                        first_allowed: tuple[int, ...] | None = None) -> list[int]:
    """The published batch_sample for one row at temperature 0 (whole blocks: at least gen_length new
    tokens). Blocks are cut from position 0; the output at position i predicts token i + 1; a block
    opens with the greedy prediction of the position before it (for the first block, only when the
    prompt fills whole blocks); then each sub-block, left to right, commits every masked position
    whose confidence exceeds the threshold, at least its most confident one. [MASK] itself is never
    a prediction; ``first_allowed`` restricts the first new token (token healing)."""
    total = -(-(len(prompt) + gen_length) // BLOCK) * BLOCK
    x = torch.full((1, total), mask_token_id)
    x[0, : len(prompt)] = torch.tensor(prompt)
    mask = block_causal(total, BLOCK)

    def logits_before(end: int) -> torch.Tensor:  # row j: the logits that predict position j
        logits = model(input_ids=x[:, :end], attention_mask=mask[..., :end, :end],
                       position_ids=torch.arange(end)[None]).logits[0].double()
        logits[:, mask_token_id] = float("-inf")
        shifted = torch.cat([logits[:1], logits[:-1]])
        if first_allowed is not None and len(prompt) < end:
            kept = shifted[len(prompt), list(first_allowed)]
            shifted[len(prompt)] = float("-inf")
            shifted[len(prompt), list(first_allowed)] = kept
        return shifted

    def open_block(start: int) -> None:
        x[0, start] = int(logits_before(start + 1)[start].argmax())

    if len(prompt) % BLOCK == 0:
        open_block(len(prompt))
    for start in range(len(prompt) // BLOCK * BLOCK, total, BLOCK):
        if start > len(prompt):
            open_block(start)
        for sub in range(start, start + BLOCK, SUB_BLOCK):
            while (masked := x[0, sub:sub + SUB_BLOCK] == mask_token_id).any():
                confidence, x0 = logits_before(start + BLOCK)[sub:sub + SUB_BLOCK].softmax(dim=-1).max(dim=-1)
                confidence[~masked] = float("-inf")
                chosen = confidence > threshold
                chosen[confidence.argmax()] = True
                x[0, sub:sub + SUB_BLOCK] = torch.where(chosen, x0, x[0, sub:sub + SUB_BLOCK])
    return x[0, len(prompt):].tolist()


PROMPT_LENGTHS = (3, 8, 11, 16, 7)  # a lead with no whole block, whole blocks (AR-opened), leads after blocks


@pytest.mark.parametrize("graphs", [False, True])
def test_engine_gives_fast_dllm_v2s_tokens_in_one_mixed_batch(fast_dllm, graphs):
    """Prompts that fill whole blocks (the first token autoregressive) and that end inside one,
    different max_tokens, in one continuous batch of 3, eager steps or the CUDA-graph protocol: each
    row gets the published sampler's tokens, several a pass at times."""
    loaded, _ = fast_dllm
    engine = Engine(loaded, max_batch_size=3, graphs=graphs)
    assert engine.default_block_length == BLOCK
    prompts = [[(7 + 31 * n + 17 * i) % 250 + 10 for i in range(n)] for n in PROMPT_LENGTHS]
    requests = [GenerationRequest(p, SamplingParams(max_tokens=9 + 4 * i, block_length=BLOCK, sampler="threshold",
                                                    threshold=0.3)) for i, p in enumerate(prompts)]
    parallel = False
    for request, result in zip(requests, engine.generate(requests), strict=False):
        expected = fast_dllm_v2_decode(loaded.model, request.prompt_ids, request.params.max_tokens,
                                       mask_token_id=loaded.mask_token_id, threshold=0.3)
        assert_row_matches(result, request, expected, loaded.eos_token_ids)
        parallel |= result.forward_passes < len(result.token_ids)
    assert parallel


def test_sampling_rows_get_the_same_tokens_with_the_graph_protocol(fast_dllm):
    """Rows that sample step eagerly under the graph setting (only greedy steps are captured for a
    shifted model), so their tokens and passes do not change with it."""
    loaded, _ = fast_dllm
    prompts = [[(3 + 11 * n + 7 * i) % 250 + 10 for i in range(n)] for n in PROMPT_LENGTHS]
    requests = [GenerationRequest(p, SamplingParams(max_tokens=12, block_length=BLOCK, temperature=0.8, seed=i,
                                                    sampler="threshold", threshold=0.3)) for i, p in enumerate(prompts)]
    eager, graphed = (Engine(loaded, max_batch_size=3, graphs=graphs).generate(requests) for graphs in (False, True))
    assert [(r.token_ids, r.forward_passes) for r in eager] == [(r.token_ids, r.forward_passes) for r in graphed]


def test_editing_rows_get_their_tokens_alone_and_with_the_graph_protocol(fast_dllm):
    """Token editing (LLaDA2.1's rule) on a shifted model with sub-blocks: it edits (the tokens
    differ from threshold alone), and a row gets the same tokens and passes alone, in a batch,
    eagerly or through the graph protocol."""
    loaded, _ = fast_dllm
    prompts = [[(3 + 11 * n + 7 * i) % 250 + 10 for i in range(n)] for n in PROMPT_LENGTHS]
    editing = dict(block_length=BLOCK, sampler="threshold", threshold=0.5, editing_threshold=0.1, max_post_steps=2)
    requests = [GenerationRequest(p, SamplingParams(max_tokens=12, **editing)) for p in prompts]
    eager, graphed = (Engine(loaded, max_batch_size=3, graphs=graphs).generate(requests) for graphs in (False, True))
    alone = [Engine(loaded, max_batch_size=1).generate([r])[0] for r in requests]
    runs = [[(r.token_ids, r.forward_passes) for r in run] for run in (eager, graphed, alone)]
    assert runs[0] == runs[1] == runs[2]
    plain = Engine(loaded, max_batch_size=3).generate(
        [GenerationRequest(p, SamplingParams(max_tokens=12, block_length=BLOCK, sampler="threshold", threshold=0.5))
         for p in prompts])
    assert any(e.token_ids != p.token_ids for e, p in zip(eager, plain, strict=False))


@pytest.mark.parametrize("length", [16, 6])  # the first token autoregressive, or denoised after a lead
def test_token_healing_binds_the_first_generated_token(fast_dllm, length):
    loaded, _ = fast_dllm
    engine = Engine(loaded, max_batch_size=2)
    prompt = [(5 + 13 * i) % 250 + 10 for i in range(length)]
    params = SamplingParams(max_tokens=8, block_length=BLOCK, sampler="threshold", threshold=0.9)
    free = engine.generate([GenerationRequest(prompt, params)])[0]
    allowed = tuple(t for t in range(10, 20) if t != free.token_ids[0])
    healed = GenerationRequest(prompt, params, healing=Healing(text="", allowed=allowed))
    result = engine.generate([healed])[0]
    expected = fast_dllm_v2_decode(loaded.model, prompt, 8, mask_token_id=loaded.mask_token_id, threshold=0.9,
                                   first_allowed=allowed)
    assert result.token_ids[0] in allowed and result.token_ids == expected[:8]


def test_what_the_shifted_blocks_cannot_do_is_refused(fast_dllm):
    loaded, _ = fast_dllm
    for cache in ("delayed", "none"):
        with pytest.raises(ValueError, match="exact cache only"):
            Engine(loaded, cache=cache)
    engine = Engine(loaded)
    template = [None, None, 100, None]
    with pytest.raises(ValueError, match="template is not supported"):
        engine.check(GenerationRequest([40, 50], SamplingParams(max_tokens=4), template_ids=template))
