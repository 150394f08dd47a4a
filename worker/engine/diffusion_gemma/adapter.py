"""DiffusionGemma's two halves as batched calls over rows of different lengths.

The encoder (causal, over the clean prefix) writes keys/values into a ``RowKVCache``; the decoder
(bidirectional over the canvas) reads them, read-only, and returns the canvas's hidden states; the LM
head and the self-conditioning input are separate calls, so the sampler can run them a few canvases at a
time (``chunked.py``) and no (rows, canvas, vocabulary) tensor spans the batch. All run the checkpoint's
own modules (``DiffusionGemmaForBlockDiffusion``) with explicit per-row position ids and
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
        self.hidden_size = int(self.text_config.hidden_size)
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

    def decoder_inputs(self, cache: RowKVCache, num_rows: int):
        """What the decoder reads for slots 0..n-1: the cache view, canvas positions (n, L) and masks."""
        view = cache.decoder_view(num_rows)
        lengths = torch.tensor(cache.lengths[:num_rows], device=self.device)
        span = view.layers[0].keys.shape[2]
        positions = lengths[:, None] + torch.arange(self.canvas_length, device=self.device)[None]  # (n, L)
        masks = decoder_masks(lengths, span, self.canvas_length, self.window)
        return view, positions, for_attention(masks, self.attn_implementation, self.embed_dtype)

    @torch.inference_mode()
    def decode(self, cache: RowKVCache, canvas: torch.Tensor, signal: torch.Tensor | None) -> torch.Tensor:
        """Last hidden states (n, L, H) for the canvases (n, L) of slots 0..n-1, before the LM head.

        ``signal`` (n, L, H): the soft embeddings of the previous step (``self_conditioning_input``), zero
        for rows at the first step of a canvas; None: every row is at its first step (generate's zeros).
        """
        view, positions, masks = self.decoder_inputs(cache, canvas.shape[0])
        decoder = self.model.model.decoder
        # The decoder derives the soft embeddings from (n, L, V) logits; handing them over ready-made
        # keeps those logits out of memory. Without logits it passes zeros, which the hook replaces.
        hook = None if signal is None else decoder.self_conditioning.register_forward_pre_hook(
            lambda module, args: (args[0], signal))
        try:
            output = decoder(decoder_input_ids=canvas, cache=view, self_conditioning_logits=None,
                             decoder_attention_mask=masks, decoder_position_ids=positions)
        finally:
            if hook is not None:
                hook.remove()
        return output.last_hidden_state

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits (r, L, V) of hidden states (r, L, H), as the model's forward computes them
        (LM head, float32, final soft-capping), the capping in place."""
        logits = self.model.lm_head(hidden).to(torch.float32)
        softcap = self.model.final_logit_softcapping
        if softcap is not None:
            logits.div_(softcap).tanh_().mul_(softcap)
        return logits

    @torch.inference_mode()
    def self_conditioning_input(self, processed: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The soft embeddings (r, L, H) the decoder derives from self-conditioning logits ``processed``
        (r, L, V), as it does: the logits in the embeddings' dtype (as generate keeps them), their float32
        softmax in that dtype, times the embedding matrix and scale. ``probs``: ``processed``'s float32
        softmax, which is that softmax when the embeddings are float32. Multiply by the row mask at the
        next pass."""
        embed = self.model.model.decoder.embed_tokens
        if self.embed_dtype != torch.float32:
            probs = processed.to(self.embed_dtype).softmax(dim=-1, dtype=torch.float32).to(self.embed_dtype)
        return torch.matmul(probs, embed.weight) * embed.embed_scale.to(self.embed_dtype)
