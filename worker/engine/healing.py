"""Token healing: give back the prompt's last token and let the model choose how it continues.

A BPE tokenizer merges text across the place where a prompt ends and the completion begins. The
built-in tokenizer, like GPT-2's, writes a newline and the next line's indentation as one token
(``"\\n   "``), so in training a lone ``"\\n"`` token is only ever followed by a line at the left
margin. A completion prompt that ends with a newline inside a function therefore makes the model
start a new top-level line (a ``#`` comment, a new ``def``) instead of continuing the body.

Healing drops the prompt's last token and requires the first generated token to be one whose text
starts with the dropped text (``"\\n"`` -> ``"\\n"``, ``"\\n   "``, ``"\\n       "`` ...). The
completion's text is then reported without that prefix, so it still continues the prompt exactly
as the caller wrote it. (The idea is the "token healing" of Microsoft's guidance library, described
in its README; this is our implementation for a denoiser: a vocabulary mask on the first position.)
"""

from __future__ import annotations

import torch

from .params import Healing


class TokenHealer:
    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        # Only byte-level BPE (GPT-2 style: the built-in model, LLaDA, Dream) spells each token the
        # same wherever it stands. SentencePiece-style decoders drop a token's leading space when
        # it stands alone, so a spelling prefix would not be a text prefix: no healing there.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.enabled = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
        self.special = set(getattr(tokenizer, "all_special_ids", []))
        self._spellings: list[str] | None = None  # decoded text of every id, built on first use
        self._extensions_of: dict[str, tuple[int, ...]] = {}

    def heal(self, prompt_ids: list[int]) -> tuple[list[int], Healing | None]:
        """The prompt without its last token and the healing, or the prompt unchanged and None when
        no other token starts with the last token's text (nothing to heal)."""
        if not self.enabled or len(prompt_ids) < 2 or prompt_ids[-1] in self.special:
            return prompt_ids, None
        text = self.tokenizer.decode([prompt_ids[-1]])
        if not text or "\ufffd" in text:  # a partial UTF-8 byte sequence: leave it alone
            return prompt_ids, None
        if self.tokenizer.decode(prompt_ids) != self.tokenizer.decode(prompt_ids[:-1]) + text:
            return prompt_ids, None  # the text does not split at this token: nothing safe to give back
        allowed = self._extensions(text)
        if len(allowed) < 2:
            return prompt_ids, None
        return prompt_ids[:-1], Healing(text=text, allowed=allowed)

    def _extensions(self, text: str) -> tuple[int, ...]:
        if text not in self._extensions_of:  # prompts of a batch mostly end alike ("\n", " ")
            if self._spellings is None:  # the tokenizer's ids; a model may pad its vocabulary beyond them
                self._spellings = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._extensions_of[text] = tuple(i for i, spelling in enumerate(self._spellings)
                                              if spelling.startswith(text) and i not in self.special
                                              and i < self.vocab_size)
        return self._extensions_of[text]


def first_token_mask(healings: list[Healing | None], vocab_size: int, device) -> torch.Tensor | None:
    """(B, V) bool: the tokens each row's first generated position may take; None if no row heals."""
    if not any(healings):
        return None
    mask = torch.ones((len(healings), vocab_size), dtype=torch.bool)
    for row, healing in enumerate(healings):  # once per batch (or per admitted row), not per step
        if healing is not None:
            mask[row] = False
            mask[row, list(healing.allowed)] = True
    return mask.to(device)
