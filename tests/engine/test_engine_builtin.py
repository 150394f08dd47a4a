"""The built-in model, its tokenizer and the tiny checkpoint writer."""

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM

import worker.engine.builtin as builtin
from worker.engine.builtin.create import create_tiny_random_model
from worker.engine.loader import load_model


def test_checkpoint_folder_is_complete(tiny_path):
    names = {p.name for p in tiny_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["model_type"] == "diffbatch_mdm"
    assert config["diffbatch_family"] == "block_causal"
    assert config["block_length"] == 32
    assert config["vocab_size"] == 263


def test_creation_is_deterministic_per_seed(tmp_path, tiny_path):
    again = load_file(create_tiny_random_model(tmp_path / "a", seed=0) / "model.safetensors")
    other = load_file(create_tiny_random_model(tmp_path / "b", seed=1) / "model.safetensors")
    original = load_file(tiny_path / "model.safetensors")
    assert all(torch.equal(original[k], again[k]) for k in original)
    assert not torch.equal(original["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_checkpoint_keeps_separate_projections_and_loads_them_fused(tmp_path, tiny_path):
    """On disk: q/k/v and gate/up apart (the layout other tools read, and the shipped checkpoint's);
    in memory: one matrix each, rows in that order; saving splits them back unchanged."""
    stored = load_file(tiny_path / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in stored and "model.layers.0.mlp.up_proj.weight" in stored
    model = load_model(str(tiny_path)).model
    layer = model.model.layers[1]
    assert torch.equal(layer.self_attn.qkv_proj.weight,
                       torch.cat([stored[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat(
        [stored["model.layers.1.mlp.gate_proj.weight"], stored["model.layers.1.mlp.up_proj.weight"]]))
    model.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == stored.keys()
    assert all(torch.equal(again[k], stored[k]) for k in stored)


def test_loader_fields(loaded):
    assert loaded.name == "diffbatch-tiny-random"
    assert loaded.family == "block_causal"
    assert loaded.max_positions == 2048
    tokenizer = loaded.tokenizer
    assert loaded.mask_token_id == tokenizer.convert_tokens_to_ids("<|mask|>")
    assert loaded.eos_token_id == tokenizer.convert_tokens_to_ids("<|eos|>")
    assert loaded.pad_token_id == tokenizer.convert_tokens_to_ids("<|pad|>")
    assert loaded.model.dtype == torch.float32 and not loaded.model.training


def test_save_and_reload_gives_identical_logits(loaded, tmp_path):
    model = loaded.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.tensor([[1, 40, 50, 60, 3, 3, 3], [1, 70, 80, 90, 100, 3, 3]])
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        after = reloaded(ids).logits
    assert before.shape == (2, 7, 263)
    assert torch.equal(before, after)


def test_registration_is_idempotent(tiny_path):
    importlib.reload(builtin)
    assert load_model(str(tiny_path)).family == "block_causal"


def test_attention_mask_is_honoured(loaded):
    """Keys hidden by the mask must not change a query's logits (what the engine relies on)."""
    model = loaded.model
    ids = torch.randint(7, 263, (1, 8), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 6:] = 3
    blocks = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    mask = (blocks[None, :] <= blocks[:, None])[None, None]  # (1, 1, L, L)
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(changed, attention_mask=mask).logits
    assert torch.allclose(a[0, :6], b[0, :6], atol=1e-6)
    assert not torch.allclose(a[0, 6:], b[0, 6:])


@torch.inference_mode()
def test_writing_into_a_cache_buffer_equals_appending_to_the_cache(loaded):
    """write_offset (the scheduler's exact cache: one buffer per block, steps write in place) gives the
    logits and keys of the concatenating path, and touches only its own columns of the buffer."""
    model = loaded.model
    ids = torch.randint(7, 263, (2, 14), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(14).expand(2, -1)
    past = model(ids[:, :10], position_ids=positions[:, :10], use_cache=True).key_values
    mask = torch.ones((2, 1, 4, 14), dtype=torch.bool)
    appended = model(ids[:, 10:], past_key_values=past, attention_mask=mask, position_ids=positions[:, 10:],
                     use_cache=True)
    buffers = [tuple(torch.cat([t, torch.full_like(t[:, :, :6], 7.0)], dim=2) for t in kv) for kv in past]
    written = model(ids[:, 10:], past_key_values=buffers, write_offset=10, attention_mask=mask,
                    position_ids=positions[:, 10:], use_cache=True)
    torch.testing.assert_close(written.logits, appended.logits, rtol=0, atol=1e-5)
    for (k, v), (k2, v2) in zip(buffers, appended.key_values, strict=False):
        torch.testing.assert_close(k[:, :, :14], k2, rtol=0, atol=1e-6)
        torch.testing.assert_close(v[:, :, :14], v2, rtol=0, atol=1e-6)
        assert bool((k[:, :, 14:] == 7.0).all())  # columns past the written ones untouched


def test_tokenizer_round_trips_unicode(loaded):
    tokenizer = loaded.tokenizer
    text = "Grüße, 世界! 🎉 émoji\n\ttabs  and\x00nul — ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id


def test_chat_template_produces_ids(engine, loaded):
    ids = engine.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    tokenizer = loaded.tokenizer
    assert ids[0] == tokenizer.bos_token_id
    text = tokenizer.decode(ids)
    assert text == "<|bos|><|system|>\nbe brief<|eos|>\n<|user|>\nhi<|eos|>\n<|assistant|>\n"


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         "only text message content is supported"),
        ([{"role": "wizard", "content": "hi"}], "unsupported chat role"),
        ([], "non-empty"),
    ],
)
def test_chat_rejects_bad_messages(engine, messages, error):
    with pytest.raises(ValueError, match=error):
        engine.encode_chat(messages)
