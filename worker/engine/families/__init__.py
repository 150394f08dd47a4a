"""diffbatch's own transformers-5 implementations of published diffusion LM architectures.

Importing this package registers each family's ``model_type`` (the value in the published
checkpoints' config.json) with ``AutoConfig`` and ``AutoModelForMaskedLM``, so the loader reads those
folders with ``trust_remote_code=False``: the checkpoints' own remote code targets transformers 4.
Importing it again is harmless.
"""

from transformers import AutoConfig, AutoModelForMaskedLM

from .dream import DreamConfig, DreamForMaskedDiffusion
from .llada import LLaDAConfig, LLaDAForMaskedDiffusion


def _register() -> None:
    pairs = ((LLaDAConfig, LLaDAForMaskedDiffusion), (DreamConfig, DreamForMaskedDiffusion))
    for config_class, model_class in pairs:
        # transformers raises if a model type is registered twice (e.g. after importlib.reload).
        try:
            AutoConfig.register(config_class.model_type, config_class)
        except ValueError:
            pass
        try:
            AutoModelForMaskedLM.register(config_class, model_class)
        except ValueError:
            pass


_register()

__all__ = ["DreamConfig", "DreamForMaskedDiffusion", "LLaDAConfig", "LLaDAForMaskedDiffusion"]
