"""The training loop: seeded, resumable, time-bounded, with a progress bar and a JSON-lines log.

Files in ``out_dir``: ``tokenizer/`` (trained once), ``state.pt`` (model, optimizer and step; written
atomically), ``log.jsonl`` (one line per logged step and per evaluation), and ``model/`` (the export:
``save_pretrained`` safetensors in bfloat16 plus tokenizer files, loadable by the worker).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PreTrainedTokenizerFast

from worker.engine.builtin import DiffbatchMDMForMaskedDiffusion
from worker.engine.builtin.create import config_for

from .ar import ar_loss, build_ar_model
from .corpus import list_sources, split
from .data import TokenStream, encode_files, sample_starts, step_generator
from .objective import LossParts, diffusion_loss
from .tokenizer import train_bpe_tokenizer


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): there autocast makes the
    matmuls ~2x faster than float32; without it (an AVX2-only CPU) oneDNN emulates them, measured 400x
    slower (a 2048-square matmul: 56.7 s against 0.13 s), so training runs in float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: float32, always correct
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class TrainConfig:
    out_dir: Path
    # Shape and vocabulary chosen by held-out bits per byte per minute (bench/train_sweep.py).
    steps: int = 1600  # the learning-rate schedule's length; --max-minutes may stop earlier
    max_minutes: float | None = None
    vocab_size: int = 8192
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    intermediate_size: int = 1024
    block_length: int = 32
    seq_length: int = 256
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    bf16: bool = field(default_factory=cpu_has_bf16_matmul)  # autocast on CPU where it pays
    eval_every: int = 100
    eval_windows: int = 64
    checkpoint_every_s: float = 300.0
    name: str = "diffbatch-py-mini"
    corpus_root: Path | None = None  # default: the running interpreter's standard library
    # An exported model folder to start from (its weights and tokenizer) with a fresh optimizer and
    # schedule: how a run goes on from a shipped checkpoint whose state.pt is gone.
    init_from: Path | None = None
    # "diffusion" (the built-in model) or "ar": its autoregressive twin (training/ar.py), same shape,
    # data, windows and schedule, for bench/vs_ar.py.
    objective: str = "diffusion"
    # Where the tokenizer comes from when the run has none yet and no --init-from: a model folder.
    # None trains one on the corpus (deterministic for the same corpus and vocabulary size).
    tokenizer_from: Path | None = None


def recorded_objective(out_dir: Path) -> str | None:
    """The objective a run folder was started with (its log's first line), None for a new folder."""
    try:
        with (Path(out_dir) / "log.jsonl").open() as log:
            first = json.loads(log.readline())
    except (OSError, ValueError):
        return None
    return first.get("config", {}).get("objective", "diffusion") if isinstance(first, dict) else None


def train(config: TrainConfig) -> dict:
    """Train (or resume) and export; returns the last evaluation."""
    out = Path(config.out_dir)
    recorded = recorded_objective(out)
    if recorded is not None and recorded != config.objective and (out / "state.pt").is_file():
        raise ValueError(f"{out} is a run of objective {recorded!r}; resume it with --objective {recorded}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    tokenizer, train_stream, held_out = _prepare_data(config, out)
    model = _build_model(config, tokenizer)
    if config.init_from is not None and not (out / "state.pt").is_file():
        _load_weights(model, Path(config.init_from))
    mask_id = tokenizer.mask_token_id
    return run(config, "train", model, tokenizer, held_out,
               lambda optimizer, step: _train_step(model, optimizer, config, train_stream, step, mask_id))


def run(config: TrainConfig, label: str, model, tokenizer, held_out: TokenStream, take_step, **first_log) -> dict:
    """The loop both training commands share: AdamW, resumed from ``out_dir/state.pt``, then
    ``take_step(optimizer, step) -> figures`` (at the schedule's learning rate) until ``config.steps``
    or the deadline, with a progress bar, a log line every 10 steps, a held-out evaluation every
    ``eval_every`` (and at step 0, the baseline), ``state.pt`` every ``checkpoint_every_s``, and the
    export at the end. ``first_log`` goes into step 0's log line. Returns the step and the last evaluation."""
    out = Path(config.out_dir)
    mask_id = tokenizer.mask_token_id
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.learning_rate,
                                  betas=(0.9, 0.95))
    step = _resume(out / "state.pt", model, optimizer)
    log = (out / "log.jsonl").open("a")
    started = last_checkpoint = time.monotonic()
    deadline = None if config.max_minutes is None else started + 60 * config.max_minutes
    last_eval = {}
    if step == 0:  # the starting point, so the log shows what the run bought
        _write(log, {"step": 0, "config": config_record(config), **first_log,
                     "eval": evaluate(model, config, held_out, mask_id)})
    with _progress() as progress:
        task = progress.add_task(label, total=config.steps, completed=step, loss=float("nan"))
        while step < config.steps and (deadline is None or time.monotonic() < deadline):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            figures = {**take_step(optimizer, step), "lr": round(optimizer.param_groups[0]["lr"], 6)}
            step += 1
            progress.update(task, completed=step, loss=figures["loss"])
            if step % 10 == 0:
                _write(log, {"step": step, **figures, "elapsed_s": round(time.monotonic() - started, 1)})
            if step % config.eval_every == 0 or step == config.steps:
                last_eval = evaluate(model, config, held_out, mask_id)
                _write(log, {"step": step, "eval": last_eval})
            if time.monotonic() - last_checkpoint > config.checkpoint_every_s:
                _save_state(out / "state.pt", model, optimizer, step)
                last_checkpoint = time.monotonic()
    _save_state(out / "state.pt", model, optimizer, step)
    if not last_eval:
        last_eval = evaluate(model, config, held_out, mask_id)
    export(model, tokenizer, out / "model")
    return {"step": step, **last_eval}


def _prepare_data(config: TrainConfig, out: Path):
    train_files, held_out_files = split(list_sources(config.corpus_root))
    if not train_files or not held_out_files:
        raise ValueError("the corpus needs both training and held-out files")
    tokenizer_dir = out / "tokenizer"
    if tokenizer_dir.is_dir():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    elif (source := config.init_from or config.tokenizer_from) is not None:  # those ids, not a new vocabulary
        tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
        tokenizer.save_pretrained(tokenizer_dir)
    else:
        tokenizer = train_bpe_tokenizer((s.text for s in train_files), vocab_size=config.vocab_size)
        tokenizer.model_max_length = 2048
        tokenizer.save_pretrained(tokenizer_dir)
    return tokenizer, encode_files(tokenizer, train_files), encode_files(tokenizer, held_out_files)


def _build_model(config: TrainConfig, tokenizer):
    if config.objective == "ar":
        return build_ar_model(tokenizer, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                              num_attention_heads=config.num_attention_heads,
                              intermediate_size=config.intermediate_size)
    model_config = config_for(
        tokenizer, name=config.name, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=2048, block_length=config.block_length)
    return DiffbatchMDMForMaskedDiffusion(model_config).train()


def _load_weights(model, folder: Path) -> None:
    """Copy an exported model's weights (bf16 on disk) into the fp32 training model; shapes must match."""
    exported = type(model).from_pretrained(folder, dtype=torch.float32)
    model.load_state_dict(exported.state_dict())


def _param_groups(model, weight_decay: float) -> list[dict]:
    # No decay on norms (1-D weights); the tied embedding is decayed like any matrix.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% at ``config.steps``."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train_step(model, optimizer, config: TrainConfig, stream: TokenStream, step: int, mask_id: int) -> dict:
    parts = data_loss(model, config, stream, config.batch_size, step_generator(config.seed, step), mask_id)
    update(model, optimizer, parts.loss)
    return {"loss": round(parts.loss.item(), 4),
            "masked_ce": round(parts.masked_ce_sum.item() / max(1, parts.masked_count), 4)}


def data_loss(model, config: TrainConfig, stream: TokenStream, batch_size: int, generator: torch.Generator,
              mask_id: int):
    """The diffusion loss on ``batch_size`` random windows of ``stream``, with a prompt of random length
    (the twin's next-token loss on the same windows, for the "ar" objective)."""
    x0 = stream.windows(sample_starts(stream, batch_size, config.seq_length, generator), config.seq_length)
    if config.objective == "ar":
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            return ar_loss(model, x0)
    prompt_length = int(torch.randint(0, config.seq_length - config.block_length, (1,), generator=generator))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        return diffusion_loss(model, x0, mask_token_id=mask_id, block_length=config.block_length,
                              prompt_length=prompt_length, generator=generator)


def update(model, optimizer, loss: torch.Tensor) -> None:
    """One optimizer step on ``loss``, gradients clipped to norm 1."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


@torch.no_grad()
def evaluate(model, config: TrainConfig, held_out: TokenStream, mask_id: int) -> dict:
    """Held-out figures on fixed windows and noise (the same every call, so runs compare):
    ``masked_ce`` nats per masked token, ``elbo_bits_per_byte`` the weighted loss per UTF-8 byte
    (comparable across vocabularies)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(12345)
    total_loss, ce_sum, ce_count, scored = 0.0, 0.0, 0, 0
    batch = min(config.batch_size, config.eval_windows)
    for _ in range(0, config.eval_windows, batch):
        x0 = held_out.windows(sample_starts(held_out, batch, config.seq_length, generator), config.seq_length)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            parts = _held_out_loss(model, config, x0, mask_id, generator)
        region = x0.shape[0] * (x0.shape[1] - 0)
        total_loss += parts.loss.item() * region
        scored += region
        ce_sum += parts.masked_ce_sum.item()
        ce_count += parts.masked_count
    model.train(was_training)
    tokens_per_byte = len(held_out.ids) / held_out.num_bytes
    elbo = total_loss / scored
    return {"masked_ce": round(ce_sum / ce_count, 4), "elbo_nats_per_token": round(elbo, 4),
            "elbo_bits_per_byte": round(elbo * tokens_per_byte / math.log(2), 4)}


def _held_out_loss(model, config: TrainConfig, x0: torch.Tensor, mask_id: int,
                   generator: torch.Generator) -> LossParts:
    """The twin's loss is its exact negative log-likelihood per token, the diffusion model's an upper
    bound on it (the ELBO): per byte, the two compare, with the bound at a disadvantage."""
    if config.objective == "ar":
        return ar_loss(model, x0)
    return diffusion_loss(model, x0, mask_token_id=mask_id, block_length=config.block_length, prompt_length=0,
                          generator=generator)


def export(model, tokenizer, path: Path) -> Path:
    """save_pretrained in bfloat16 (half the bytes; the loader upcasts on CPU) plus the tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)  # a copy: training goes on in fp32
    tokenizer.save_pretrained(path)
    return path


def export_checkpoint(config: TrainConfig, destination: Path) -> int:
    """Export the run's last saved state (``state.pt``) to ``destination``, as the objective the run
    was started with; returns its step."""
    out = Path(config.out_dir)
    config = replace(config, objective=recorded_objective(out) or config.objective)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    model = _build_model(config, tokenizer)
    state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    export(model.eval(), tokenizer, Path(destination))
    return int(state["step"])


def _resume(path: Path, model, optimizer) -> int:
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _save_state(path: Path, model, optimizer, step: int) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, temporary)
    os.replace(temporary, path)  # a crash mid-write leaves the previous checkpoint intact


def _write(log, record: dict) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()


def _progress() -> Progress:
    return Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn())


def config_record(config: TrainConfig) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
