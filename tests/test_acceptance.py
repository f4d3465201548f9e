"""Tests for hf_hydra.acceptance.greedy_accept on hand-built logits over a small tree."""

from __future__ import annotations

import pytest
import torch

from hf_hydra.acceptance import greedy_accept
from hf_hydra.tree import TreeBuffers, build_tree_buffers

# The hand-drawn tree of test_tree.py. Leaf paths, in node order: [0,1,4], [0,2,5], [0,1,3,6].
#
#   0 root
#   |-- 1 [0]
#   |   |-- 3 [0,0]
#   |   |   `-- 6 [0,0,0]
#   |   `-- 4 [0,1]
#   `-- 2 [1]
#       `-- 5 [1,0]
TREE = build_tree_buffers([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], num_heads=3)
VOCAB = 10
#                      node: 0  1  2  3  4  5  6
TOKENS = torch.tensor([9, 1, 2, 3, 4, 5, 6])


def _logits(argmax: list[int]) -> torch.Tensor:
    """(T, VOCAB) logits whose row a peaks at argmax[a]; the other entries are distinct and smaller."""
    background = torch.linspace(-1.0, 0.0, VOCAB)
    rows = background.repeat(len(argmax), 1)
    rows[torch.arange(len(argmax)), torch.tensor(argmax)] = 3.0
    return rows


def _accept(argmax: list[int], tokens: torch.Tensor = TOKENS, tree: TreeBuffers = TREE) -> tuple[list[int], int]:
    result = greedy_accept(tokens, _logits(argmax), tree)
    assert result.nodes.dtype == torch.long and result.nodes.dim() == 1
    assert result.bonus_token.dim() == 0
    return result.nodes.tolist(), int(result.bonus_token)


def test_nothing_accepted_keeps_root_and_bonus_is_root_argmax() -> None:
    # The base wants 7 after the root; the drafts at depth 1 are 1 and 2.
    #             node: 0  1  2  3  4  5  6
    assert _accept([7, 3, 5, 6, 0, 0, 0]) == ([0], 7)


def test_full_path_accepted() -> None:
    # root -> 1 (token 1) -> 3 (token 3) -> 6 (token 6) all match; bonus = argmax at node 6.
    #             node: 0  1  2  3  4  5  6
    assert _accept([1, 3, 0, 6, 0, 0, 8]) == ([0, 1, 3, 6], 8)


def test_full_short_leaf_path_accepted() -> None:
    # root -> 2 (token 2) -> 5 (token 5): the whole leaf path [0, 2, 5]; bonus = argmax at node 5.
    #             node: 0  1  2  3  4  5  6
    assert _accept([2, 0, 5, 0, 0, 4, 0]) == ([0, 2, 5], 4)


def test_longest_of_two_partially_accepted_paths() -> None:
    # Path [0,1,4] accepts node 1 only (base wants 3 after node 1, draft 4 is rejected);
    # path [0,1,3,6] accepts nodes 1 and 3 and stops at 6 (base wants 0 after node 3, draft is 6).
    #             node: 0  1  2  3  4  5  6
    assert _accept([1, 3, 0, 0, 0, 0, 0]) == ([0, 1, 3], 0)


def test_mismatch_stops_the_path_even_if_deeper_tokens_match() -> None:
    # Node 3 is rejected (base wants 8), so node 6 cannot count even though argmax at node 3 is its token.
    #             node: 0  1  2  3  4  5  6
    assert _accept([1, 8, 0, 6, 0, 0, 0]) == ([0, 1], 8)


def test_tie_goes_to_the_first_leaf_path() -> None:
    # Siblings 1 and 2 carry the same token, so [0,2,5] and [0,1,3,6] both accept 2 drafts.
    # The first of them in leaf order ([0,1,4], [0,2,5], [0,1,3,6]) wins: [0,2,5], bonus = argmax at 5.
    tokens = torch.tensor([9, 1, 1, 3, 4, 5, 6])
    #             node: 0  1  2  3  4  5  6
    assert _accept([1, 3, 5, 0, 0, 7, 0], tokens) == ([0, 2, 5], 7)
    # Equal-length tie at depth 1: [0,1] (first leaf) beats [0,2]; the bonuses tell them apart.
    assert _accept([1, 8, 7, 0, 0, 0, 0], tokens) == ([0, 1], 8)


def test_bonus_is_argmax_of_real_valued_logits() -> None:
    # Hand-written logits, close values: the root's argmax is 1 (2.5 > 2.4), node 1's is 3 (0.31 > 0.30),
    # node 3's is 2 (-0.1 is the largest); so path [0, 1, 3] is accepted and the bonus is 2.
    logits = torch.tensor(
        [
            [0.0, 2.5, 2.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 0 -> 1
            [0.0, 0.0, 0.0, 0.31, 0.30, 0.0, 0.0, 0.0, 0.0, 0.0],  # 1 -> 3 (accepts node 3, rejects node 4)
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # 2 -> 9
            [-0.5, -0.2, -0.1, -0.3, -0.4, -0.6, -0.2, -0.7, -0.8, -0.9],  # 3 -> 2 (rejects node 6)
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 4 -> 0
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 5 -> 0
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 6 -> 0
        ]
    )
    result = greedy_accept(TOKENS, logits, TREE)
    assert result.nodes.tolist() == [0, 1, 3]
    assert int(result.bonus_token) == 2


def test_chain_tree() -> None:
    chain = build_tree_buffers("chain-3", num_heads=3)
    tokens = torch.tensor([9, 4, 5, 6])
    assert _accept([4, 5, 6, 2], tokens, chain) == ([0, 1, 2, 3], 2)
    assert _accept([4, 5, 1, 2], tokens, chain) == ([0, 1, 2], 1)
    assert _accept([0, 5, 6, 2], tokens, chain) == ([0], 0)


def _reference_accept(tokens: list[int], predicted: list[int], tree: TreeBuffers) -> tuple[list[int], int]:
    """Plain-Python statement of the rule: walk every leaf path, keep the first longest accepted prefix."""
    best: list[int] = [0]
    for p in range(tree.leaf_paths.shape[0]):
        path = tree.leaf_paths[p, : tree.leaf_path_lengths[p]].tolist()
        kept = [0]
        for parent, child in zip(path, path[1:], strict=False):
            if tokens[child] != predicted[parent]:
                break
            kept.append(child)
        if len(kept) > len(best):
            best = kept
    return best, predicted[best[-1]]


@pytest.mark.parametrize("tree_name", ["cpu_small_11", "mc_sim_7b_63"])
def test_matches_reference_on_random_trees(tree_name: str) -> None:
    tree = build_tree_buffers(tree_name, num_heads=4)
    generator = torch.Generator().manual_seed(0)
    accepted_lengths = set()
    for _ in range(200):
        # A 2-token vocabulary makes matches (and ties between paths) frequent.
        tokens = torch.randint(0, 2, (tree.num_tokens,), generator=generator)
        logits = torch.randn(tree.num_tokens, 2, generator=generator)
        result = greedy_accept(tokens, logits, tree)
        expected = _reference_accept(tokens.tolist(), logits.argmax(-1).tolist(), tree)
        assert (result.nodes.tolist(), int(result.bonus_token)) == expected
        accepted_lengths.add(len(expected[0]))
    assert accepted_lengths == {1, 2, 3, 4, 5}  # every depth was exercised
