"""Tests for hf_hydra.verification: one tree forward on the native cache, then KV compaction.

The reference is the plain base model run token by token along each root-to-leaf path from a copy of
the same prefix cache: the tree forward must reproduce it node for node.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel

from hf_hydra.cache_name import cache_argument
from hf_hydra.tree import TreeBuffers, build_tree_buffers
from hf_hydra.verification import Verification, check_cache_supported, keep_accepted, verify_tree

ARCHS = ("llama", "qwen2", "mistral", "gemma")
PROMPT_LEN = 6
# Hand-drawn tree of depth 3 with branching at the root and at depth 1 (nodes in comments).
TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0]]
#        1    2    3    4       5       6       7          8          9


@torch.no_grad()
def _prefill(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Fresh cache over input_ids (1, L) -> (cache, logits (L, V))."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, **cache_argument(cache), use_cache=True)
    return cache, out.logits[0]


@torch.no_grad()
def _step_by_step(model: PreTrainedModel, cache: DynamicCache, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Plain one-token decoding of tokens (n,) on `cache` -> (logits (n, V), post-norm hidden (n, d))."""
    logits, hidden = [], []
    for token in tokens:
        out = model(input_ids=token.view(1, 1), **cache_argument(cache), use_cache=True, output_hidden_states=True)
        logits.append(out.logits[0, -1])
        hidden.append(out.hidden_states[-1][0, -1])
    return torch.stack(logits), torch.stack(hidden)


def _setup(
    factory: Callable[..., PreTrainedModel], arch: str, tree_spec: object, num_heads: int, seed: int = 0, **kwargs
) -> tuple[PreTrainedModel, torch.Tensor, DynamicCache, TreeBuffers, torch.Tensor]:
    model = factory(arch, seed=seed, **kwargs)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, vocab, (1, PROMPT_LEN), generator=generator)
    cache, _ = _prefill(model, prompt)
    tree = build_tree_buffers(tree_spec, num_heads=num_heads)
    tokens = torch.randint(0, vocab, (tree.num_tokens,), generator=generator)
    return model, prompt, cache, tree, tokens


def _assert_matches_paths(
    model: PreTrainedModel, prefix_cache: DynamicCache, tree: TreeBuffers, tokens: torch.Tensor, ver: Verification
) -> None:
    for p in range(tree.leaf_paths.shape[0]):
        nodes = tree.leaf_paths[p, : tree.leaf_path_lengths[p]]  # root .. leaf
        logits, hidden = _step_by_step(model, copy.deepcopy(prefix_cache), tokens[nodes])
        torch.testing.assert_close(ver.logits[nodes], logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(ver.hidden[nodes], hidden, atol=1e-4, rtol=0)
        assert torch.equal(ver.logits[nodes].argmax(-1), logits.argmax(-1)), f"path {nodes.tolist()}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_verify_tree_matches_each_path_decoded_token_by_token(
    tiny_model_factory: Callable[..., PreTrainedModel], arch: str, attn_implementation: str
) -> None:
    model, _, cache, tree, tokens = _setup(tiny_model_factory, arch, TREE, 3, attn_implementation=attn_implementation)
    prefix_cache = copy.deepcopy(cache)

    ver = verify_tree(model, cache, tokens, tree)

    assert ver.logits.shape == (tree.num_tokens, model.config.vocab_size)
    assert ver.hidden.shape == (tree.num_tokens, model.config.hidden_size)
    assert cache.get_seq_length() == PROMPT_LEN + tree.num_tokens
    # `hidden` is the post-norm state that feeds lm_head (what the draft heads consume).
    torch.testing.assert_close(model.lm_head(ver.hidden), ver.logits, atol=1e-5, rtol=0)
    _assert_matches_paths(model, prefix_cache, tree, tokens, ver)


def test_verify_tree_mc_sim_63(tiny_model_factory: Callable[..., PreTrainedModel]) -> None:
    model, _, cache, tree, tokens = _setup(tiny_model_factory, "llama", "mc_sim_7b_63", 4, seed=3)
    prefix_cache = copy.deepcopy(cache)
    ver = verify_tree(model, cache, tokens, tree)
    _assert_matches_paths(model, prefix_cache, tree, tokens, ver)


def test_verify_tree_is_not_a_plain_causal_forward(tiny_model_factory: Callable[..., PreTrainedModel]) -> None:
    """Guards the test above: ignoring the tree mask / positions would change the logits a lot."""
    model, _, cache, tree, tokens = _setup(tiny_model_factory, "llama", TREE, 3)
    plain = model(input_ids=tokens[None], **cache_argument(copy.deepcopy(cache))).logits[0]
    ver = verify_tree(model, cache, tokens, tree)
    assert (plain[1:] - ver.logits[1:]).abs().max() > 1e-2
    torch.testing.assert_close(plain[0], ver.logits[0], atol=1e-4, rtol=0)  # the root sees the same context


# Accepted paths (node indices of TREE, root first): root only, a partial path, a full path whose rows are
# not contiguous in the cache (0, 2, 6, 9), and the first leaf path.
ACCEPTED = [[0], [0, 1], [0, 2, 6, 9], [0, 1, 4, 7], [0, 1, 5, 8]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("accepted", ACCEPTED, ids=str)
def test_keep_accepted_equals_fresh_prefill(
    tiny_model_factory: Callable[..., PreTrainedModel], arch: str, accepted: list[int]
) -> None:
    model, prompt, cache, tree, tokens = _setup(tiny_model_factory, arch, TREE, 3)
    nodes = torch.tensor(accepted)
    assert any(tree.leaf_paths[p, : len(accepted)].tolist() == accepted for p in range(tree.leaf_paths.shape[0])), (
        "not a root path of TREE"
    )
    verify_tree(model, cache, tokens, tree)

    keep_accepted(cache, PROMPT_LEN, nodes, tree.num_tokens)

    assert cache.get_seq_length() == PROMPT_LEN + len(accepted)
    fresh, _ = _prefill(model, torch.cat([prompt, tokens[nodes][None]], dim=1))
    assert len(cache.layers) == len(fresh.layers) == model.config.num_hidden_layers
    for layer, expected in zip(cache.layers, fresh.layers, strict=True):
        assert layer.keys.shape == expected.keys.shape
        torch.testing.assert_close(layer.keys, expected.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.values, expected.values, atol=1e-5, rtol=0)


def test_second_tree_after_keep_accepted(tiny_model_factory: Callable[..., PreTrainedModel]) -> None:
    """Two verify/compact rounds in a row still equal plain decoding from a fresh prefill."""
    model, prompt, cache, tree, tokens = _setup(tiny_model_factory, "qwen2", TREE, 3, seed=5)
    verify_tree(model, cache, tokens, tree)
    nodes = torch.tensor([0, 2, 6, 9])
    keep_accepted(cache, PROMPT_LEN, nodes, tree.num_tokens)
    committed = torch.cat([prompt, tokens[nodes][None]], dim=1)

    second_tokens = torch.randint(
        0, model.config.vocab_size, (tree.num_tokens,), generator=torch.Generator().manual_seed(9)
    )
    ver = verify_tree(model, cache, second_tokens, tree)
    fresh, _ = _prefill(model, committed)
    _assert_matches_paths(model, fresh, tree, second_tokens, ver)


def test_check_cache_supported_accepts_full_attention(tiny_model_factory: Callable[..., PreTrainedModel]) -> None:
    for arch in ARCHS:
        model = tiny_model_factory(arch)
        cache, _ = _prefill(model, torch.arange(4)[None])
        check_cache_supported(cache)  # no error


def test_check_cache_supported_rejects_sliding_window(tiny_model_factory: Callable[..., PreTrainedModel]) -> None:
    model = tiny_model_factory("mistral", sliding_window=4)
    cache, _ = _prefill(model, torch.arange(6)[None])
    assert {type(layer).__name__ for layer in cache.layers} == {"DynamicSlidingWindowLayer"}
    with pytest.raises(ValueError, match=r"DynamicSlidingWindowLayer.*speculative=False"):
        check_cache_supported(cache)


def test_check_cache_supported_rejects_mixed_layers(tiny_model_factory: Callable[..., PreTrainedModel]) -> None:
    # Qwen2 with a sliding window on the upper layer only: one full, one sliding layer.
    model = tiny_model_factory("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    cache, _ = _prefill(model, torch.arange(6)[None])
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicLayer", "DynamicSlidingWindowLayer"]
    with pytest.raises(ValueError, match="sliding-window"):
        check_cache_supported(cache)
