"""DiffusionGemma's two halves as batched calls over rows of different lengths.

The encoder (causal, over the clean prefix) writes keys/values into a ``RowKVCache``; the decoder
(bidirectional over the canvas) reads them, read-only, and returns the canvas logits. Both run the
checkpoint's own modules (``DiffusionGemmaForBlockDiffusion``) with explicit per-row position ids and
masks, so a row sees exactly what it would see alone.
"""

from __future__ import annotations

import torch

from .cache import RowKVCache
from .masks import decoder_masks, encoder_masks, for_attention


class DiffusionGemmaAdapter:
    def __init__(self, model, pad_token_id: int):
        config = model.config
        self.text_config = config.get_text_config()
        if getattr(self.text_config, "use_bidirectional_attention", None) == "all":
            raise ValueError("DiffusionGemma checkpoints with a bidirectional encoder are not supported")
        self.model = model
        self.pad_token_id = pad_token_id
        self.canvas_length = int(config.canvas_length)
        self.vocab_size = int(self.text_config.vocab_size)
        self.window = int(self.text_config.sliding_window)
        self.num_layers = int(self.text_config.num_hidden_layers)
        self.device = next(model.parameters()).device
        self.embed_dtype = model.model.decoder.embed_tokens.weight.dtype
        self.attn_implementation = self.text_config._attn_implementation

    def new_cache(self, num_slots: int) -> RowKVCache:
        return RowKVCache(self.num_layers, num_slots, self.device, capacity_step=4 * self.canvas_length)

    @torch.inference_mode()
    def encode(self, cache: RowKVCache, slots: list[int], token_lists: list[list[int]]) -> None:
        """Append each row's new tokens (a prompt, or a finished canvas) to its slot's prefix."""
        num_new = max(len(tokens) for tokens in token_lists)
        input_ids = torch.full((len(slots), num_new), self.pad_token_id, dtype=torch.long)
        for i, tokens in enumerate(token_lists):
            input_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        writer, positions = cache.writer(slots, num_new)
        masks = encoder_masks(positions, writer.span, self.window)
        # Padded tokens land past the row's new length: masked for the row and overwritten later.
        self.model.model.encoder.language_model(
            input_ids=input_ids.to(self.device), position_ids=positions, cache=writer,
            attention_mask=for_attention(masks, self.attn_implementation, self.embed_dtype))
        for slot, tokens in zip(slots, token_lists, strict=False):
            cache.lengths[slot] += len(tokens)

    @torch.inference_mode()
    def decode(self, cache: RowKVCache, canvas: torch.Tensor, sc_logits: torch.Tensor | None,
               sc_valid: torch.Tensor | None) -> torch.Tensor:
        """Logits (n, L, V) float32 for the canvases (n, L) of slots 0..n-1. ``sc_logits`` (n, L, V): the
        previous step's processed logits (self-conditioning); ``sc_valid`` (n,) False for rows at the first
        step of a canvas (a zero signal, as in generate)."""
        num_rows = canvas.shape[0]
        view = cache.decoder_view(num_rows)
        lengths = torch.tensor(cache.lengths[:num_rows], device=self.device)
        span = view.layers[0].keys.shape[2]
        positions = lengths[:, None] + torch.arange(self.canvas_length, device=self.device)[None]  # (n, L)
        masks = decoder_masks(lengths, span, self.canvas_length, self.window)
        output = self.model(
            cache=view, decoder_input_ids=canvas, self_conditioning_logits=sc_logits,
            self_conditioning_mask=sc_valid, decoder_position_ids=positions,
            decoder_attention_mask=for_attention(masks, self.attn_implementation, self.embed_dtype))
        return output.logits
