"""DiffusionGemma's own ``model.generate()``, re-stated step by step: the exactness baseline.

A batch of rows (left-padded, one seed, one setting) runs exactly the calls of transformers
``generation_diffusion_gemma.py`` (``DiffusionGemmaGenerationMixin.generate`` with a DynamicCache)
in the same order, drawing from a ``torch.Generator`` seeded with the batch's seed where generate
draws from the global one; so the tokens equal ``torch.manual_seed(seed); model.generate(...)``.
It keeps generate's batch-synchronous costs on purpose: rows wait for the whole batch.
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from .settings import DenoiseSettings


def _temperature_scaled(logits: torch.Tensor, settings: DenoiseSettings, cur_step: int) -> torch.Tensor:
    # As LinearTemperatureScheduleLogitsProcessor, with cur_step a 0-dim int32 tensor as in generate.
    step = torch.tensor(cur_step, device=logits.device, dtype=torch.int32)
    temperature = settings.t_min + ((settings.t_max - settings.t_min) * (step / settings.max_steps))
    return logits / temperature


def _accept(logits: torch.Tensor, bound: float) -> torch.Tensor:
    entropy = torch.distributions.Categorical(logits=logits).entropy()  # (B, L)
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    passes = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.scatter(input=torch.zeros_like(passes), dim=-1, index=order, src=passes)


class _StableAndConfident:
    """generate's StableAndConfidentStoppingCriteria, reset per canvas."""

    def __init__(self, settings: DenoiseSettings):
        stability, confidence = settings.stability_threshold, settings.confidence_threshold
        if stability is None or confidence is None:
            raise ValueError("the adaptive stop needs a stability and a confidence threshold")
        self.stability, self.confidence = stability, confidence
        self.history: torch.Tensor | None = None

    def __call__(self, argmax: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.stability == 0:
            stable = torch.ones((logits.shape[0]), device=logits.device, dtype=torch.bool)
        else:
            if self.history is None:
                self.history = torch.full((self.stability, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
            stable = (self.history == argmax[None, :, :]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        entropy = torch.distributions.Categorical(logits=logits).entropy()
        return stable & (torch.mean(entropy, dim=-1) < self.confidence)


@torch.inference_mode()
def generate_reference(model, prompts: list[list[int]], *, settings: DenoiseSettings, max_new_tokens: int,
                       seed: int, pad_token_id: int, eos_token_ids: tuple[int, ...],
                       all_done=None) -> tuple[list[list[int]], list[int]]:
    """Generated tokens (whole canvases, not cut) and decoder passes per row, as generate counts them.
    ``all_done(generated_rows) -> bool`` may end the batch early (e.g. every row hit a stop string),
    which only skips canvases whose tokens nobody keeps.
    """
    device = next(model.parameters()).device
    batch_size, prompt_length = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch_size, prompt_length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, prompt_length), dtype=torch.bool)
    for row, prompt in enumerate(prompts):  # left padding: every row's canvas starts at the same index
        input_ids[row, prompt_length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, prompt_length - len(prompt):] = True
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    canvas_length, vocab_size = model.config.canvas_length, model.config.text_config.vocab_size
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    cur_len, max_length = prompt_length, prompt_length + max_new_tokens
    encoder_positions = torch.arange(0, cur_len, dtype=torch.int32, device=device)[None]
    decoder_positions = torch.arange(cur_len, cur_len + canvas_length, dtype=torch.int32, device=device)[None]
    decoder_attention_mask = torch.nn.functional.pad(attention_mask, (0, canvas_length), value=True)
    eos = torch.tensor(list(eos_token_ids), device=device) if eos_token_ids else None
    finished_sequences = torch.zeros(batch_size, dtype=torch.bool, device=device)
    passes = torch.zeros(batch_size, dtype=torch.int, device=device)
    embed_dtype = model.model.decoder.embed_tokens.weight.dtype
    stopper = _StableAndConfident(settings) if settings.adaptive_stop else None

    for canvas_index in range(math.ceil(max_new_tokens / canvas_length)):
        # 1.a encode the new prefix tokens (the prompt, then each finished canvas) into the cache
        new_ids = (input_ids if canvas_index == 0 else input_ids[:, -canvas_length:]).clone(
            memory_format=torch.contiguous_format)
        dummy = torch.empty((batch_size, new_ids.shape[1], 0), dtype=model.dtype, device=device)
        encoder_masks = model.model.encoder.create_masks_for_generate(
            config=model.config, inputs_embeds=dummy, attention_mask=attention_mask, cache=cache,
            position_ids=encoder_positions, mm_token_type_ids=None)
        model.model.encoder(input_ids=new_ids, attention_mask=encoder_masks, cache=cache,
                            position_ids=encoder_positions)
        # 1.b a random canvas
        canvas = torch.randint(0, vocab_size, (batch_size, canvas_length), generator=generator, device=device)
        decoder_masks = model.model.decoder.create_diffusion_decoder_attention_mask(
            config=model.config, inputs_embeds=canvas.unsqueeze(-1), cache=cache,
            decoder_attention_mask=decoder_attention_mask)
        finished_denoising = torch.zeros(batch_size, dtype=torch.bool, device=device)
        if stopper is not None:
            stopper.history = None
        argmax, self_conditioning = canvas, None  # self-conditioning from the second step on
        # 1.c denoise, cur_step counting down
        for cur_step in reversed(range(1, settings.max_steps + 1)):
            passes += ~(finished_denoising | finished_sequences)
            logits = model(decoder_input_ids=canvas, self_conditioning_logits=self_conditioning,
                           decoder_attention_mask=decoder_masks, cache=cache,
                           decoder_position_ids=decoder_positions).logits
            processed = _temperature_scaled(logits, settings, cur_step)
            probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
            denoised = torch.multinomial(probs.view(-1, vocab_size), num_samples=1, generator=generator)
            denoised = denoised.squeeze(-1).view(batch_size, canvas_length)
            new_argmax = torch.argmax(processed, dim=-1)
            accept = _accept(processed, settings.entropy_bound)
            accepted = torch.where(accept, denoised, canvas)
            noise = torch.randint(0, vocab_size, (batch_size, canvas_length), generator=generator, device=device)
            new_canvas = torch.where(~accept, noise, accepted)
            if stopper is not None:
                if self_conditioning is not None and finished_denoising.any():  # rows that stopped keep their state
                    new_argmax = torch.where(finished_denoising[:, None], argmax, new_argmax)
                    new_canvas = torch.where(finished_denoising[:, None], canvas, new_canvas)
                    processed = torch.where(finished_denoising[:, None, None], self_conditioning, processed)
                finished_denoising |= stopper(new_argmax, processed)
            canvas, argmax, self_conditioning = new_canvas, new_argmax, processed.to(embed_dtype)
            if torch.all(finished_denoising):
                break
        # 1.d/e append the canvas; rows end at EOS or max length (generate then pads them, which
        # changes nothing anyone keeps)
        input_ids = torch.cat([input_ids, argmax], dim=-1)
        finished_sequences |= input_ids.shape[1] >= max_length
        if eos is not None:
            finished_sequences |= torch.isin(argmax, eos).any(dim=-1)
        generated = input_ids[:, prompt_length:].tolist()
        if torch.all(finished_sequences) or (all_done is not None and all_done(generated)):
            break
        # 1.f the next canvas follows
        cur_len += canvas_length
        decoder_attention_mask = torch.nn.functional.pad(decoder_attention_mask, (0, canvas_length), value=True)
        attention_mask = torch.nn.functional.pad(attention_mask, (0, canvas_length), value=True)
        encoder_positions = decoder_positions
        decoder_positions = torch.arange(cur_len, cur_len + canvas_length, dtype=torch.int32, device=device)[None]
    return input_ids[:, prompt_length:].tolist(), passes.tolist()
