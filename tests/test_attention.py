"""Tests for hf_hydra.attention: grouped-query attention packed into the query length computes sdpa's attention."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import TINY_ARCHS, TINY_VOCAB
from transformers import DynamicCache, PreTrainedModel
from transformers.integrations import sdpa_attention

from hf_hydra import HydraForCausalLM, attention
from hf_hydra.attention import PACKED_GQA_ATTENTION, use_packed_gqa_attention
from hf_hydra.cache_name import cache_argument
from hf_hydra.tree import build_tree_buffers, causal_mask
from hf_hydra.verification import verify_tree

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def _prefilled(model: PreTrainedModel, prompt: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt, **cache_argument(cache), use_cache=True)
    return cache


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("kv_heads", [1, 2])
@torch.no_grad()
def test_tree_verification_logits_equal_sdpa_bit_for_bit(
    tiny_model_factory: Callable[..., PreTrainedModel], arch: str, kv_heads: int
) -> None:
    """The tree forward (several query tokens, a tree mask, a filled cache) of the packed model gives exactly the
    logits and hidden states of the stock sdpa model, for multi-query (1 KV head) and grouped (2 of 4) attention."""
    stock = tiny_model_factory(arch, num_key_value_heads=kv_heads)
    packed = tiny_model_factory(arch, num_key_value_heads=kv_heads)
    assert use_packed_gqa_attention(packed) and packed.config._attn_implementation == PACKED_GQA_ATTENTION
    prompt = torch.randint(0, TINY_VOCAB, (1, 37), generator=torch.Generator().manual_seed(kv_heads))
    tree = build_tree_buffers(TREE, num_heads=3)
    tokens = torch.randint(0, TINY_VOCAB, (tree.num_tokens,), generator=torch.Generator().manual_seed(7))
    expected = verify_tree(stock, _prefilled(stock, prompt), tokens, tree)
    got = verify_tree(packed, _prefilled(packed, prompt), tokens, tree)
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.hidden, expected.hidden)


@torch.no_grad()
def test_only_multi_token_masked_grouped_calls_are_packed(
    tiny_model_factory: Callable[..., PreTrainedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree forward runs the packed path in every layer; the prefill (no mask) and a one-token step go to
    transformers' own sdpa function."""
    model = tiny_model_factory("llama")
    use_packed_gqa_attention(model)
    delegated = []
    stock = sdpa_attention.sdpa_attention_forward

    def counting(*args, **kwargs):
        delegated.append(args[1].shape[2])  # query length
        return stock(*args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", counting)
    prompt = torch.randint(0, TINY_VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    cache = _prefilled(model, prompt)
    assert delegated == [9, 9]  # two layers, prefill without a mask
    tree = build_tree_buffers(TREE, num_heads=3)
    verify_tree(model, cache, torch.zeros(tree.num_tokens, dtype=torch.long), tree)
    assert delegated == [9, 9]
    mask = causal_mask(1, cache.get_seq_length(), torch.float32, torch.device("cpu"))  # (1, 1, 1, past + 1)
    model(input_ids=torch.tensor([[3]]), attention_mask=mask, **cache_argument(cache), use_cache=True)
    assert delegated == [9, 9, 1, 1]


def test_other_attention_implementations_are_left_alone(tiny_model_factory: Callable[..., PreTrainedModel]) -> None:
    model = tiny_model_factory("llama", attn_implementation="eager")
    assert not use_packed_gqa_attention(model)
    assert model.config._attn_implementation == "eager"


def test_hydra_model_packs_its_base_and_prefix_layer(tiny_model_factory: Callable[..., PreTrainedModel]) -> None:
    base = tiny_model_factory("qwen2")
    model = HydraForCausalLM.from_base(base, head_arch="hydra++", num_heads=2)
    assert base.config._attn_implementation == PACKED_GQA_ATTENTION
    assert model.heads.prefix_layer.layer.self_attn.config._attn_implementation == PACKED_GQA_ATTENTION


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.no_grad()
def test_padded_batch_generate_equals_sdpa(tiny_model_factory: Callable[..., PreTrainedModel], arch: str) -> None:
    """transformers builds sdpa's masks for the packed attention too: a left-padded batch (a padding mask in
    the prefill, then one token at a time) generates exactly what the stock sdpa model generates."""
    stock = tiny_model_factory(arch)
    packed = tiny_model_factory(arch)
    use_packed_gqa_attention(packed)
    prompts = torch.randint(1, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(prompts)
    attention_mask[1, :4] = 0  # the second prompt is 5 tokens, left-padded
    options = {"attention_mask": attention_mask, "max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(packed.generate(prompts, **options), stock.generate(prompts, **options))
