"""Dynamic trees: per step, the candidate nodes most likely to be accepted, as many as pay on this machine.

A static tree verifies the same rank paths every step, whether the heads are sure or lost. A dynamic tree
scores every candidate by its estimated probability of being accepted and verifies the best ones:

    expand  : the heads draft depth by depth; at each depth the `width` best-scored nodes that `select` would
              keep so far are expanded into their `children` most likely tokens (Hydra heads read the tokens
              chosen on each path; Medusa heads give the same candidates below every parent). A head
              candidate's score is its parent's times the head's calibrated probability of that token
              (`HeadCalibration`). A depth is drafted only where the candidates it is expected to add (the
              frontier's scores times the head's measured rank accuracy) are worth the head call's cost.
    context : candidates copied from earlier in the text join the trie first, with their own estimates (the
              call's acceptance rate per match length, `hf_hydra.context`); a token both propose keeps the
              larger score.
    select  : with nodes sorted by score, verifying the best N adds their scores to the expected tokens of
              the step (siblings exclude each other: tau = 1 + the sum of the node probabilities), and costs
              t(N + 1) on the measured verification curve (`tune-tree`); N maximises expected tokens per
              second. Scores never grow along a path, so the best N always include their ancestors.

Every candidate is a deterministic function of the sequence so far (and of the call's earlier steps), chosen
before the step's verification: greedy output stays plain greedy's and lossless sampling stays exact (see
`hf_hydra.acceptance`), whatever the scores were.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .heads import DraftHeads
from .tree import TreeBuffers, tree_of_rank_paths

# Probability bins of the calibration: fine where most candidates are (low probabilities).
CALIBRATION_EDGES: tuple[float, ...] = (
    0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
)  # fmt: skip


@dataclass(frozen=True)
class HeadCalibration:
    """P(a head's candidate is the base's token | the head's probability p for it), per head.

    rates[k][b] holds for head k and probabilities in [edges[b], edges[b + 1]), measured teacher-forced on
    held-out text (given a correct path) and made non-decreasing in p. Without a measurement (`identity`)
    the heads' own probabilities are taken at their word."""

    edges: tuple[float, ...]  # (B + 1,) from 0 to 1
    rates: tuple[tuple[float, ...], ...] | None  # [head][B], None: identity

    @classmethod
    def identity(cls) -> HeadCalibration:
        return cls(CALIBRATION_EDGES, None)

    @classmethod
    def from_record(cls, record: dict | None) -> HeadCalibration:
        """From `tree_tuning.json`'s "calibration" entry (None: identity)."""
        if not record:
            return cls.identity()
        edges, rates = tuple(record["edges"]), tuple(tuple(row) for row in record["rates"])
        if any(len(row) != len(edges) - 1 for row in rates):
            raise ValueError("A head calibration needs one rate per probability bin for every head.")
        return cls(edges, rates)

    def to_record(self) -> dict:
        return {"edges": list(self.edges), "rates": [list(row) for row in self.rates or ()]}

    def __call__(self, head: int, probabilities: torch.Tensor) -> torch.Tensor:
        """Calibrated acceptance probabilities of head `head`'s candidates, same shape as `probabilities`."""
        if self.rates is None:
            return probabilities
        inner_edges, rates = (t.to(probabilities) for t in self._tensors)
        bins = torch.bucketize(probabilities, inner_edges, right=True)
        return rates[min(head, rates.shape[0] - 1)][bins]

    @functools.cached_property
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The inner bin edges (B - 1,) and the rates (H, B) as float32 tensors, made once per calibration."""
        return torch.tensor(self.edges[1:-1]), torch.tensor(self.rates)


def calibrate(
    probabilities: Sequence[torch.Tensor], hits: Sequence[torch.Tensor], edges: Sequence[float] = CALIBRATION_EDGES
) -> HeadCalibration:
    """Per head k, bin the candidates' probabilities[k] (N,) by `edges` and take the share that hit (N,) bool,
    each bin smoothed towards its midpoint (weight 5 candidates), then made non-decreasing (pooling adjacent
    bins that violate it)."""
    rates = []
    boundaries = torch.tensor(edges[1:-1])
    for head_probabilities, head_hits in zip(probabilities, hits, strict=True):
        bins = torch.bucketize(head_probabilities.float(), boundaries, right=True)
        counts = torch.bincount(bins, minlength=len(edges) - 1).double()
        successes = torch.bincount(bins, weights=head_hits.double(), minlength=len(edges) - 1)
        midpoints = (torch.tensor(edges[:-1]) + torch.tensor(edges[1:])).double() / 2
        prior = 5.0
        rates.append(_non_decreasing((successes + prior * midpoints) / (counts + prior), counts + prior))
    return HeadCalibration(tuple(edges), tuple(rates))


def _non_decreasing(values: torch.Tensor, weights: torch.Tensor) -> tuple[float, ...]:
    """Weighted isotonic regression (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values.tolist(), weights.tolist(), strict=True):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            last = blocks.pop()
            total = blocks[-1][1] + last[1]
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + last[0] * last[1]) / total, total, blocks[-1][2] + last[2]]
    return tuple(mean for mean, _, count in blocks for _ in range(count))


def shared_verify_cost(cost: Sequence[float], rows: int) -> list[float]:
    """One row's share of a verification curve when `rows` rows, each with a tree of the same size, are verified
    in one forward: m nodes per row cost the curve's rows * m tokens, shared by the rows (cost[rows * m - 1] /
    rows). The curve ends where rows * m passes its end (at least two entries: extended linearly)."""
    last, slope = len(cost), cost[-1] - cost[-2]
    return [
        (cost[rows * m - 1] if rows * m <= last else cost[-1] + slope * (rows * m - last)) / rows
        for m in range(1, max(2, last // rows) + 1)
    ]


@dataclass(frozen=True)
class DynamicTreePolicy:
    """How a step's dynamic tree is drafted and how big it may grow.

    verify_cost[m - 1]: the cost of verifying m tokens in one base forward, relative to one token (the
    curve `tune-tree` measured, divided by its first entry); its length bounds the tree. overhead: the
    step's drafting and bookkeeping in the same unit. head_call_cost[k]: what one call of head k costs in that
    unit, and rank_accuracy[k][r]: how often head k's r-th candidate is the base's token given a correct path
    (`tune-tree`): with both, `expand_heads` skips a depth not expected to pay for its call (`pays_to_call`);
    without, every depth is called. children: candidates per expanded node; width: nodes expanded per depth;
    min_score: nodes less likely than this are not expanded nor kept (see `floor`)."""

    verify_cost: tuple[float, ...]
    calibration: HeadCalibration = field(default_factory=HeadCalibration.identity)
    children: int = 4
    width: int = 4
    overhead: float = 0.15
    min_score: float = 0.01
    head_call_cost: tuple[float, ...] = ()
    rank_accuracy: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        if len(self.verify_cost) < 2 or self.verify_cost[0] <= 0:
            raise ValueError("A dynamic tree needs the verification cost of at least 1 and 2 tokens (> 0).")
        if self.children < 1 or self.width < 1:
            raise ValueError("A dynamic tree needs children >= 1 and width >= 1.")

    @classmethod
    def from_tuning(
        cls, verify_seconds: Sequence[float], calibration: HeadCalibration | None = None
    ) -> DynamicTreePolicy:
        """From `tune-tree`'s verification seconds for m = 1..M tokens."""
        relative = tuple(seconds / verify_seconds[0] for seconds in verify_seconds)
        return cls(relative, calibration or HeadCalibration.identity())

    @functools.cached_property
    def floor(self) -> float:
        """The smallest score worth a node: adding a node of score s to a tree of expected length tau >= 1 at
        the curve's mean cost per node c' pays only when s > tau c' / (cost + overhead), so below
        c' / (verify_cost[-1] + overhead) no node pays (nor `min_score`): such nodes are neither kept nor
        expanded."""
        per_node = (self.verify_cost[-1] - self.verify_cost[0]) / (len(self.verify_cost) - 1)
        return max(self.min_score, per_node / (self.verify_cost[-1] + self.overhead))

    def for_rows(self, rows: int) -> DynamicTreePolicy:
        """The policy of one of `rows` rows verified together (`shared_verify_cost`)."""
        if rows == 1:
            return self
        return dataclasses.replace(self, verify_cost=tuple(shared_verify_cost(self.verify_cost, rows)))

    def pays_to_call(self, head: int, chosen_scores: Sequence[float], frontier_scores: Sequence[float]) -> bool:
        """Whether calling head `head` on the frontier is expected to pay: with its candidates' expected scores (a
        frontier node's score times the head's rank accuracy, per rank), the best tree must bring more expected
        tokens per unit of time, the call's cost included, than the best tree without them. chosen_scores: the
        scores of the nodes `best` keeps so far (root excluded), in its decreasing order."""
        if head >= min(len(self.head_call_cost), len(self.rank_accuracy)):
            return True
        accuracy = self.rank_accuracy[head][: self.children]
        expected = [score * rate for score in frontier_scores for rate in accuracy]
        with_call = sorted([*chosen_scores, *expected], reverse=True)
        return self.best_rate(with_call, self.head_call_cost[head]) > self.best_rate(chosen_scores)

    def best_rate(self, sorted_scores: Sequence[float], extra_cost: float = 0.0) -> float:
        """Expected tokens per unit of time of the best tree over these nodes (`best_size`), a step costing
        `extra_cost` more."""
        count = self.best_size(sorted_scores, extra_cost)
        return (1.0 + sum(sorted_scores[:count])) / (self.verify_cost[count] + self.overhead + extra_cost)

    def best_size(self, sorted_scores: Sequence[float], extra_cost: float = 0.0) -> int:
        """How many of the nodes (scores sorted in decreasing order) to verify: the count maximising
        (1 + their summed scores) / (verification cost of them and the root + overhead + extra_cost)."""
        fixed = self.overhead + extra_cost
        best_count, best_rate, expected = 0, 1.0 / (self.verify_cost[0] + fixed), 1.0
        for count, score in enumerate(sorted_scores[: len(self.verify_cost) - 1], start=1):
            expected += score
            rate = expected / (self.verify_cost[count] + fixed)
            if rate > best_rate:
                best_count, best_rate = count, rate
        return best_count


class ScoredNodes:
    """A candidate trie below the root (node 0): per node its token, parent, depth, estimated probability of
    being accepted and whether only the context proposed it."""

    def __init__(self, root_token: int) -> None:
        self.tokens, self.parents, self.depths = [root_token], [-1], [0]
        self.scores, self.from_context = [1.0], [False]
        self.child_of: dict[tuple[int, int], int] = {}  # (parent, token) -> node

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, score: float, from_context: bool) -> int:
        """The node for `token` below `parent`, added when new; an existing one keeps the larger score."""
        node = self.child_of.get((parent, token))
        if node is not None:
            self.scores[node] = max(self.scores[node], score)
            self.from_context[node] = self.from_context[node] and from_context
            return node
        node = len(self.tokens)
        self.child_of[(parent, token)] = node
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.scores.append(score)
        self.from_context.append(from_context)
        return node

    def path(self, node: int) -> list[int]:
        """The nodes from the root's child down to `node`."""
        nodes = []
        while node > 0:
            nodes.append(node)
            node = self.parents[node]
        return nodes[::-1]

    def best(self, policy: DynamicTreePolicy) -> list[int]:
        """The nodes to verify, the root first: the most likely ones, as many as pay (`best_size`)."""
        ranked = sorted(range(1, len(self)), key=lambda node: (-self.scores[node], self.depths[node], node))
        ranked = [node for node in ranked if self.scores[node] >= policy.floor]
        return [0, *ranked[: policy.best_size([self.scores[node] for node in ranked])]]

    def tree(self, chosen: list[int], device: torch.device) -> tuple[TreeBuffers, torch.Tensor, torch.Tensor]:
        """Buffers of the chosen nodes (closed under parents, the root first, parents before children), their
        tokens (T,) and which of them only the context proposed (T,) bool, in the buffers' node order."""
        rank_path: dict[int, tuple[int, ...]] = {0: ()}
        child_count: dict[int, int] = {}
        for node in chosen[1:]:
            parent = self.parents[node]
            rank_path[node] = rank_path[parent] + (child_count.get(parent, 0),)
            child_count[parent] = child_count.get(parent, 0) + 1
        return tree_of_rank_paths(
            [rank_path[node] for node in chosen], [self.tokens[node] for node in chosen],
            [self.from_context[node] for node in chosen], device,
        )  # fmt: skip


@torch.no_grad()
def expand_heads(
    nodes: ScoredNodes,
    heads: DraftHeads,
    policy: DynamicTreePolicy,
    context: torch.Tensor,
    embed_tokens: nn.Embedding,
    max_depth: int | None,
) -> None:
    """Add the heads' candidates to `nodes` (holding the root and maybe context candidates), depth by depth
    down to `max_depth` (None: as deep as the heads go). Only nodes that `best` would keep so far are
    expanded: the others' children would rank below every kept node. A depth whose candidates are not expected
    to pay for the head call (`DynamicTreePolicy.pays_to_call`) ends the expansion.

    context: (d,) the heads' context vector at the last verified position."""
    frontier, floor = [0], policy.floor
    chosen_scores = [nodes.scores[node] for node in nodes.best(policy)[1:]]
    for depth in range(1, min(max_depth if max_depth is not None else heads.num_heads, heads.num_heads) + 1):
        if not policy.pays_to_call(depth - 1, chosen_scores, [nodes.scores[node] for node in frontier]):
            return
        if heads.sequential:
            path_tokens = torch.tensor(
                [[nodes.tokens[n] for n in (0, *nodes.path(node))] for node in frontier], device=context.device
            )  # (F, depth): the tokens from the root down to each frontier node
            logits = heads(depth - 1, context.expand(len(frontier), -1), embed_tokens(path_tokens))  # (F, V or K)
        else:
            logits = heads(depth - 1, context[None], None).expand(len(frontier), -1)  # (F, V or K)
        top = logits.float().softmax(dim=-1).topk(policy.children, dim=-1)
        scores = policy.calibration(depth - 1, top.values)  # (F, children)
        candidates = top.indices if heads.draft_token_ids is None else heads.draft_token_ids[top.indices]
        added = []
        for parent, parent_scores, parent_tokens in zip(frontier, scores.tolist(), candidates.tolist(), strict=True):
            for score, token in zip(parent_scores, parent_tokens, strict=True):
                score *= nodes.scores[parent]
                if score >= floor:
                    added.append(nodes.add(parent, token, score, from_context=False))
        chosen_scores = [nodes.scores[node] for node in nodes.best(policy)[1:]]
        kept = min(chosen_scores, default=float("inf"))  # a node below it ranks after every kept one (so do its
        # children: scores never grow along a path)
        frontier = sorted((n for n in added if nodes.scores[n] >= kept), key=lambda n: -nodes.scores[n])[: policy.width]
        if not frontier:
            return


def add_context_paths(
    nodes: ScoredNodes, paths: Sequence[Sequence[int]], scores: Sequence[Sequence[float]], max_depth: int | None
) -> list[list[int]]:
    """Add token paths below the root with their tokens' estimated probabilities of acceptance (each path's
    scores non-increasing), cut at `max_depth` (None: not cut). Returns each path's nodes."""
    path_nodes = []
    for path, path_scores in zip(paths, scores, strict=True):
        node, added = 0, []
        for token, score in zip(path[:max_depth], path_scores, strict=False):
            node = nodes.add(node, token, score, from_context=True)
            added.append(node)
        path_nodes.append(added)
    return path_nodes
