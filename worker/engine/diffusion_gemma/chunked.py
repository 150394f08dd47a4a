"""One denoising step's vocabulary-wide work, a few whole canvases at a time.

With DiffusionGemma's 262,144-token vocabulary, every (rows, canvas, vocabulary) float32 tensor is
256 MiB per row at a 256-token canvas; ``generate()`` holds several at once (logits, temperature-scaled
logits, probabilities, the entropy's temporaries, the self-conditioning logits and their softmax), so
its memory grows by gigabytes per row (vllm issue 50699 reports the same temporaries). Here the decoder
returns hidden states (rows, canvas, hidden); the LM head, temperature, softmax, entropy, inverse-CDF
draw, argmax and the next pass's self-conditioning embeddings then run over ``rows_per_chunk`` canvases
at a time, so the vocabulary-sized tensors are bounded by one chunk, whatever the batch size, and what a
row keeps between passes is (canvas, hidden).

Why whole canvases, not slices of the vocabulary: a chunk over the vocabulary changes the order of the
softmax's and the entropy's float sums (torch's kernels reduce a whole row their own way), so its
probabilities would differ in the last bits and a draw near a CDF boundary could pick another token.
A chunk of whole canvases runs exactly the kernels of the unchunked step on fewer rows: every reduction
over the vocabulary (softmax, entropy, the cumulative sum, argmax) is per position, and the two matrix
products (LM head, self-conditioning) see a canvas-multiple of rows, as when that row runs alone, which
the engine's batch invariance already relies on. So the tokens are those of the unchunked step (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .denoise import sample_inverse_cdf_, token_entropy

# Elements of one vocabulary-sized float32 temporary (128 MiB). A chunk holds two such at once (logits and
# probabilities, then probabilities and the entropy's terms); a larger chunk keeps the LM head's matrix
# product large and the launches few on a GPU.
CHUNK_ELEMENTS = 2**25


def rows_per_chunk(canvas_length: int, vocab_size: int, budget: int | None = None) -> int:
    """Whole canvases per chunk: as many as fit ``budget`` elements (default CHUNK_ELEMENTS), at least one."""
    budget = CHUNK_ELEMENTS if budget is None else budget
    return max(1, budget // (canvas_length * vocab_size))


def canvas_chunks(num_rows: int, per_chunk: int) -> Iterator[slice]:
    for start in range(0, num_rows, per_chunk):
        yield slice(start, min(start + per_chunk, num_rows))


@dataclass
class StepDraws:
    entropy: torch.Tensor  # (n, L) float32, of the temperature-scaled distributions
    drawn: torch.Tensor  # (n, L) long, the inverse-CDF draws
    argmax: torch.Tensor  # (n, L) long, of the temperature-scaled logits


def denoise_in_chunks(hidden: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor, *,
                      head: Callable[[torch.Tensor], torch.Tensor],
                      self_conditioning: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
                      self_conditioning_out: torch.Tensor | None, per_chunk: int) -> StepDraws:
    """One step's draws for canvases ``hidden`` (n, L, H), ``temperature`` (n,), ``uniform`` (n, L).

    ``head(hidden_rows) -> (r, L, V)`` float32 logits the caller may overwrite (the model's LM head).
    ``self_conditioning(processed, probs) -> (r, L, H)``, if given, is written to ``self_conditioning_out``
    (n, L, H): what the next pass needs of this step's temperature-scaled logits (and their softmax).
    """
    num_rows, length = hidden.shape[:2]
    entropy = torch.empty((num_rows, length), dtype=torch.float32, device=hidden.device)
    drawn = torch.empty((num_rows, length), dtype=torch.long, device=hidden.device)
    argmax = torch.empty_like(drawn)
    for rows in canvas_chunks(num_rows, per_chunk):
        processed = head(hidden[rows]).div_(temperature[rows, None, None])  # (r, L, V)
        argmax[rows] = processed.argmax(dim=-1)
        probs = torch.softmax(processed, dim=-1)
        if self_conditioning is not None and self_conditioning_out is not None:
            self_conditioning_out[rows] = self_conditioning(processed, probs)
        del processed  # the head's logits: one (r, L, V) buffer fewer while the entropy runs
        entropy[rows] = token_entropy(probs)
        drawn[rows] = sample_inverse_cdf_(probs, uniform[rows])  # probs consumed
        del probs  # before the next chunk's logits exist
    return StepDraws(entropy=entropy, drawn=drawn, argmax=argmax)
