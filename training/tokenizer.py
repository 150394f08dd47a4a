"""A byte-level BPE tokenizer trained on the corpus with the ``tokenizers`` package.

Byte-level means any UTF-8 text round-trips; the merges make code ~3.5x shorter in tokens than raw
bytes, so the same model sees more context and each denoising step accepts more text. The special
tokens and chat template are the built-in model's (``worker.engine.builtin.tokenizer``), with the
same ids, so checkpoints differ only in their merges.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from worker.engine.builtin.tokenizer import SPECIAL_TOKENS, wrap_tokenizer


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """Deterministic for the same texts and vocab_size (the BPE trainer breaks ties by order)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..6, as in the byte tokenizer
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(backend)
