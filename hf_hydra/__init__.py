"""hf_hydra: Hydra speculative decoding (sequentially dependent draft heads) for Hugging Face causal LMs.

Importing the package registers model type "hydra" with `AutoConfig` and `AutoModelForCausalLM`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from . import assets
from ._version import __version__
from .configuration_hydra import HydraConfig
from .decoding import HydraGenerateOutput, SpeculationStats, context_speculative_generate
from .modeling_hydra import HydraForCausalLM

AutoConfig.register("hydra", HydraConfig)
AutoModelForCausalLM.register(HydraConfig, HydraForCausalLM)

__all__ = [
    "assets",
    "HydraConfig",
    "HydraForCausalLM",
    "HydraGenerateOutput",
    "SpeculationStats",
    "context_speculative_generate",
    "__version__",
]
