"""Turn a row's denoised tokens into the kept tokens, text and finish reason."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinishedRow:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    stop_sequence: str | None = None  # the stop string the text was cut at (Anthropic's stop_sequence)


def first_stop(text: str, stop: tuple[str, ...]) -> str | None:
    """The stop string whose occurrence in ``text`` comes first (the first listed on a tie), or None."""
    found = [(i, n) for n, s in enumerate(stop) if (i := text.find(s)) >= 0]
    return stop[min(found)[1]] if found else None


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest occurrence of any stop string; say whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not cuts:
        return text, False
    return text[: min(cuts)], True


def cut_at_eos(token_ids: list[int], eos_token_ids: tuple[int, ...]) -> tuple[list[int], bool]:
    """Tokens before the first of any EOS id, and whether one was found."""
    ends = set(eos_token_ids)
    for i, token in enumerate(token_ids):
        if token in ends:
            return token_ids[:i], True
    return token_ids, False


def completion_text(tokenizer, token_ids: list[int], healed: str = "") -> str:
    """The text the caller sees: decoded tokens without the ``healed`` text the prompt gave back
    (token healing, healing.py), which the caller's prompt already spells."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return text[len(healed):] if healed and text.startswith(healed) else text


def covering_prefix(tokenizer, token_ids: list[int], text: str) -> list[int]:
    """The shortest prefix of ``token_ids`` whose decoded text starts with ``text``: after a stop-string
    cut, the tokens that produced the kept text (a token straddling the cut is kept)."""
    # Decoded prefixes only grow, so a bisection suffices.
    def covers(n: int) -> bool:
        return tokenizer.decode(token_ids[:n], skip_special_tokens=True).startswith(text)

    low, high = 0, len(token_ids)
    if not covers(high):
        return token_ids
    while low < high:
        mid = (low + high) // 2
        if covers(mid):
            high = mid
        else:
            low = mid + 1
    return token_ids[:low]


def finish_row(
    generated: list[int],
    *,
    max_tokens: int,
    eos_token_ids: tuple[int, ...],
    stop: tuple[str, ...],
    tokenizer,
    healed: str = "",
) -> FinishedRow:
    """Cut at max_tokens, then at the first EOS, then at the earliest stop string (searched after
    the ``healed`` text, which belongs to the prompt)."""
    token_ids, hit_eos = cut_at_eos(generated[:max_tokens], eos_token_ids)
    text = completion_text(tokenizer, token_ids, healed)
    matched = first_stop(text, stop)
    text, hit_stop = apply_stop(text, stop)
    if hit_stop:
        token_ids = covering_prefix(tokenizer, token_ids, healed + text)
    finish_reason = "stop" if hit_eos or hit_stop else "length"
    return FinishedRow(token_ids=token_ids, text=text, finish_reason=finish_reason, stop_sequence=matched)
