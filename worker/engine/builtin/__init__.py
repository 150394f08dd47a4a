"""The project's own block-causal masked diffusion model, registered with transformers' Auto classes.

Importing this package registers ``diffbatch_mdm`` with ``AutoConfig`` and ``AutoModelForMaskedLM``
so that ``from_pretrained`` can load a local checkpoint without remote code. Importing it again is
harmless.
"""

from transformers import AutoConfig, AutoModelForMaskedLM
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, WeightConverter, WeightRenaming

from .configuration import DiffbatchMDMConfig
from .modeling import DiffbatchMDMForMaskedDiffusion


def fused_projections() -> list[WeightConverter | WeightRenaming]:
    """Checkpoints store q/k/v and gate/up as separate tensors (the common layout, readable by any
    tool); the model holds each group as one matrix. transformers concatenates them on load and
    splits them again on save (the reverse of Concatenate is Chunk)."""
    return [
        WeightConverter(source_patterns=[f"self_attn.{p}_proj.weight" for p in "qkv"],
                        target_patterns="self_attn.qkv_proj.weight", operations=[Concatenate(dim=0)]),
        WeightConverter(source_patterns=["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                        target_patterns="mlp.gate_up_proj.weight", operations=[Concatenate(dim=0)]),
    ]


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
    register_checkpoint_conversion_mapping(DiffbatchMDMConfig.model_type, fused_projections(), overwrite=True)


_register()

__all__ = ["DiffbatchMDMConfig", "DiffbatchMDMForMaskedDiffusion"]
