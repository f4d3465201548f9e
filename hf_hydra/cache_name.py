"""The name transformers gives the KV cache, in forward arguments and in outputs.

transformers 5.24 renamed `past_key_values` to `cache` (the old name still works there, with a deprecation
warning: until 5.40 in forward calls, 6.0 in `generate`). The pin in pyproject.toml admits 5.24.x only, which is
what CI tests, and there the name is `cache`. Older transformers still call it `past_key_values`: the GPU machine
runs hf_hydra from the repository on its own transformers 5.17, outside the pin (gpu_check/README.md). Every call
that hands a cache to a transformers module or reads one from its output goes through `cache_argument` /
`output_cache`, so both run without warnings.
"""

from __future__ import annotations

from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput


def cache_name(output_class: type[ModelOutput] = CausalLMOutputWithPast) -> str:
    """The cache's name in a transformers whose causal-LM output is `output_class`: `cache` from 5.24 on (the
    pinned versions), `past_key_values` before (the GPU machine's 5.17)."""
    return "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"


CACHE_NAME = cache_name()
CACHE_NAMES = ("cache", "past_key_values")  # what a caller may name the cache argument in the pinned transformers


def cache_argument(cache: Cache | None) -> dict[str, Cache | None]:
    """`{name: cache}`, to pass with `**` to a model, a decoder layer or `generate`."""
    return {CACHE_NAME: cache}


def output_cache(output: ModelOutput) -> Cache | None:
    """The cache a model output carries."""
    return getattr(output, CACHE_NAME)
