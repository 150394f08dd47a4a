"""diffbatch's own transformers-5 implementations of published diffusion LM architectures: LLaDA and
Dream (full attention), SDAR, LLaDA2 and Fast-dLLM v2 (block-causal, on the built-in model's classes).

Importing this package registers each family's ``model_type`` (the value in the published
checkpoints' config.json) with ``AutoConfig`` and ``AutoModelForMaskedLM``, so the loader reads those
folders with ``trust_remote_code=False``: the checkpoints' own remote code targets transformers 4.
Importing it again is harmless.
"""

from transformers import AutoConfig, AutoModelForMaskedLM
from transformers.conversion_mapping import register_checkpoint_conversion_mapping

from ..builtin import fused_projections
from .dream import DreamConfig, DreamForMaskedDiffusion
from .fast_dllm_v2 import FastDLLMv2Config, FastDLLMv2ForBlockDiffusion, fast_dllm_v2_weight_names
from .llada import LLaDAConfig, LLaDAForMaskedDiffusion
from .llada2 import LLaDA2Config, LLaDA2ForBlockDiffusion, llada2_weight_names
from .sdar import SDARConfig, SDARForBlockDiffusion


def _register() -> None:
    pairs = ((LLaDAConfig, LLaDAForMaskedDiffusion), (DreamConfig, DreamForMaskedDiffusion),
             (SDARConfig, SDARForBlockDiffusion), (LLaDA2Config, LLaDA2ForBlockDiffusion),
             (FastDLLMv2Config, FastDLLMv2ForBlockDiffusion))
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
    # SDAR's weights load into the built-in model's classes, whose q/k/v and gate/up are fused.
    register_checkpoint_conversion_mapping(SDARConfig.model_type, fused_projections(), overwrite=True)
    register_checkpoint_conversion_mapping(LLaDA2Config.model_type, llada2_weight_names(), overwrite=True)
    register_checkpoint_conversion_mapping(FastDLLMv2Config.model_type, fast_dllm_v2_weight_names(), overwrite=True)


_register()

__all__ = ["DreamConfig", "DreamForMaskedDiffusion", "FastDLLMv2Config", "FastDLLMv2ForBlockDiffusion",
           "LLaDA2Config", "LLaDA2ForBlockDiffusion", "LLaDAConfig",
           "LLaDAForMaskedDiffusion", "SDARConfig", "SDARForBlockDiffusion"]
