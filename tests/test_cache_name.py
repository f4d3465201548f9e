"""Tests for hf_hydra.cache_name: the KV cache goes in and comes out under the installed transformers' name."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM

from hf_hydra.cache_name import CACHE_NAME, cache_argument, output_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
