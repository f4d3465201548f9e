"""Tests for hf_hydra.cache_name: the KV cache goes in and comes out under the installed transformers' name
(`cache` on the pinned 5.24; `past_key_values` on older versions, which the GPU machine runs: gpu_check/)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import pytest
import torch
import transformers
from transformers import DynamicCache, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM
from transformers.utils import ModelOutput

from hf_hydra.cache_name import CACHE_NAME, cache_argument, cache_name, output_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_pinned_transformers_names_it_cache() -> None:
    assert CACHE_NAME == "cache", (
        f"transformers {transformers.__version__} calls the KV cache {CACHE_NAME!r}; the pin in pyproject.toml "
        "admits 5.24.x only, where it is `cache`"
    )


def test_transformers_before_5_24_name_it_past_key_values() -> None:
    @dataclasses.dataclass
    class OutputBefore524(ModelOutput):  # CausalLMOutputWithPast's fields before the rename (e.g. 5.17)
        loss: torch.FloatTensor | None = None
        logits: torch.FloatTensor | None = None
        past_key_values: DynamicCache | None = None

    assert cache_name(OutputBefore524) == "past_key_values"


@pytest.mark.parametrize("forward", [LlamaForCausalLM.forward, LlamaDecoderLayer.forward])
def test_the_name_is_a_forward_argument_of_the_installed_transformers(forward: Callable) -> None:
    assert CACHE_NAME in inspect.signature(forward).parameters


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
@torch.no_grad()
def test_the_cache_passed_in_fills_and_comes_back(
    tiny_model_factory: Callable[..., PreTrainedModel], arch: str
) -> None:
    model = tiny_model_factory(arch)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([[1, 2, 3]]), **cache_argument(cache), use_cache=True)
    assert output_cache(out) is cache
    assert cache.get_seq_length() == 3
