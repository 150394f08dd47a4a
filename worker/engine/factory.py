"""The engine for a loaded checkpoint, picked by its model family."""

from __future__ import annotations

from .interface import GenerationEngine
from .loader import LoadedModel


def make_engine(loaded: LoadedModel, max_batch_size: int = 32, cache: str | None = None,
                cuda_graphs: bool = True) -> GenerationEngine:
    """``cache``: see Engine (None = the family's default); DiffusionGemma keeps its own cache.
    ``cuda_graphs``: False keeps every step eager on a CUDA device (Engine's ``graphs``)."""
    if loaded.family == "diffusion_gemma":
        from .diffusion_gemma.engine import DiffusionGemmaEngine

        return DiffusionGemmaEngine(loaded, max_batch_size=max_batch_size)
    from .engine import Engine

    return Engine(loaded, max_batch_size=max_batch_size, cache=cache, graphs=None if cuda_graphs else False)
