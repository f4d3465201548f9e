"""Tests for hf_hydra.tree: tree specs -> buffers, named trees, validation, attention masks."""

from __future__ import annotations

import pytest
import torch

from hf_hydra.tree import (
    CPU_SMALL_11,
    DEFAULT_TREE_NAME,
    MC_SIM_7B_63,
    NAMED_TREES,
    TreeBuffers,
    build_tree_buffers,
    causal_mask,
    chain,
    resolve_tree,
    tree_attention_mask,
)

# A hand-drawn tree. Nodes in (depth, path) order:
#
#   0 root
#   |-- 1 [0]
#   |   |-- 3 [0,0]
#   |   |   `-- 6 [0,0,0]
#   |   `-- 4 [0,1]
#   `-- 2 [1]
#       `-- 5 [1,0]
SMALL_TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def _assert_equal(actual: torch.Tensor, expected: list) -> None:
    expected_tensor = torch.tensor(expected)
    assert actual.dtype == expected_tensor.dtype, (actual.dtype, expected_tensor.dtype)
    assert torch.equal(actual, expected_tensor), f"\n{actual}\n!=\n{expected_tensor}"


def _assert_same_buffers(a: TreeBuffers, b: TreeBuffers) -> None:
    assert a.paths == b.paths
    for name in ("depths", "parents", "attention_mask", "ancestors", "leaf_paths", "leaf_path_lengths"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert len(a.levels) == len(b.levels)
    for la, lb in zip(a.levels, b.levels, strict=True):
        assert (la.depth, la.start, la.end, la.topk) == (lb.depth, lb.start, lb.end, lb.topk)
        for name in ("parents", "parent_rows", "ranks"):
            assert torch.equal(getattr(la, name), getattr(lb, name)), name


def test_small_tree_buffers_literal() -> None:
    tree = build_tree_buffers(SMALL_TREE, num_heads=3)

    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert tree.num_tokens == 7
    assert tree.max_depth == 3
    _assert_equal(tree.depths, [0, 1, 1, 2, 2, 2, 3])
    _assert_equal(tree.parents, [-1, 0, 0, 1, 1, 2, 3])
    _assert_equal(
        tree.attention_mask,
        [
            [True, False, False, False, False, False, False],
            [True, True, False, False, False, False, False],
            [True, False, True, False, False, False, False],
            [True, True, False, True, False, False, False],
            [True, True, False, False, True, False, False],
            [True, False, True, False, False, True, False],
            [True, True, False, True, False, False, True],
        ],
    )
    _assert_equal(
        tree.ancestors,
        [
            [0, 0, 0, 0],
            [0, 1, 0, 0],
            [0, 2, 0, 0],
            [0, 1, 3, 0],
            [0, 1, 4, 0],
            [0, 2, 5, 0],
            [0, 1, 3, 6],
        ],
    )
    # Leaves in node order: 4 [0,1], 5 [1,0], 6 [0,0,0].
    _assert_equal(tree.leaf_paths, [[0, 1, 4, 0], [0, 2, 5, 0], [0, 1, 3, 6]])
    _assert_equal(tree.leaf_path_lengths, [3, 3, 4])

    level1, level2, level3 = tree.levels
    assert (level1.depth, level1.start, level1.end, level1.topk) == (1, 1, 3, 2)
    _assert_equal(level1.parents, [0])
    _assert_equal(level1.parent_rows, [0, 0])
    _assert_equal(level1.ranks, [0, 1])

    assert (level2.depth, level2.start, level2.end, level2.topk) == (2, 3, 6, 2)
    _assert_equal(level2.parents, [1, 2])
    _assert_equal(level2.parent_rows, [0, 0, 1])
    _assert_equal(level2.ranks, [0, 1, 0])

    assert (level3.depth, level3.start, level3.end, level3.topk) == (3, 6, 7, 1)
    _assert_equal(level3.parents, [3])
    _assert_equal(level3.parent_rows, [0])
    _assert_equal(level3.ranks, [0])


def test_level_topk_uses_largest_rank_not_count() -> None:
    # Depth 1 holds ranks 0 and 2 only: the head must still draw its top 3.
    tree = build_tree_buffers([[2], [0], [2, 1]], num_heads=2)
    assert tree.paths == ((0,), (2,), (2, 1))
    (level1, level2) = tree.levels
    assert level1.topk == 3
    _assert_equal(level1.ranks, [0, 2])
    assert level2.topk == 2
    _assert_equal(level2.parents, [2])
    _assert_equal(level2.ranks, [1])
    _assert_equal(tree.leaf_paths, [[0, 1, 0], [0, 2, 3]])
    _assert_equal(tree.leaf_path_lengths, [2, 3])


def test_unsorted_input_is_sorted_by_depth_then_path() -> None:
    shuffled = [[0, 0, 0], [1, 0], [0, 1], [1], [0, 0], [0]]
    assert resolve_tree(shuffled, num_heads=3) == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    _assert_same_buffers(build_tree_buffers(shuffled, num_heads=3), build_tree_buffers(SMALL_TREE, num_heads=3))


def test_mc_sim_7b_63_shape() -> None:
    assert len(MC_SIM_7B_63) == 63
    tree = build_tree_buffers("mc_sim_7b_63", num_heads=4)
    assert tree.num_tokens == 64
    assert tree.max_depth == 4
    _assert_equal(torch.bincount(tree.depths), [1, 10, 28, 23, 2])
    assert [(lvl.start, lvl.end) for lvl in tree.levels] == [(1, 11), (11, 39), (39, 62), (62, 64)]
    assert [lvl.topk for lvl in tree.levels] == [10, 10, 10, 2]
    # Sorted: the constant lists (0, 0) before (1,); the buffers must not.
    assert tree.paths[:3] == ((0,), (1,), (2,))
    assert tree.paths[-2:] == ((0, 0, 0, 0), (0, 0, 0, 1))


@pytest.mark.parametrize("name", sorted(NAMED_TREES))
def test_named_tree_invariants(name: str) -> None:
    tree = build_tree_buffers(name, num_heads=4)
    assert tree.paths == tuple(sorted(NAMED_TREES[name], key=lambda p: (len(p), p)))
    assert tree.num_tokens == len(NAMED_TREES[name]) + 1
    node_of = {(): 0} | {path: i + 1 for i, path in enumerate(tree.paths)}
    for path, node in node_of.items():
        depth = len(path)
        assert int(tree.depths[node]) == depth
        assert int(tree.parents[node]) == (node_of[path[:-1]] if path else -1)
        expected_chain = [node_of[path[:k]] for k in range(depth + 1)]
        assert tree.ancestors[node, : depth + 1].tolist() == expected_chain
        assert tree.attention_mask[node].nonzero().flatten().tolist() == expected_chain
    # Every leaf appears exactly once in leaf_paths, and nothing else does.
    leaves = [node for path, node in node_of.items() if not any(p[:-1] == path for p in tree.paths)]
    last = tree.leaf_paths[torch.arange(len(leaves)), tree.leaf_path_lengths - 1]
    assert last.tolist() == leaves
    # Levels tile the nodes 1..N, and each node's (parent, rank) is recoverable from its level.
    assert tree.levels[0].start == 1 and tree.levels[-1].end == tree.num_tokens
    for lvl, nxt in zip(tree.levels, tree.levels[1:], strict=False):
        assert lvl.end == nxt.start
    for lvl in tree.levels:
        for j, node in enumerate(range(lvl.start, lvl.end)):
            path = tree.paths[node - 1]
            assert int(lvl.parents[lvl.parent_rows[j]]) == node_of[path[:-1]]
            assert int(lvl.ranks[j]) == path[-1]
            assert int(lvl.ranks[j]) < lvl.topk


def test_cpu_small_11_is_the_default() -> None:
    assert DEFAULT_TREE_NAME == "cpu_small_11"
    tree = build_tree_buffers("cpu_small_11", num_heads=4)
    assert tree.num_tokens == 11 == len(CPU_SMALL_11) + 1
    _assert_equal(torch.bincount(tree.depths), [1, 3, 3, 3, 1])


def test_chain() -> None:
    assert chain(1) == ((0,),)
    assert chain(3) == ((0,), (0, 0), (0, 0, 0))
    assert chain(0) == ()
    tree = build_tree_buffers(chain(3), num_heads=3)
    _assert_equal(tree.depths, [0, 1, 2, 3])
    _assert_equal(tree.parents, [-1, 0, 1, 2])
    _assert_equal(tree.leaf_paths, [[0, 1, 2, 3]])
    _assert_equal(tree.leaf_path_lengths, [4])
    _assert_equal(tree.attention_mask, torch.ones(4, 4, dtype=torch.bool).tril().tolist())


def test_chain_names() -> None:
    assert resolve_tree("chain", num_heads=4) == chain(4)
    assert resolve_tree("chain-2", num_heads=4) == chain(2)
    with pytest.raises(ValueError, match="only 4 draft heads"):
        resolve_tree("chain-5", num_heads=4)


@pytest.mark.parametrize(
    ("tree", "num_heads", "match"),
    [
        ([[0], [0, 0], [0, 0, 0]], 2, r"depth 3 but there are only 2 draft heads"),
        ("mc_sim_7b_63", 3, r"only 3 draft heads"),
        ([[0], [1, 0]], 2, r"no parent \[1\]"),
        ([[0], [0, 0, 0]], 3, r"no parent \[0, 0\]"),
        ([[0], [1], [0]], 2, r"same path twice"),
        ([[0], [-1]], 2, r">= 0"),
        ([[0], []], 2, r"non-empty"),
        ([], 2, r"at least one node"),
        ("mc_sim_7b_64", 4, r"Unknown tree name 'mc_sim_7b_64'"),
        ("chain-x", 4, r"Unknown tree name"),
    ],
)
def test_invalid_trees_raise(tree: object, num_heads: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_tree(tree, num_heads=num_heads)
    with pytest.raises(ValueError, match=match):
        build_tree_buffers(tree, num_heads=num_heads)


def test_to_keeps_everything() -> None:
    tree = build_tree_buffers(SMALL_TREE, num_heads=3)
    _assert_same_buffers(tree.to("cpu"), tree)


def test_causal_mask_values() -> None:
    lo = torch.finfo(torch.float32).min
    mask = causal_mask(new=3, past=2, dtype=torch.float32, device=torch.device("cpu"))
    assert mask.shape == (1, 1, 3, 5)
    assert mask.dtype == torch.float32
    _assert_equal(
        mask[0, 0],
        [
            [0.0, 0.0, 0.0, lo, lo],
            [0.0, 0.0, 0.0, 0.0, lo],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ],
    )


def test_tree_attention_mask_values() -> None:
    tree = build_tree_buffers([[0], [1], [0, 0]], num_heads=2)
    lo = torch.finfo(torch.float32).min
    mask = tree_attention_mask(tree, past=2, dtype=torch.float32)
    assert mask.shape == (1, 1, 4, 6)
    _assert_equal(
        mask[0, 0],
        [
            [0.0, 0.0, 0.0, lo, lo, lo],
            [0.0, 0.0, 0.0, 0.0, lo, lo],
            [0.0, 0.0, 0.0, lo, 0.0, lo],
            [0.0, 0.0, 0.0, 0.0, lo, 0.0],
        ],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tree_attention_mask_dtype_and_no_past(dtype: torch.dtype) -> None:
    tree = build_tree_buffers(SMALL_TREE, num_heads=3)
    for past in (0, 5):
        mask = tree_attention_mask(tree, past=past, dtype=dtype)
        assert mask.shape == (1, 1, 7, past + 7)
        assert mask.dtype == dtype
        assert bool((mask[..., :past] == 0).all())
        tree_part = mask[0, 0, :, past:]
        assert torch.equal(tree_part == 0, tree.attention_mask)
        assert bool((tree_part[~tree.attention_mask] == torch.finfo(dtype).min).all())
