"""hf_hydra: Hydra speculative decoding (sequentially dependent draft heads) for Hugging Face causal LMs.

Importing the package registers model type "hydra" with `AutoConfig`, `AutoModelForCausalLM` and `AutoModel`:
heads repos load with either Auto class, both giving a `HydraForCausalLM` (the heads are useless without the base's
LM head, so `AutoModel` does not strip it as it would for a plain causal LM).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from . import assets
from ._version import __version__
from .configuration_hydra import HydraConfig
from .decoding import context_speculative_generate
from .modeling_hydra import HydraForCausalLM
from .sequence_steps import HydraGenerateOutput, SpeculationStats

AutoConfig.register("hydra", HydraConfig)
AutoModelForCausalLM.register(HydraConfig, HydraForCausalLM)
AutoModel.register(HydraConfig, HydraForCausalLM)

__all__ = [
    "assets",
    "HydraConfig",
    "HydraForCausalLM",
    "HydraGenerateOutput",
    "SpeculationStats",
    "context_speculative_generate",
    "__version__",
]
