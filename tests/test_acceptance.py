"""Tests for hf_hydra.acceptance: greedy, lossless (rejection sampling) and typical acceptance on hand-built
distributions over small trees. End-to-end sampling statistics are in test_sampling.py."""

from __future__ import annotations

import pytest
import torch
from sampling_stats import chi_square_p_value

from hf_hydra import acceptance
from hf_hydra.acceptance import (
    child_slots,
    greedy_accept,
    lossless_accept,
    rejection_residual,
    row_argmax,
    sample_token,
    typical_accept,
)
from hf_hydra.tree import TreeBuffers, build_tree_buffers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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


@pytest.mark.parametrize("width", [acceptance.ARGMAX_BLOCK * 3, acceptance.ARGMAX_BLOCK * 3 + 17, 5, 49152])
def test_row_argmax_is_torch_argmax_bit_for_bit(width: int) -> None:
    # Few distinct values (ties everywhere, also across blocks and in the tail), NaNs, -inf and rows of -inf only:
    # the first maximal index, NaN counting as the largest, exactly as torch.argmax.
    generator = torch.Generator().manual_seed(width)
    for case in range(40):
        rows = 1 + case % 12
        scores = torch.randint(-3, 4, (rows, width), generator=generator).float()
        if case % 3 == 0:
            scores[torch.rand(rows, width, generator=generator) < 0.005] = float("nan")
        if case % 4 == 0:
            scores[torch.rand(rows, width, generator=generator) < 0.5] = -float("inf")
        if case % 5 == 0:
            scores[0] = -float("inf")
        if case % 6 == 0:
            scores[-1, -1] = 10.0  # the maximum alone, in the last entry (the tail where there is one)
        assert torch.equal(row_argmax(scores), scores.argmax(dim=-1)), case
    signed_zeros = torch.zeros(2, width)
    signed_zeros[:, : width // 2] = -0.0
    assert row_argmax(signed_zeros).tolist() == [0, 0]


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


# ------------------------------------------------------------------------------------------------------
# Lossless sampling (recursive rejection over each node's children) on hand-made distributions



def test_child_slots_lists_children_in_rank_order() -> None:
    # TREE: root -> 1, 2; node 1 -> 3, 4; node 2 -> 5; node 3 -> 6.
    assert child_slots(TREE).tolist() == [[1, 2], [3, 4], [5, -1], [6, -1], [-1, -1], [-1, -1], [-1, -1]]
    wide = build_tree_buffers([[0], [2], [5], [2, 1], [2, 3]], num_heads=2)  # ranks with gaps
    assert child_slots(wide).tolist() == [[1, 2, 3], [-1, -1, -1], [4, 5, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]


def test_rejection_residual_zeroes_and_renormalises() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.0, 1.0, 0.0]])
    residual = rejection_residual(probs, torch.tensor([0, 1]))
    torch.testing.assert_close(residual[0], torch.tensor([0.0, 0.6, 0.4]))
    assert torch.equal(residual[1], probs[1])  # nothing left: unchanged (never NaN; it cannot be rejected)


def test_sample_token_draws_from_the_distribution() -> None:
    """Inverse-CDF sampling: frequencies match p (chi-square), zero-probability tokens are never drawn."""
    probs = torch.tensor([0.0, 0.3, 0.0, 0.05, 0.45, 0.2, 0.0])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(probs)
    for _ in range(5000):
        counts[int(sample_token(probs, generator))] += 1
    assert counts[probs == 0].sum() == 0
    assert chi_square_p_value(counts, probs) > 1e-3
    assert int(sample_token(torch.tensor([0.0, 0.0, 2.0]), generator)) == 2  # unnormalised weights work too


def _step_outcomes(tokens: torch.Tensor, probs: torch.Tensor, tree: TreeBuffers, n: int, seed: int) -> torch.Tensor:
    """Counts over (first token, second token or V = "the step ended after one token") of n steps."""
    vocab = probs.shape[1]
    counts = torch.zeros(vocab, vocab + 1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        result = lossless_accept(tokens, probs, tree, generator)
        emitted = tokens[result.nodes[1:]].tolist() + [int(result.bonus_token)]
        counts[emitted[0], emitted[1] if len(emitted) > 1 else vocab] += 1
    return counts


def _exact_outcomes(tokens: torch.Tensor, probs: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
    """What plain sampling gives: x1 ~ p_root; if x1 is a root child c, x2 ~ p_c, else the step ends."""
    vocab = probs.shape[1]
    exact = torch.zeros(vocab, vocab + 1)
    child_of = {int(tokens[c]): int(c) for c in child_slots(tree)[0].tolist() if c >= 0}
    for x1 in range(vocab):
        if x1 in child_of:
            exact[x1, :vocab] = probs[0, x1] * probs[child_of[x1]]
        else:
            exact[x1, vocab] = probs[0, x1]
    return exact


# Root children carry tokens 0, 1, 2 (ranks 0, 1, 2); node 1 (token 0) has children with tokens 1, 3.
SAMPLING_TREE = build_tree_buffers([[0], [1], [2], [0, 0], [0, 1]], num_heads=2)
SAMPLING_TOKENS = torch.tensor([4, 0, 1, 2, 1, 3])


def _sampling_probs(seed: int = 0) -> torch.Tensor:
    """Random distributions over 5 tokens; at the root the three children (tokens 0, 1, 2) hold 0.8."""
    generator = torch.Generator().manual_seed(seed)
    probs = (torch.randn(SAMPLING_TREE.num_tokens, 5, generator=generator) * 1.2).softmax(dim=-1)
    probs[0] = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.1])
    return probs


def test_lossless_accept_samples_the_base_distribution() -> None:
    """4000 steps of one tree (chi-square over 30 cells): the emitted tokens follow p_root, then p_child."""
    probs = _sampling_probs()
    counts = _step_outcomes(SAMPLING_TOKENS, probs, SAMPLING_TREE, n=4000, seed=1)
    assert chi_square_p_value(counts, _exact_outcomes(SAMPLING_TOKENS, probs, SAMPLING_TREE)) > 1e-3


def _no_renormalisation(probs: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return probs.scatter(1, rejected[:, None], 0.0)


def _no_zeroing(probs: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return probs


@pytest.mark.parametrize("wrong_residual", [_no_renormalisation, _no_zeroing])
def test_a_wrong_residual_is_detected(monkeypatch, wrong_residual) -> None:
    """The test above has the power to see a wrong rule: forgetting to renormalise (later children are
    accepted with p(c) instead of p(c) / R), or not removing the rejected token, fails it by far."""
    monkeypatch.setattr(acceptance, "rejection_residual", wrong_residual)
    probs = _sampling_probs()
    counts = _step_outcomes(SAMPLING_TOKENS, probs, SAMPLING_TREE, n=1000, seed=1)
    assert chi_square_p_value(counts, _exact_outcomes(SAMPLING_TOKENS, probs, SAMPLING_TREE)) < 1e-6


def test_lossless_accept_point_masses_and_zero_probabilities() -> None:
    """p a point mass on a child: always accepted; a child of probability 0 (cut by top-k): never."""
    vocab = 5
    probs = torch.zeros(SAMPLING_TREE.num_tokens, vocab)
    probs[0, 1] = 1.0  # root: token 1 = node 2, the second child
    probs[2] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # node 2 (a leaf): bonus 4
    probs[[1, 3, 4, 5]] = 0.2
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        result = lossless_accept(SAMPLING_TOKENS, probs, SAMPLING_TREE, generator)
        assert result.nodes.tolist() == [0, 2] and int(result.bonus_token) == 4
    probs[0] = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5])  # no child token possible: the bonus is 3 or 4
    for _ in range(50):
        result = lossless_accept(SAMPLING_TOKENS, probs, SAMPLING_TREE, generator)
        assert result.nodes.tolist() == [0] and int(result.bonus_token) in (3, 4)


def test_lossless_accept_is_reproducible_with_a_generator() -> None:
    probs = _sampling_probs(3)

    def run(seed: int) -> list[tuple[list[int], int]]:
        generator = torch.Generator().manual_seed(seed)
        results = [lossless_accept(SAMPLING_TOKENS, probs, SAMPLING_TREE, generator) for _ in range(30)]
        return [(r.nodes.tolist(), int(r.bonus_token)) for r in results]

    assert run(5) == run(5)
    assert run(5) != run(6)


# ------------------------------------------------------------------------------------------------------
# Typical acceptance


def _typical(probs: torch.Tensor, tokens: torch.Tensor = TOKENS, **kwargs) -> tuple[list[int], int]:
    result = typical_accept(tokens, probs, TREE, generator=torch.Generator().manual_seed(0), **kwargs)
    return result.nodes.tolist(), int(result.bonus_token)


def _point_masses(argmax: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(argmax), VOCAB).float()


def test_typical_with_point_masses_is_greedy() -> None:
    """A point-mass p (temperature -> 0) has entropy 0: the threshold is eps and only the argmax passes."""
    for argmax in ([7, 3, 5, 6, 0, 0, 0], [1, 3, 0, 6, 0, 0, 8], [2, 0, 5, 0, 0, 4, 0], [1, 3, 0, 0, 0, 0, 0]):
        assert _typical(_point_masses(argmax)) == _accept(argmax)


def test_typical_threshold_is_min_of_eps_and_entropy_term() -> None:
    # Root: uniform over the 10 tokens, H = log 10, so delta * exp(-H) = delta / 10; both depth-1 drafts
    # have p = 0.1. Node 2 and node 3 put all mass on token 0, rejecting nodes 5 and 6.
    probs = torch.full((7, VOCAB), 1.0 / VOCAB)
    probs[[2, 3]] = _point_masses([0, 0])
    probs[1] = torch.zeros(VOCAB)
    probs[1, [3, 7]] = torch.tensor([0.08, 0.92])  # low entropy: delta * exp(-H) = 0.23 > eps, threshold eps
    assert _typical(probs)[0] == [0, 1]  # p(3) = 0.08 < eps = 0.09 at node 1; ties at depth 1: first path
    probs[1, [3, 7]] = torch.tensor([0.10, 0.90])
    assert _typical(probs)[0] == [0, 1, 3]  # p(3) = 0.10 > 0.09
    # At the root the entropy term decides: threshold min(eps, delta / 10) against p = 0.1.
    assert _typical(probs, posterior_threshold=0.2, posterior_alpha=0.9)[0] == [0, 1]  # 0.09: passes
    assert _typical(probs, posterior_threshold=0.2, posterior_alpha=1.2)[0] == [0]  # 0.12: fails
    assert _typical(probs, posterior_threshold=0.11, posterior_alpha=5.0)[0] == [0]  # eps = 0.11: fails


def test_typical_ties_go_to_the_most_likely_path() -> None:
    # Root uniform: both depth-1 drafts (tokens 1 and 2) pass with p = 0.1. Under node 1 token 3 has
    # p = 0.2, under node 2 token 5 has p = 0.5: both paths accept 2 drafts, the second is more likely.
    probs = torch.full((7, VOCAB), 1.0 / VOCAB)
    probs[1] = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05])
    probs[2] = torch.tensor([0.05, 0.05, 0.05, 0.05, 0.05, 0.5, 0.05, 0.05, 0.1, 0.05])
    probs[3] = torch.tensor([1.0] + [0.0] * 9)  # node 6 (token 6) is rejected under node 3
    assert _typical(probs, posterior_threshold=0.09, posterior_alpha=0.3)[0] == [0, 2, 5]


def test_acceptance_rule_of_a_call() -> None:
    from hf_hydra.acceptance import AcceptanceRule, acceptance_rule
    from hf_hydra.configuration_hydra import HydraConfig

    assert acceptance_rule(False, "typical") == AcceptanceRule("greedy")  # greedy decoding is always exact
    assert acceptance_rule(True) == acceptance_rule(True, "lossless") == AcceptanceRule("lossless")
    assert acceptance_rule(True, "typical", 0.2, 0.5) == AcceptanceRule("typical", 0.2, 0.5)
    assert acceptance_rule(True, "greedy").name == "lossless"  # the value saved before sampling existed
    assert HydraConfig(acceptance="greedy").acceptance == "lossless"
    with pytest.raises(ValueError, match="posterior_alpha"):
        acceptance_rule(True, "typical", posterior_alpha=-1.0)
