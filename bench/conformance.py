"""diffbatch against each family's official generation code: completions token for token the same.

    python bench/conformance.py --official-python VENV/bin/python --fast-dllm PATH --llada PATH
                                [--families dream,llada] [--scales 0.35,0.1]

Not part of CI: it runs the official code (never copied here) from the paths given, each a
checkout or a bare git directory (its .py files are read out), in a second virtual environment
with the transformers 4 that code was written for (``--official-python``; e.g. torch and
transformers==4.57.1). For each family and weight scale, that side builds a tiny random model with
the official classes (2 layers, hidden 64, 4 heads, 2 KV heads; every parameter N(0, scale)), saves
it with diffbatch's byte-level tokenizer and runs the official generation on the prompts; this side
loads the same folder and generates with full recomputation (cache "none"), each prompt alone and
all in one batch. Prints per family, sampler and scale how many completions are the same (the
official ones cut at the first EOS, as diffbatch reports them).

[MASK] is kept out of the official predictions by setting its logit to -inf, as diffbatch does; a
trained model gives it no probability anyway. Official code used:
- Dream: NVlabs/Fast-dLLM ``dream/model`` (configuration, modeling, ``diffusion_generate``):
  alg confidence_threshold at threshold 0 (completion / steps a step: ``reference``) and maskgit_plus
  (``reference`` with ``schedule`` maskgit_plus); temperature 0.
- LLaDA: Fast-dLLM ``llada/model`` (modeling); ML-GSAI/LLaDA ``generate.py`` (low_confidence
  remasking: ``reference``); Fast-dLLM ``llada/generate.py`` with a threshold (``threshold``).
SDAR, LLaDA2.x and Fast-dLLM v2 are not here: their official repositories (JetAstra/SDAR,
inclusionAI/LLaDA2.0) hold no modeling code, which lives with the checkpoints, and Fast-dLLM's v2/
came after the snapshot this was written against.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

PROMPTS = ["hi", "The quick brown fox", "a", "def f(x):", "Once upon a time there", "12345"]
SEED = 0
# family -> (label, diffbatch SamplingParams, official call); one official call per prompt.
SETTINGS = {
    "dream": [
        ("reference 16 in 16 steps", dict(max_tokens=16, block_length=16, steps=16),
         dict(alg="confidence_threshold", threshold=0.0, max_new_tokens=16, steps=16)),
        ("reference 16 in 8 steps", dict(max_tokens=16, block_length=16, steps=8),
         dict(alg="confidence_threshold", threshold=0.0, max_new_tokens=16, steps=8)),
        ("reference maskgit_plus 16 in 16", dict(max_tokens=16, block_length=16, steps=16, schedule="maskgit_plus"),
         dict(alg="maskgit_plus", max_new_tokens=16, steps=16)),
        ("reference maskgit_plus 16 in 5", dict(max_tokens=16, block_length=16, steps=5, schedule="maskgit_plus"),
         dict(alg="maskgit_plus", max_new_tokens=16, steps=5)),
    ],
    "llada": [  # generate.py's steps count every block's; diffbatch's are per block
        ("reference 32, blocks of 16, 16 steps", dict(max_tokens=32, block_length=16, steps=16),
         dict(generate="reference", gen_length=32, block_length=16, steps=32)),
        ("reference 32, blocks of 8, 4 steps", dict(max_tokens=32, block_length=8, steps=4),
         dict(generate="reference", gen_length=32, block_length=8, steps=16)),
        ("threshold 0.9, blocks of 16", dict(max_tokens=32, block_length=16, sampler="threshold", threshold=0.9),
         dict(generate="threshold", gen_length=32, block_length=16, steps=32, threshold=0.9)),
        ("threshold 0.05, blocks of 16", dict(max_tokens=32, block_length=16, sampler="threshold", threshold=0.05),
         dict(generate="threshold", gen_length=32, block_length=16, steps=32, threshold=0.05)),
    ],
}
CODE = {"dream": ("fast_dllm",), "llada": ("fast_dllm", "llada")}  # the paths each family needs
USED = {"fast_dllm": ("dream/model/", "llada/model/", "llada/generate.py"), "llada": ("generate.py",)}


# ---- the official side (run by --official-python; imports nothing of diffbatch) ----------------------

def draw(model, scale: float, seed: int) -> None:
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # norms and biases too
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def official_dream(code: dict, folder: Path, spec: dict) -> list[list[list[int]]]:
    import torch
    sys.path.insert(0, str(Path(code["fast_dllm"]) / "dream"))
    from model.configuration_dream import DreamConfig
    from model.modeling_dream import DreamModel

    config = DreamConfig(vocab_size=spec["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=10000.0, mask_token_id=spec["mask"], pad_token_id=spec["pad"],
                         bos_token_id=spec["bos"], eos_token_id=spec["eos"], attn_implementation="sdpa")
    model = DreamModel(config).eval()
    draw(model, spec["scale"], SEED)
    model.save_pretrained(folder)
    mask = torch.tensor([spec["mask"]])

    def ban(step, x, logits):
        return logits.index_fill(-1, mask, float("-inf"))

    outputs = []
    for _, _, call in SETTINGS["dream"]:
        row = []
        for ids in spec["prompts"]:
            result = model.diffusion_generate(torch.tensor([ids]), temperature=0.0, generation_logits_hook_func=ban,
                                              return_dict_in_generate=True, **call)
            row.append(result.sequences[0, len(ids):].tolist())
        outputs.append(row)
    return outputs


def load_file(path: Path, name: str):
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def official_llada(code: dict, folder: Path, spec: dict) -> list[list[list[int]]]:
    import torch
    sys.path.insert(0, str(Path(code["fast_dllm"]) / "llada"))
    from model.configuration_llada import LLaDAConfig
    from model.modeling_llada import LLaDAModelLM

    config = LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=128, mlp_ratio=4,
                         activation_type="silu", block_type="llama", layer_norm_type="rms", rms_norm_eps=1e-5,
                         rope=True, rope_theta=500000.0, include_bias=False, include_qkv_bias=False,
                         vocab_size=spec["vocab_size"], embedding_size=spec["vocab_size"], weight_tying=False,
                         max_sequence_length=512, attention_dropout=0.0, residual_dropout=0.0,
                         embedding_dropout=0.0, flash_attention=False, init_device="cpu",
                         mask_token_id=spec["mask"], pad_token_id=spec["pad"], eos_token_id=spec["eos"])
    model = LLaDAModelLM(config, init_params=True).eval()
    draw(model, spec["scale"], SEED)
    model.save_pretrained(folder)
    reference = load_file(Path(code["llada"]) / "generate.py", "llada_generate").generate
    fast = load_file(Path(code["fast_dllm"]) / "llada" / "generate.py", "fast_dllm_generate").generate
    mask = torch.tensor([spec["mask"]])

    class MaskBanned(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, x, attention_mask=None):
            logits = model(x, attention_mask=attention_mask).logits
            return SimpleNamespace(logits=logits.index_fill(-1, mask, float("-inf")))

    banned = MaskBanned()
    outputs = []
    for _, _, call in SETTINGS["llada"]:
        call = dict(call)
        which = call.pop("generate")
        row = []
        for ids in spec["prompts"]:
            prompt = torch.tensor([ids])
            with torch.no_grad():
                if which == "reference":
                    x = reference(banned, prompt, temperature=0.0, remasking="low_confidence", mask_id=spec["mask"],
                                  **call)
                else:
                    x, _ = fast(banned, prompt, temperature=0.0, remasking="low_confidence", mask_id=spec["mask"],
                                **call)
            row.append(x[0, len(ids):].tolist())
        outputs.append(row)
    return outputs


def official_main(family: str, folder: str) -> None:
    spec = json.loads((Path(folder) / "spec.json").read_text())
    run = {"dream": official_dream, "llada": official_llada}[family]
    outputs = run(spec["code"], Path(folder), spec)
    (Path(folder) / "official.json").write_text(json.dumps(outputs))


# ---- diffbatch's side ------------------------------------------------------------------------------

def source_tree(name: str, path: str, scratch: Path) -> str:
    """``path`` itself if it is a checkout; from a bare git directory, the files of it used here
    (``USED[name]``) read out under ``scratch``."""
    root = Path(path)
    if not ((root / "objects").is_dir() and (root / "HEAD").is_file()):
        return str(root)
    out = scratch / name
    names = subprocess.run(["git", "--git-dir", str(root), "ls-tree", "-r", "--name-only", "HEAD"],
                           check=True, capture_output=True, text=True).stdout.split()
    for file in (n for n in names if n.endswith(".py") and n.startswith(USED[name])):
        text = subprocess.run(["git", "--git-dir", str(root), "show", f"HEAD:{file}"], capture_output=True).stdout
        (out / file).parent.mkdir(parents=True, exist_ok=True)
        (out / file).write_bytes(text)
    return str(out)


def cut_at_eos(tokens: list[int], eos_ids) -> list[int]:
    ends = [i for i, token in enumerate(tokens) if token in eos_ids]
    return tokens[: ends[0]] if ends else tokens


def same(got: list[list[int]], want: list[list[int]]) -> str:
    return f"{sum(g == w for g, w in zip(got, want, strict=True))}/{len(want)}"


def compare(family: str, scale: float, args, code: dict, scratch: Path) -> list[tuple[str, str, str, str]]:
    """(label, alone k/N, batched k/N, note) per setting of ``family`` at weight ``scale``."""
    from worker.engine.builtin.tokenizer import build_byte_tokenizer
    from worker.engine.engine import Engine
    from worker.engine.loader import load_model
    from worker.engine.params import GenerationRequest, SamplingParams

    folder = scratch / f"{family}-{scale}"
    folder.mkdir(parents=True)
    tokenizer = build_byte_tokenizer()
    tokenizer.save_pretrained(folder)
    spec = dict(code=code, scale=scale, vocab_size=len(tokenizer), mask=tokenizer.mask_token_id,
                pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                prompts=[list(tokenizer(p)["input_ids"]) for p in PROMPTS])
    (folder / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([args.official_python, __file__, "official", family, str(folder)],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{family}: the official side failed:\n{done.stderr[-3000:]}")
    official = json.loads((folder / "official.json").read_text())
    loaded = load_model(str(folder))
    engine = Engine(loaded, max_batch_size=len(PROMPTS), cache="none")
    rows = []
    for (label, params, _), want in zip(SETTINGS[family], official, strict=True):
        want = [cut_at_eos(tokens, loaded.eos_token_ids) for tokens in want]
        try:
            requests = [GenerationRequest(list(ids), SamplingParams(**params)) for ids in spec["prompts"]]
            alone = [engine.generate([request])[0].token_ids for request in requests]
            batched = [result.token_ids for result in engine.generate(requests)]
        except (TypeError, ValueError) as error:  # an option this diffbatch does not have
            rows.append((label, "n/a", "n/a", f"  ({error})"))
            continue
        rows.append((label, same(alone, want), same(batched, want), ""))
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "official":
        official_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-python", required=True, help="python of a venv with transformers 4")
    parser.add_argument("--fast-dllm", help="NVlabs/Fast-dLLM: checkout or bare git directory")
    parser.add_argument("--llada", help="ML-GSAI/LLaDA: checkout or bare git directory")
    parser.add_argument("--families", default="dream,llada")
    parser.add_argument("--scales", default="0.35,0.1")
    args = parser.parse_args()
    print(f"{'family':8} {'sampler':38} {'scale':>5}  {'alone':>6} {'batch':>6}")
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        scratch = Path(tmp)
        for family in args.families.split(","):
            paths = {name: getattr(args, name) for name in CODE[family]}
            if not all(paths.values()):
                print(f"{family:8} skipped: needs --{' --'.join(n.replace('_', '-') for n in CODE[family])}")
                continue
            code = {name: source_tree(name, path, scratch / "code") for name, path in paths.items()}
            for scale in (float(s) for s in args.scales.split(",")):
                for label, alone, batched, note in compare(family, scale, args, code, scratch):
                    print(f"{family:8} {label:38} {scale:>5}  {alone:>6} {batched:>6}{note}", flush=True)


if __name__ == "__main__":
    main()
