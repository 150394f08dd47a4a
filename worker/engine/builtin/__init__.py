"""The project's own block-causal masked diffusion model, registered with transformers' Auto classes.

Importing this package registers ``diffbatch_mdm`` with ``AutoConfig`` and ``AutoModelForMaskedLM``
so that ``from_pretrained`` can load a local checkpoint without remote code. Importing it again is
harmless.
"""

from transformers import AutoConfig, AutoModelForMaskedLM

from .configuration import DiffbatchMDMConfig
from .modeling import DiffbatchMDMForMaskedDiffusion


def _register() -> None:
    # transformers raises if a model type is registered twice (e.g. after importlib.reload).
    try:
        AutoConfig.register(DiffbatchMDMConfig.model_type, DiffbatchMDMConfig)
    except ValueError:
        pass
    try:
        AutoModelForMaskedLM.register(DiffbatchMDMConfig, DiffbatchMDMForMaskedDiffusion)
    except ValueError:
        pass


_register()

__all__ = ["DiffbatchMDMConfig", "DiffbatchMDMForMaskedDiffusion"]
