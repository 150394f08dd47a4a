"""Token streams of the training and held-out files, and the windows a training step reads.

Each file becomes ``<|bos|> text <|eos|>`` and the files are concatenated into one stream; a step
reads windows at random offsets. The windows of step s depend only on (seed, s), so a resumed run
reads exactly what an uninterrupted one would have read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .corpus import SourceFile


@dataclass
class TokenStream:
    ids: torch.Tensor  # (N,) int32
    num_bytes: int  # UTF-8 bytes of the text behind it: for per-byte figures across vocabularies

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        offsets = starts[:, None] + torch.arange(length)[None, :]
        return self.ids[offsets].long()  # (B, length)


def encode_files(tokenizer, sources: list[SourceFile]) -> TokenStream:
    # The backend tokenizer adds <|bos|> (its post-processor) and skips transformers' length warning.
    encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch([s.text for s in sources])]
    eos = tokenizer.eos_token_id
    ids = [token for row in encoded for token in (*row, eos)]
    num_bytes = sum(len(s.text.encode()) for s in sources)
    return TokenStream(torch.tensor(ids, dtype=torch.int32), num_bytes)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sample_starts(stream: TokenStream, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    if len(stream.ids) <= length:
        raise ValueError(f"the corpus has {len(stream.ids)} tokens, fewer than one window of {length}")
    return torch.randint(0, len(stream.ids) - length, (batch,), generator=generator)
