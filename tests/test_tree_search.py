"""Tree search on synthetic acceptance tables: the greedy builder against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from hf_hydra.tree import build_tree_buffers, choose_tree, expected_tau, greedy_tree, path_probability


def random_accuracy(depth: int, ranks: int, seed: int) -> list[list[float]]:
    """Per depth, probabilities of ranks 0..ranks-1 summing to < 1 (not necessarily sorted)."""
    rng = random.Random(seed)
    table = []
    for _ in range(depth):
        weights = [rng.random() for _ in range(ranks + 1)]  # the extra one: the right token is below the top-k
        table.append([w / sum(weights) for w in weights[:ranks]])
    return table


def all_paths(depth: int, ranks: int) -> list[tuple[int, ...]]:
    return [p for d in range(1, depth + 1) for p in itertools.product(range(ranks), repeat=d)]


def best_by_brute_force(accuracy: list[list[float]], num_nodes: int) -> float:
    paths = all_paths(len(accuracy), len(accuracy[0]))
    best = 0.0
    for subset in itertools.combinations(paths, num_nodes):
        chosen = set(subset)
        if all(len(p) == 1 or p[:-1] in chosen for p in subset):
            best = max(best, expected_tau(subset, accuracy))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_nodes", [1, 2, 4, 6])
def test_greedy_tree_is_optimal_on_small_cases(seed, num_nodes):
    accuracy = random_accuracy(depth=3, ranks=2, seed=seed)
    tree = greedy_tree(accuracy, num_nodes)
    assert len(tree) == num_nodes
    assert expected_tau(tree, accuracy) == pytest.approx(best_by_brute_force(accuracy, num_nodes))
    build_tree_buffers(tree, num_heads=3)  # a valid tree: every parent present, depth <= heads


def test_greedy_tree_respects_the_number_of_heads():
    accuracy = [[0.9, 0.05], [0.9], [0.9]]  # deep paths are the most likely ones
    assert greedy_tree(accuracy, 3) == ((0,), (0, 0), (0, 0, 0))  # 0.9 > 0.81 > 0.729 > 0.05
    tree = greedy_tree(accuracy, 10)  # asks for more nodes than the 3 heads and 2 ranks allow
    assert tree == ((0,), (1,), (0, 0), (1, 0), (0, 0, 0), (1, 0, 0))


def test_hand_computed_probabilities():
    accuracy = [[0.6, 0.2], [0.5]]
    assert path_probability((1, 0), accuracy) == pytest.approx(0.1)
    assert path_probability((0, 1), accuracy) == 0.0  # rank beyond what was measured
    assert expected_tau([(0,), (1,), (0, 0)], accuracy) == pytest.approx(1 + 0.6 + 0.2 + 0.3)


@pytest.mark.parametrize("seed", range(4))
def test_choose_tree_maximises_expected_speed(seed):
    accuracy = random_accuracy(depth=3, ranks=2, seed=seed)
    rng = random.Random(seed)
    verify = sorted(0.08 + 0.01 * rng.random() * m for m in range(1, 9))  # seconds for 1..8 tokens
    choice = choose_tree(accuracy, verify)
    speeds = {n: expected_tau(greedy_tree(accuracy, n), accuracy) / verify[n] for n in range(1, len(verify))}
    assert choice.expected_tokens_per_second == pytest.approx(max(speeds.values()))
    assert len(choice.paths) == max(speeds, key=speeds.get)
