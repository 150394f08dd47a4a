"""Block denoising samplers, batched: LLaDA's reference remasking and Fast-dLLM's parallel acceptance.

Algorithm from Nie et al. 2025, "Large Language Diffusion Models" (arXiv:2502.09992), as written
in the authors' ``generate.py`` (github.com/ML-GSAI/LLaDA): every block starts fully masked and is
denoised in a fixed number of steps; each step predicts x0 for every position (Gumbel-max at the
temperature), scores each prediction by its softmax probability, and commits the most confident
still-masked positions of the block, as many as the linear schedule allows.

What differs from ``generate.py``: a batch of rows with their own temperature, top_p, steps and
seed; top-k selection by rank against a per-row k instead of a loop; noise drawn for the active
block only; [MASK] is never predicted (see ``predict_x0``); no asserts.

The parallel samplers (Wu et al. 2025, "Fast-dLLM", arXiv:2505.22618, §3.3) keep the same x0 and
confidence but decide per step how many positions to commit from the confidences themselves:
``threshold`` commits every masked position with confidence >= tau, ``factor`` commits the n most
confident where (n + 1)(1 - c_(n)) < f for the n-th highest confidence c_(n); both commit at least
the single most confident position, so a block always finishes. Rows of one batch may mix samplers.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import torch


class RowNoise:
    """Per-request random streams, so a request's tokens never depend on its batch-mates.

    Noise convention (the contract the tests' oracle follows): each request owns a
    ``torch.Generator`` on the model's device seeded with its seed (0 when unset). At every denoising
    step in which the request commits tokens and has temperature > 0, exactly one tensor
    ``u = torch.rand((masked, vocab_size), dtype=float64, generator=g)`` is drawn, one row for each
    still-masked position of the active block in block order; nothing else draws from ``g``. The
    Gumbel-max denominator is ``(-log u) ** temperature`` as in LLaDA's ``add_gumbel_noise``.
    (LLaDA draws for every position of the sequence; only the masked ones are ever committed, and on
    a CPU the draw and its power cost as much as the forward pass at batch 32.)
    """

    def __init__(self, seeds: list[int], device: torch.device | str):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]

    @classmethod
    def from_generators(cls, generators: list[torch.Generator], device: torch.device | str) -> RowNoise:
        """Rows that carry their generator from block to block (continuous batching)."""
        noise = cls([], device)
        noise.generators = generators
        return noise

    def gumbel_denominator(
        self, rows: list[int], temperature: list[float], masked_counts: list[int], shape: torch.Size
    ) -> torch.Tensor | None:
        """(B, n, V) float64 for ``shape`` = (B, n, V): (-log u) ** T in row r's first
        masked_counts[r] slots for ``rows``, ones elsewhere; None if no row samples."""
        if not rows:
            return None
        denominator = torch.ones(shape, dtype=torch.float64, device=self.device)
        # One draw per row from its own generator: the only per-row loop of a step.
        for r in rows:
            u = torch.rand((masked_counts[r], shape[-1]), dtype=torch.float64, device=self.device,
                           generator=self.generators[r])
            denominator[r, : masked_counts[r]] = (-torch.log(u)) ** temperature[r]
        return denominator


def num_transfer_schedule(block_length: int, steps: list[int]) -> list[list[int]]:
    """Tokens to commit at each step, per row: (B, max(steps)), zero past a row's own steps.

    LLaDA's linear noise schedule moves the same expected number of tokens at every step, so the
    block's masked count is split evenly and the remainder goes to the first steps.
    """
    num_steps = max(steps)
    schedule = []
    for row_steps in steps:
        base, remainder = divmod(block_length, row_steps)
        row = [base + (s < remainder) for s in range(row_steps)]
        schedule.append(row + [0] * (num_steps - row_steps))
    return schedule


def top_p_filter(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's nucleus of softmax(logits / T) to -inf.

    logits (B, K, V) float64; temperature, top_p (B,). Rows with T == 0 or top_p == 1 pass through.
    """
    rows = (temperature > 0) & (top_p < 1)  # (B,)
    safe_t = torch.where(rows, temperature, torch.ones_like(temperature))[:, None, None]
    probs = torch.softmax(logits / safe_t, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep a token while the mass before it is below top_p; the most likely token always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p[:, None, None]
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, K, V)
    drop &= rows[:, None, None]
    return logits.masked_fill(drop, float("-inf"))


def token_counts(ids: torch.Tensor, counted: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) float64: how often each token occurs in ``ids`` (B, T) where ``counted`` (B, T) holds."""
    counts = torch.zeros((ids.shape[0], vocab_size), dtype=torch.float64, device=ids.device)
    return counts.scatter_add_(1, ids, counted.to(torch.float64))


def repetition_penalty(counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """(B, V) to subtract from every position's logits: OpenAI's frequency penalty (per occurrence)
    plus presence penalty (once a token occurred), from the generated-token ``counts`` (B, V)."""
    return frequency[:, None] * counts + presence[:, None] * (counts > 0)


def predict_x0(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor | None,
    gumbel_denominator: torch.Tensor | None,
    mask_token_id: int,
    first_allowed: torch.Tensor | None = None,
    penalty: torch.Tensor | None = None,
    first_column: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and its confidence for every position given (the block's, or the masked ones of it).

    The [MASK] token is never a prediction: committing it would leave the position masked and
    break the schedule. A trained model gives it ~zero probability anyway (so this matches
    LLaDA's output there), but an untrained one, whose tied embeddings echo the input, prefers it.

    logits (B, K, V); gumbel_denominator (B, K, V) float64 = (-log u) ** T, ones for rows
    without noise, None when no row samples (then every row is greedy). top_p (B,), or None when
    no row asks for a nucleus, which skips a sort over the vocabulary. Gumbel-max runs in float64
    as in LLaDA (low precision hurts quality, arXiv:2409.02908): argmax of
    exp(logits) / (-log u) ** T samples softmax(logits / T).
    first_allowed (B, V) bool, or None: the tokens the first generated position may take (token
    healing, healing.py); the other tokens get no probability there, in the confidence too.
    first_column (B, K) bool, with first_allowed: which of the given positions is that one.
    penalty (B, V) or None: subtracted from every position's logits (repetition_penalty).
    Returns x0 (B, K) and confidence (B, K) = softmax(logits)[x0], LLaDA's low-confidence score.
    """
    logits64 = logits.to(torch.float64, copy=True)  # never write into the model's logits
    if penalty is not None:
        logits64 -= penalty[:, None, :]
    logits64[..., mask_token_id] = float("-inf")
    if first_allowed is not None:
        logits64.masked_fill_(first_column[..., None] & ~first_allowed[:, None, :], float("-inf"))
    if gumbel_denominator is None:
        x0 = logits64.argmax(dim=-1)  # (B, K)
    else:
        filtered = logits64 if top_p is None else top_p_filter(logits64, temperature, top_p)
        noisy = (temperature > 0)[:, None, None]
        # Less each position's largest logit first: the same argmax, and exp() cannot overflow (a
        # logit past ~709 would make every such score inf, and the lowest id would win).
        shifted = filtered - filtered.amax(dim=-1, keepdim=True)
        scores = torch.where(noisy, shifted.exp() / gumbel_denominator, logits64)
        x0 = scores.argmax(dim=-1)  # (B, K)
    probs = torch.softmax(logits64, dim=-1)
    confidence = probs.gather(-1, x0[..., None]).squeeze(-1)  # (B, K)
    return x0, confidence


def select_transfer(
    confidence: torch.Tensor, mask_index: torch.Tensor, num_transfer: torch.Tensor
) -> torch.Tensor:
    """The num_transfer[b] most confident masked positions of each row: (B, K) bool.

    Ranking via a sort keeps it one batched op whatever each row's k is.
    """
    confidence = confidence.masked_fill(~mask_index, float("-inf"))
    order = confidence.argsort(dim=-1, descending=True, stable=True)  # (B, K)
    positions = torch.arange(confidence.shape[1], device=confidence.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # rank[b, i] of position i
    return (rank < num_transfer[:, None]) & mask_index


def parallel_transfer_count(
    confidence: torch.Tensor, mask_index: torch.Tensor, by_threshold: torch.Tensor,
    threshold: torch.Tensor, factor: torch.Tensor,
) -> torch.Tensor:
    """Positions to commit this step under Fast-dLLM's rules: (B,) long, at least 1 where masks remain.

    confidence, mask_index (B, K); by_threshold (B,) bool (else the factor rule); threshold, factor (B,).
    Both rules keep a prefix of the confidences sorted high to low ((n + 1)(1 - c_(n)) grows with n),
    so counting the positions that pass is enough.
    """
    ranked = confidence.masked_fill(~mask_index, float("-inf")).sort(dim=-1, descending=True).values
    n = torch.arange(1, ranked.shape[1] + 1, device=ranked.device, dtype=ranked.dtype)  # (K,)
    passing_threshold = (ranked >= threshold[:, None]).sum(dim=-1)
    passing_factor = ((n + 1) * (1 - ranked) < factor[:, None]).sum(dim=-1)
    count = torch.where(by_threshold, passing_threshold, passing_factor)
    return torch.where(mask_index.any(dim=-1), count.clamp(min=1), torch.zeros_like(count))


class BlockRules:
    """A round's per-row sampling settings as device tensors, made once per block (not per step)."""

    def __init__(self, rows: list, block_length: int, device: torch.device, sub_block: int | None = None):
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        # Sub-blocks decoded left to right (Fast-dLLM v2): a step chooses among the masked positions
        # of the first sub-block that has any; None = the whole block.
        self.sub_block = sub_block if sub_block and sub_block < block_length else None
        self.temperature = [float(p.temperature) for p in rows]
        self.temperature_t = as_tensor(self.temperature, torch.float64)  # (B,)
        use_top_p = any(p.temperature > 0 and p.top_p < 1 for p in rows)
        self.top_p_t = as_tensor([float(p.top_p) for p in rows], torch.float64) if use_top_p else None  # (B,)
        self.is_reference = as_tensor([p.sampler == "reference" for p in rows], torch.bool)  # (B,)
        self.any_parallel = any(p.sampler != "reference" for p in rows)
        self.by_threshold = as_tensor([p.sampler == "threshold" for p in rows], torch.bool)  # (B,)
        self.threshold_t = as_tensor([float(p.threshold) for p in rows], torch.float64)  # (B,)
        self.factor_t = as_tensor([float(p.factor) for p in rows], torch.float64)  # (B,)
        self.schedule = num_transfer_schedule(block_length, [p.steps_per_block for p in rows])
        self.schedule_t = as_tensor([row + [0] * (block_length - len(row)) for row in self.schedule],
                                    torch.long)  # (B, K)
        # LLaDA2.1's token editing (threshold rows with an editing_threshold; +inf: the row never edits).
        self.edits = [p.edits for p in rows]
        self.any_editing = any(self.edits)
        self.editing_t = as_tensor([float(p.editing_threshold) if p.edits else float("inf") for p in rows],
                                   torch.float64)  # (B,)
        self.max_post_steps = [p.post_steps_limit for p in rows]
        self.penalised = any(p.penalised for p in rows)
        self.frequency_t = as_tensor([float(p.frequency_penalty) for p in rows], torch.float64)  # (B,)
        self.presence_t = as_tensor([float(p.presence_penalty) for p in rows], torch.float64)  # (B,)

    @property
    def greedy(self) -> bool:
        return not any(t > 0 for t in self.temperature)


def in_first_open_sub_block(mask_index: torch.Tensor, sub_block: int) -> torch.Tensor:
    """(B, K) bool: the positions of each row's first sub-block that still holds a mask."""
    sub = torch.arange(mask_index.shape[1], device=mask_index.device) // sub_block  # (K,)
    first_open = sub[mask_index.int().argmax(dim=-1)]  # (B,): the first masked position's sub-block
    return sub[None, :] == first_open[:, None]


def commit_step(block: torch.Tensor, logits_n: torch.Tensor, slots: torch.Tensor, mask_index: torch.Tensor,
                num_transfer: torch.Tensor, rules: BlockRules, *, mask_token_id: int,
                denominator: torch.Tensor | None = None, first_allowed: torch.Tensor | None = None,
                first_slot: torch.Tensor | None = None, history: torch.Tensor | None = None,
                fixed: torch.Tensor | None = None, editable: torch.Tensor | None = None) -> torch.Tensor | None:
    """One step's decision, written into ``block`` (B, K) in place: predict x0 at ``slots`` (B, n)
    from their logits (B, n, V), then commit the positions the rows' samplers choose
    (``num_transfer`` (B,) for reference rows, the confidences for parallel ones). ``first_slot`` (B,):
    the block position ``first_allowed`` binds (a row's lead comes before it); None = position 0.
    ``fixed`` (B, K) bool, or None (none): positions holding the prompt's or a template's text, which
    a frequency or presence penalty does not count as generated (``history`` does not either).
    ``editable`` (B, K) bool, or None (no editing): the positions an editing row generates in this
    block; ``slots`` must then hold every position. Returns which rows edited a token (B,) bool, or None.

    Token editing is LLaDA2.1's Token-to-Token step (inclusionAI, "LLaDA2.1", 2026; its checkpoints'
    ``generate``, ``editing_threshold``): a token committed in an earlier step that the model now
    predicts otherwise, at or above the row's editing threshold, is replaced in the same step that
    commits masks. Never a [MASK] (predict_x0), and never the prompt's or a template's text."""
    penalty = None
    if rules.penalised:  # what this block generated so far counts too
        generated = block != mask_token_id if fixed is None else (block != mask_token_id) & ~fixed
        counts = token_counts(block, generated, logits_n.shape[-1])
        counts = counts if history is None else counts + history
        penalty = repetition_penalty(counts, rules.frequency_t, rules.presence_t)
    x0_n, confidence_n = predict_x0(logits_n, rules.temperature_t, rules.top_p_t, denominator, mask_token_id,
                                    first_allowed, penalty,
                                    first_column=slots == (0 if first_slot is None else first_slot[:, None]))
    x0 = block.scatter(1, slots, x0_n)  # (B, K); committed positions keep their tokens
    confidence = confidence_n.new_zeros(block.shape).scatter_(1, slots, confidence_n)  # (B, K)
    edit = None
    if editable is not None:  # judged on this step's start, before anything below commits
        edit = editable & ~mask_index & (confidence >= rules.editing_t[:, None]) & (x0 != block)  # (B, K)
    if rules.sub_block:
        mask_index = mask_index & in_first_open_sub_block(mask_index, rules.sub_block)
    if rules.any_parallel:
        parallel = parallel_transfer_count(confidence, mask_index, rules.by_threshold, rules.threshold_t,
                                           rules.factor_t)
        # At least the schedule's count: one a step unless a threshold row names fewer steps (then it
        # is LLaDA2's and SDAR's dynamic rule, which finishes a block in at most those steps).
        num_transfer = torch.where(rules.is_reference, num_transfer, torch.maximum(parallel, num_transfer))
    transfer = select_transfer(confidence, mask_index, num_transfer)
    if edit is None:
        block.copy_(torch.where(transfer, x0, block))
        return None
    block.copy_(torch.where(transfer | edit, x0, block))
    return edit.any(dim=-1)


class Kept:
    """The block positions each row keeps, so that its passes stop once those are committed (the
    tokens are the same: a committed token never changes, and what a row does not keep is cut off).
    ``upto`` (B, K) bool, or None (all): the positions before its max_tokens.
    ``eos_ids`` (E,), or None (no row ends at an EOS): an EOS committed at a column >= ``eos_from``
    (B, 1) (past an aligned row's lead; K for a row an EOS does not end, e.g. a template's) ends the
    row, so nothing after the first such EOS is kept. As an EOS ends a row only once every position
    before it is committed, an EOS committed early saves the rest of the block (dInfer's early stop)."""

    def __init__(self, upto: torch.Tensor | None = None, eos_ids: torch.Tensor | None = None,
                 eos_from: torch.Tensor | None = None):
        self.upto, self.eos_ids, self.eos_from = upto, eos_ids, eos_from

    def masks_left(self, block: torch.Tensor, mask_index: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: the still-masked positions each row keeps. No host sync."""
        left = mask_index if self.upto is None else mask_index & self.upto
        if self.eos_ids is None:
            return left
        columns = torch.arange(block.shape[1], device=block.device)
        # A compare against each of the few EOS ids: static shapes, nothing a CUDA graph could not hold.
        is_eos = (block[..., None] == self.eos_ids).any(dim=-1)
        ends = is_eos & ~mask_index & (columns >= self.eos_from)  # (B, K)
        first_end = torch.where(ends, columns, block.shape[1]).min(dim=-1, keepdim=True).values  # (B, 1)
        return left & (columns < first_end)


def denoise_block(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    start: int,
    end: int,
    *,
    mask_token_id: int,
    rows: list,
    noise: RowNoise,
    first_allowed: torch.Tensor | None = None,
    first_slot: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    fixed: torch.Tensor | None = None,
    kept: Kept | None = None,
    sub_block: int | None = None,
) -> list[int]:
    """Denoise x[:, start:end] in place until no row has a mask left that it keeps.

    Returns, per row, the forward passes in which it still had such masks (the batch ran max of them).

    ``rows`` holds each row's SamplingParams. ``forward(x[:, :end], slots)`` returns the logits of
    the block's positions ``slots`` (B, n), (B, n, V) (cache.py): with block-causal attention
    nothing after ``end`` can change them. A reference row finishes in exactly its ``steps``; a
    parallel one in as few as the model's confidence allows.
    ``first_allowed`` (B, V) bool restricts the first generated token (token healing) at the block
    position ``first_slot`` (B,) (None: 0); None leaves it free.
    ``history`` (B, V): counts of the tokens generated before this block, for rows with a frequency
    or presence penalty (None: nothing generated yet); ``fixed`` (B, K): the block's positions that
    hold prompt or template text, which the penalties do not count (commit_step).
    ``kept``, or None (all): the positions a row keeps (``Kept``, ``ContinuousScheduler._kept``).
    A row's passes stop once its kept positions are all committed, and the loop once every row's
    are: later steps would only fill positions it cuts off (while batch-mates still work it may go
    on filling them, which changes nothing it keeps: a committed token never changes).
    ``sub_block``: decode the block in sub-blocks of this many positions, left to right (BlockRules).
    """
    block_length = end - start
    rules = BlockRules(rows, block_length, x.device, sub_block)
    passes = [0] * len(rows)
    editing = BlockEditing(rules, x[:, start:end] == mask_token_id) if rules.any_editing else None
    for step in range(block_length + max(rules.max_post_steps) + 1):
        block = x[:, start:end]  # (B, K)
        mask_index = block == mask_token_id  # (B, K)
        left = mask_index if kept is None else kept.masks_left(block, mask_index)
        working_t = left.any(dim=-1) if editing is None else editing.start(mask_index, left.any(dim=-1))  # (B,)
        # The step's one host sync: who works, how wide.
        masked_counts, working = torch.stack([mask_index.sum(dim=-1), working_t.long()]).tolist()
        if not any(working):
            break
        passes = [n + w for n, w in zip(passes, working, strict=False)]
        # Only masked positions are sampled: gathered to the front, the float64 work of a step runs
        # over max(masked) positions instead of the whole block (x0 and confidence are per position,
        # so this changes no token), and the forward projects logits for those positions alone. A
        # row that edits is scored at every position.
        edit_now = editing is not None and any(w and e for w, e in zip(working, rules.edits, strict=False))
        width = block_length if edit_now else max(masked_counts)
        slots = (~mask_index).to(torch.int8).argsort(dim=-1, stable=True)[:, :width]  # (B, n)
        logits_n = forward(x[:, :end], slots)  # (B, n, V)
        noisy_rows = [r for r, w in enumerate(working) if w and rules.temperature[r] > 0]
        denominator = noise.gumbel_denominator(noisy_rows, rules.temperature, masked_counts, logits_n.shape)
        num_transfer = rules.schedule_t[:, step] if step < block_length else \
            torch.zeros_like(rules.schedule_t[:, 0])  # an editing row's passes after its last mask
        edited = commit_step(block, logits_n, slots, mask_index, num_transfer, rules, mask_token_id=mask_token_id,
                             denominator=denominator, first_allowed=first_allowed, first_slot=first_slot,
                             history=history, fixed=fixed,
                             editable=editing.editable_now(working_t) if edit_now else None)
        if editing is not None:
            editing.stepped(edited)
    return passes


class BlockEditing:
    """When rows that edit (LLaDA2.1) are done with a block, as its ``generate`` decides, with the
    state on the device so that a captured step (GreedyBlockSteps) can hold it: a row works until a
    pass that began with no mask changed no token, or until more than ``max_post_steps`` passes
    would begin with no mask. Until then it keeps its whole block, so the max_tokens and EOS early
    stop (``Kept``) does not apply to it: a later pass may still change a token before its cut."""

    def __init__(self, rules: BlockRules, masked_at_start: torch.Tensor):
        device = masked_at_start.device
        self.rows = torch.tensor(rules.edits, device=device)  # (B,)
        self.editable = masked_at_start & self.rows[:, None]  # (B, K): the positions the row generates here
        self.max_post_steps = torch.tensor(rules.max_post_steps, device=device)  # (B,)
        # A row whose block holds nothing it generates (a template's fixed text) has nothing to edit.
        self.settled = ~self.rows | ~self.editable.any(dim=-1)  # (B,)
        self.post_steps = torch.zeros_like(self.max_post_steps)
        self.began_clean = torch.zeros_like(self.rows)  # the last pass began with no mask
        self.edited = torch.zeros_like(self.rows)  # the last pass changed a token

    def start(self, mask_index: torch.Tensor, working: torch.Tensor, *, look_only: bool = False) -> torch.Tensor:
        """(B,) bool: who works in the pass that begins with ``mask_index``: ``working`` for the rows
        that do not edit. Advances the state unless ``look_only`` (the host's look after a step)."""
        settled = self.settled | (self.began_clean & ~self.edited)
        clean = ~mask_index.any(dim=-1)
        post_steps = self.post_steps + (clean & ~settled).long()
        settled = settled | (post_steps > self.max_post_steps)
        if not look_only:
            self.settled.copy_(settled)
            self.post_steps.copy_(post_steps)
            self.began_clean.copy_(clean)
        return torch.where(self.rows, ~settled, working)

    def editable_now(self, working: torch.Tensor) -> torch.Tensor:
        """(B, K): what this pass may edit; a settled row's tokens are final while batch-mates work on."""
        return self.editable & working[:, None]

    def stepped(self, edited: torch.Tensor | None) -> None:
        self.edited.copy_(edited if edited is not None else torch.zeros_like(self.edited))


class GreedyBlockSteps:
    """A greedy round's steps with static shapes and no host sync inside a step, so a whole step
    (forward and decision) can be captured as one CUDA graph (cuda_graph.py): every position of the
    block is scored (the committed ones are never chosen), and the step count and each row's passes
    live on the device. Gives the tokens and pass counts of ``denoise_block`` for rows at
    temperature 0 (greedy needs no per-row noise, the one thing a graph could not draw)."""

    def __init__(self, block: torch.Tensor, rows: list, *, mask_token_id: int,
                 first_allowed: torch.Tensor | None = None, first_slot: torch.Tensor | None = None,
                 history: torch.Tensor | None = None, fixed: torch.Tensor | None = None,
                 kept: Kept | None = None, sub_block: int | None = None, logits_shift: int = 0):
        size, length = block.shape
        self.block, self.mask_token_id = block, mask_token_id  # (B, K), denoised in place
        self.rules = BlockRules(rows, length, block.device, sub_block)
        if not self.rules.greedy:
            raise ValueError("GreedyBlockSteps serves rows at temperature 0 only")
        self.first_allowed, self.first_slot, self.history, self.fixed = first_allowed, first_slot, history, fixed
        self.kept = kept  # as denoise_block's
        # Rows that edit (LLaDA2.1): their state lives on the device, decided inside the step.
        self.editing = BlockEditing(self.rules, block == mask_token_id) if self.rules.any_editing else None
        # A shifted model (Fast-dLLM v2) reads a position's logits one position back; the last
        # position's own logits (B, V) are kept for the next block's first token (scheduler.py).
        self.logits_shift = logits_shift
        self.last_logits: torch.Tensor | None = None
        self.slots = torch.arange(length, device=block.device).expand(size, length)  # every position
        self.step = torch.zeros((size, 1), dtype=torch.long, device=block.device)
        self.passes = torch.zeros(size, dtype=torch.long, device=block.device)

    def __call__(self, forward_block: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One step: ``forward_block(block)`` gives the whole block's logits (B, K, V). Once no mask
        is left a step changes no token (and, in the scheduler, leaves the clean block's keys and
        values in the cache)."""
        mask_index = self.block == self.mask_token_id  # (B, K)
        working = self._left(self.block, mask_index).any(dim=-1)  # (B,)
        editable = None
        if self.editing is not None:
            working = self.editing.start(mask_index, working)
            editable = self.editing.editable_now(working)
        logits = forward_block(self.block)
        if self.logits_shift:  # a block's first position is never masked: its row is a filler
            self.last_logits = logits[:, -1]
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        last = self.rules.schedule_t.shape[1] - 1  # past a row's steps its schedule is 0 anyway
        num_transfer = self.rules.schedule_t.gather(1, self.step.clamp(max=last)).squeeze(1)  # (B,)
        edited = commit_step(self.block, logits, self.slots, mask_index, num_transfer, self.rules,
                             mask_token_id=self.mask_token_id, first_allowed=self.first_allowed,
                             first_slot=self.first_slot, history=self.history, fixed=self.fixed,
                             editable=editable)
        if self.editing is not None:
            self.editing.stepped(edited)
        self.passes += working
        self.step += 1

    def _left(self, block: torch.Tensor, mask_index: torch.Tensor) -> torch.Tensor:
        return mask_index if self.kept is None else self.kept.masks_left(block, mask_index)

    def _anyone_works(self) -> bool:
        """Whether the next step has a row that works: the host's look after a step (a sync)."""
        mask_index = self.block == self.mask_token_id
        working = self._left(self.block, mask_index).any(dim=-1)
        if self.editing is not None:
            working = self.editing.start(mask_index, working, look_only=True)
        return bool(working.any())

    def run(self, step: Callable[[], None]) -> list[int]:
        """Denoise the block with ``step`` (this object's step, maybe replayed from a graph); returns
        each row's passes. A reference row commits its schedule's count a step (fewer once its
        masks run out), so the steps a reference-only round needs are known from the masks it starts
        with; only parallel rows, or a row whose max_tokens ends inside the block (``kept``), make
        the host look at the block after every step. A reference-only round does not look for an
        EOS: on a GPU a sync a step would cost every such round what an EOS saves only some (the
        passes a row reports still stop at its EOS: they are counted on the device)."""
        look = self.rules.any_parallel or (self.kept is not None and self.kept.upto is not None)
        if self.rules.any_editing:  # its passes after the last mask, while tokens change
            steps = self.block.shape[1] + max(self.rules.max_post_steps) + 1
        elif self.rules.any_parallel:
            steps = self.block.shape[1]
        else:  # a template's fixed text leaves fewer masks than the schedule plans for
            masked = (self.block == self.mask_token_id).sum(dim=-1).tolist()  # once a round
            steps = max(sum(done < m for done in accumulate(schedule)) + (m > 0)
                        for schedule, m in zip(self.rules.schedule, masked, strict=False))
        for _ in range(steps):
            step()
            if look and not self._anyone_works():
                break
        return self.passes.tolist()
