"""The name transformers gives the KV cache, in forward arguments and in outputs.

transformers 5.24 renamed `past_key_values` to `cache` (the old name still works there, with a deprecation
warning: until 5.40 in forward calls, 6.0 in `generate`). Every call that hands a cache to a transformers module
or reads one from its output goes through `cache_argument` / `output_cache`, so hf_hydra runs on 5.23 and 5.24
alike without warnings.
"""

from __future__ import annotations

from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(cache: Cache | None) -> dict[str, Cache | None]:
    """`{name: cache}`, to pass with `**` to a model, a decoder layer or `generate`."""
    return {CACHE_NAME: cache}


def output_cache(output: ModelOutput) -> Cache | None:
    """The cache a model output carries."""
    return getattr(output, CACHE_NAME)
