"""The block diffusion training objective (MDLM loss on a block-causal layout).

Masked diffusion (MDLM, Sahoo et al. 2024, arXiv:2406.07524; LLaDA, arXiv:2502.09992): draw a
noise level t, replace each token by [MASK] with probability t, and train the model to predict the
originals; weighting each masked token's cross-entropy by 1/t makes the loss an upper bound on the
negative log-likelihood.

Block-causal (BD3-LM, Arriola et al. 2025, arXiv:2503.09573): at inference the engine denoises one
block at a time against the *clean* keys of the prompt and the finished blocks. To train every block
in one pass, the input is the noisy sequence followed by a clean copy, 2L tokens, under a mask:

    noisy token in block b  ->  noisy tokens of block b, clean tokens of blocks < b
    clean token in block b  ->  clean tokens of blocks <= b

The prompt is block 0 and is never noised, as in the engine's layout (one bidirectional prefix
block); its length is drawn per batch, so the model sees prompts of every length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_NOISE = 1e-3  # keeps 1/t finite


@dataclass
class LossParts:
    loss: torch.Tensor  # the weighted ELBO term, per noisy-region token: what is minimised
    masked_ce_sum: torch.Tensor  # summed cross-entropy of masked tokens, unweighted (nats)
    masked_count: int
    # dParallel's certainty-forcing term (training/distill.py), when asked for: mean entropy of the
    # temperature-sharpened prediction at the masked positions the model already gets right.
    certainty: torch.Tensor | None = None
    # Token-level unlikelihood (training/distill.py), when asked for: at the masked positions, the
    # probability put on tokens that came earlier in the row but are not the target, pushed down.
    unlikelihood: torch.Tensor | None = None


def block_ids(length: int, prompt_length: int, block_length: int) -> torch.Tensor:
    """(L,) block index of each column: 0 for the prompt, 1 + j for generation block j."""
    columns = torch.arange(length)
    return torch.where(columns < prompt_length, 0, 1 + (columns - prompt_length).clamp(min=0) // block_length)


def two_stream_mask(blocks: torch.Tensor) -> torch.Tensor:
    """(1, 1, 2L, 2L) bool attention mask over [noisy ; clean] for the block ids (L,)."""
    q, k = blocks[:, None], blocks[None, :]
    noisy_to_noisy = q == k
    noisy_to_clean = k < q
    clean_to_clean = k <= q
    clean_to_noisy = torch.zeros_like(noisy_to_noisy)
    top = torch.cat([noisy_to_noisy, noisy_to_clean], dim=1)
    bottom = torch.cat([clean_to_noisy, clean_to_clean], dim=1)
    return torch.cat([top, bottom], dim=0)[None, None]


def draw_masks(batch: int, blocks: torch.Tensor, generator: torch.Generator, *, order: torch.Tensor | None = None,
               order_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked (B, L) bool, t_per_token (B, L)) for the block ids (L,): one noise level t per (row,
    block), each noisy token masked with probability t. With ``order`` (B, L), the step at which a
    decoder unmasks each position of its block (training/trajectory.py), an ``order_share`` of the
    (row, block)s instead mask the last round(t n) of their n positions in that order, at least one."""
    length = blocks.shape[0]
    num_blocks = int(blocks.max()) + 1
    t = torch.rand((batch, num_blocks), generator=generator).clamp(min=MIN_NOISE)  # (B, nb)
    t_per_token = t[:, blocks]  # (B, L)
    noisy_region = (blocks > 0)[None, :].expand(batch, length)
    masked = (torch.rand((batch, length), generator=generator) < t_per_token) & noisy_region
    if order is not None and order_share > 0:
        by_order = torch.rand((batch, num_blocks), generator=generator) < order_share  # (B, nb)
        size = torch.bincount(blocks, minlength=num_blocks)  # (nb,): positions a block holds
        count = torch.minimum((t * size).round().clamp(min=1), size.expand_as(t))  # (B, nb) to mask
        latest = order >= (size - count)[:, blocks]  # the last `count` a decoder would unmask
        masked = torch.where(by_order[:, blocks], latest & noisy_region, masked)
    return masked, t_per_token


def diffusion_loss(
    model, x0: torch.Tensor, *, mask_token_id: int, block_length: int, prompt_length: int,
    generator: torch.Generator, certainty_temperature: float | None = None, unlikelihood: bool = False,
    order: torch.Tensor | None = None, order_share: float = 0.0,
) -> LossParts:
    """x0 (B, L) clean token ids. One noise level per (row, block), drawn from ``generator``; ``order``
    and ``order_share`` as draw_masks takes them."""
    batch, length = x0.shape
    blocks = block_ids(length, prompt_length, block_length)  # (L,)
    noisy_region = (blocks > 0)[None, :].expand(batch, length)
    masked, t_per_token = draw_masks(batch, blocks, generator, order=order, order_share=order_share)
    xt = torch.where(masked, mask_token_id, x0)

    positions = torch.arange(length).repeat(2)[None, :].expand(batch, 2 * length)
    hidden, _ = model.model(
        torch.cat([xt, x0], dim=1), attention_mask=two_stream_mask(blocks), position_ids=positions
    )
    # Logits only where they are scored: the masked tokens of the noisy stream.
    logits = model.lm_head(hidden[:, :length][masked])  # (M, V)
    ce = F.cross_entropy(logits.float(), x0[masked], reduction="none")  # (M,)
    loss = (ce / t_per_token[masked]).sum() / noisy_region.sum().clamp(min=1)
    certainty = None if certainty_temperature is None else certainty_entropy(
        logits, x0[masked], certainty_temperature)
    repeated = unlikelihood_of_earlier_tokens(logits, x0, masked) if unlikelihood else None
    return LossParts(loss=loss, masked_ce_sum=ce.detach().sum(), masked_count=int(masked.sum()),
                     certainty=certainty, unlikelihood=repeated)


def unlikelihood_of_earlier_tokens(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions (M, V logits) of -sum log(1 - p(c)) over the candidates c: the
    tokens earlier in the row (x0 (B, L), prompt included) other than the position's own target.

    Token-level unlikelihood training (Welleck et al. 2019, "Neural Text Generation with Unlikelihood
    Training", arXiv:1908.04319): greedy decoding of a small model falls into loops because copying a
    token it has already written is what its likelihood training rewards; this term makes a repeat cost
    something wherever the data does not repeat, which a presence penalty does only at decoding time.
    """
    vocab = logits.shape[-1]
    seen = torch.zeros((*x0.shape, vocab), dtype=torch.uint8, device=x0.device).scatter_(2, x0[..., None], 1)
    seen = seen.cummax(dim=1).values.bool()  # (B, L, V): tokens at columns <= this one
    before = torch.cat([torch.zeros_like(seen[:, :1]), seen[:, :-1]], dim=1)[masked]  # (M, V): < this one
    candidates = before & ~F.one_hot(x0[masked], vocab).bool()
    p = torch.softmax(logits.float(), dim=-1)
    penalty = -(torch.log((1 - p).clamp(min=1e-5)) * candidates).sum(dim=-1)
    return penalty.mean() if penalty.numel() else logits.new_zeros((), dtype=torch.float32)


def certainty_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean entropy of softmax(logits / T) over the rows (M, V) whose argmax is already the target.

    Only right predictions are sharpened, so the term makes the model surer of what it would write
    anyway and never of a wrong token (dParallel, arXiv:2509.26488, §3). Zero when none is right.
    """
    right = logits.argmax(dim=-1) == targets
    if not right.any():
        return logits.new_zeros((), dtype=torch.float32)
    log_p = torch.log_softmax(logits[right].float() / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()
