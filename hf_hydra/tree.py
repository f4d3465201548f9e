"""Draft trees as pure data: a tree spec (paths of top-k ranks) -> the tensors decoding needs.

A tree is a list of paths of top-k ranks: `[0, 2]` is the 3rd most likely token of head 1 under the
most likely token of head 0. The root (the base model's own next token) is implicit and is node 0;
the other nodes are numbered 1..N in `(depth, path)` order, so the nodes of one depth are contiguous.
Nothing here imports a model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Medusa's reference tree (FasterDecoding/Medusa `mc_sim_7b_63`), 63 nodes at depths 10/28/23/2.
MC_SIM_7B_63: tuple[tuple[int, ...], ...] = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0),
    (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0),
    (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5),
    (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9),
    (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5),
    (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
)  # fmt: skip

# A small tree for CPUs, where verifying 64 tokens costs ~3.4x a one-token step (see assets.md):
# 10 nodes, depth 4. Replaced per model by a measured tree once heads are tuned.
CPU_SMALL_11: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 0, 0, 0),
)

NAMED_TREES: dict[str, tuple[tuple[int, ...], ...]] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    "cpu_small_11": CPU_SMALL_11,
}
DEFAULT_TREE_NAME = "cpu_small_11"
# Not a fixed tree: per step the most likely candidates, as many as pay (`hf_hydra.dynamic_tree`).
DYNAMIC_TREE = "dynamic"

TreeSpec = str | Sequence[Sequence[int]]


def static_default(default: TreeSpec | None, static: TreeSpec) -> TreeSpec:
    """The static tree a default tree stands for: `default` itself, or the heads' static tree `static`
    (`HydraConfig.tree`) where the default is dynamic or unset."""
    return static if not default or default == DYNAMIC_TREE else default


def chain(depth: int) -> tuple[tuple[int, ...], ...]:
    """The single path of top-1 tokens `[[0], [0, 0], ...]` of the given depth."""
    return tuple((0,) * d for d in range(1, depth + 1))


def resolve_tree(tree: TreeSpec, num_heads: int) -> tuple[tuple[int, ...], ...]:
    """Turn a tree name (`"mc_sim_7b_63"`, `"cpu_small_11"`, `"chain"`, `"chain-3"`) or a list of rank
    paths into sorted, validated rank paths. Raises `ValueError` for unknown names, missing parents,
    duplicates, negative ranks and trees deeper than `num_heads`."""
    if isinstance(tree, str):
        paths = _named_tree(tree, num_heads)
    else:
        paths = tuple(tuple(int(r) for r in path) for path in tree)
    _validate_paths(paths, num_heads)
    return tuple(sorted(paths, key=lambda p: (len(p), p)))


def _named_tree(name: str, num_heads: int) -> tuple[tuple[int, ...], ...]:
    if name == "chain":
        return chain(num_heads)
    if name.startswith("chain-") and name[len("chain-"):].isdigit():
        return chain(int(name[len("chain-"):]))
    if name not in NAMED_TREES:
        raise ValueError(
            f"Unknown tree name {name!r}. Use one of {sorted(NAMED_TREES)}, 'chain', 'chain-<depth>', "
            "or pass the tree as a list of rank paths such as [[0], [1], [0, 0]]."
        )
    return NAMED_TREES[name]


def _validate_paths(paths: tuple[tuple[int, ...], ...], num_heads: int) -> None:
    if not paths:
        raise ValueError("A draft tree needs at least one node, e.g. [[0]].")
    seen = set(paths)
    if len(seen) != len(paths):
        raise ValueError("The draft tree lists the same path twice; give each path once.")
    for path in paths:
        if not path or min(path) < 0:
            raise ValueError(f"Tree path {list(path)} must be a non-empty list of ranks >= 0.")
        if len(path) > num_heads:
            raise ValueError(
                f"Tree path {list(path)} has depth {len(path)} but there are only {num_heads} draft heads "
                f"(head i drafts depth i+1). Use a tree of depth <= {num_heads} or train more heads."
            )
        if len(path) > 1 and path[:-1] not in seen:
            raise ValueError(f"Tree path {list(path)} has no parent {list(path[:-1])} in the tree; add it.")


@dataclass(frozen=True)
class TreeLevel:
    """The nodes of one depth k >= 1 and how head k-1 drafts them.

    `start:end` are their node indices. `parents` are the distinct parent nodes (the frontier at depth
    k-1, in node order); `parent_rows[j]` is the row in `parents` of node `start + j`; `ranks[j]` is its
    top-k rank among its siblings; `topk` is the largest rank + 1 (how many candidates to draw).
    """

    depth: int
    start: int
    end: int
    parents: torch.Tensor  # (F,) long
    parent_rows: torch.Tensor  # (end - start,) long
    ranks: torch.Tensor  # (end - start,) long
    topk: int


@dataclass(frozen=True)
class TreeBuffers:
    """Everything decoding needs to know about one tree, as tensors. `T = N + 1` counts the root.

    `attention_mask[a, b]` is True when node a may attend to node b (b is a or an ancestor of a).
    `ancestors[a, :depth[a] + 1]` are the nodes from the root down to a (padded with 0 beyond).
    `leaf_paths[p, :leaf_path_lengths[p]]` are the nodes from the root to the p-th leaf (padded with 0).
    """

    paths: tuple[tuple[int, ...], ...]
    depths: torch.Tensor  # (T,) long, root = 0
    parents: torch.Tensor  # (T,) long, root = -1
    attention_mask: torch.Tensor  # (T, T) bool
    ancestors: torch.Tensor  # (T, D + 1) long
    leaf_paths: torch.Tensor  # (P, D + 1) long
    leaf_path_lengths: torch.Tensor  # (P,) long, number of nodes incl. the root
    levels: tuple[TreeLevel, ...]  # one per depth 1..D

    @property
    def num_tokens(self) -> int:
        """Tokens verified per step: the root plus every drafted node."""
        return int(self.depths.shape[0])

    @property
    def max_depth(self) -> int:
        return len(self.levels)

    def to(self, device: torch.device | str) -> TreeBuffers:
        moved = {
            name: getattr(self, name).to(device)
            for name in ("depths", "parents", "attention_mask", "ancestors", "leaf_paths", "leaf_path_lengths")
        }
        levels = tuple(
            TreeLevel(
                lvl.depth, lvl.start, lvl.end, lvl.parents.to(device), lvl.parent_rows.to(device),
                lvl.ranks.to(device), lvl.topk,
            )
            for lvl in self.levels
        )
        return TreeBuffers(paths=self.paths, levels=levels, **moved)

    def truncated(self, depth: int) -> TreeBuffers:
        """The subtree of the nodes at depth <= `depth` (0: the root alone), on the same device. Nodes are in
        depth order, so they are the first n nodes and keep their indices."""
        if depth >= self.max_depth:
            return self
        n = int((self.depths <= depth).sum())
        parents = self.parents[:n]
        has_child = torch.zeros(n, dtype=torch.bool, device=parents.device)
        has_child[parents[1:]] = True
        leaves = (~has_child).nonzero()[:, 0]  # (P,)
        ancestors = self.ancestors[:n, : depth + 1]  # (n, depth + 1)
        return TreeBuffers(
            paths=self.paths[: n - 1],
            depths=self.depths[:n],
            parents=parents,
            attention_mask=self.attention_mask[:n, :n],
            ancestors=ancestors,
            leaf_paths=ancestors[leaves],
            leaf_path_lengths=self.depths[leaves] + 1,
            levels=self.levels[:depth],
        )


def build_tree_buffers(tree: TreeSpec, num_heads: int) -> TreeBuffers:
    """Tree spec -> `TreeBuffers` (on the CPU; call `.to(device)`)."""
    paths = resolve_tree(tree, num_heads)
    node_of = {(): 0} | {path: i + 1 for i, path in enumerate(paths)}
    num_tokens = len(paths) + 1
    max_depth = max(len(p) for p in paths)

    depths = torch.tensor([0] + [len(p) for p in paths])
    parents = torch.tensor([-1] + [node_of[p[:-1]] for p in paths])
    ancestors = torch.zeros(num_tokens, max_depth + 1, dtype=torch.long)
    attention_mask = torch.zeros(num_tokens, num_tokens, dtype=torch.bool)
    for path, node in node_of.items():
        chain_of_nodes = [node_of[path[:k]] for k in range(len(path) + 1)]
        ancestors[node, : len(chain_of_nodes)] = torch.tensor(chain_of_nodes)
        attention_mask[node, chain_of_nodes] = True

    has_child = {p[:-1] for p in paths}
    leaves = [p for p in ((),) + paths if p not in has_child]
    leaf_paths = torch.stack([ancestors[node_of[p]] for p in leaves])
    leaf_path_lengths = torch.tensor([len(p) + 1 for p in leaves])

    return TreeBuffers(
        paths=paths,
        depths=depths,
        parents=parents,
        attention_mask=attention_mask,
        ancestors=ancestors,
        leaf_paths=leaf_paths,
        leaf_path_lengths=leaf_path_lengths,
        levels=tuple(_tree_level(paths, node_of, depth) for depth in range(1, max_depth + 1)),
    )


def _tree_level(paths: tuple[tuple[int, ...], ...], node_of: dict, depth: int) -> TreeLevel:
    level_paths = [p for p in paths if len(p) == depth]
    start = node_of[level_paths[0]]
    parent_nodes = sorted({node_of[p[:-1]] for p in level_paths})
    row_of = {node: row for row, node in enumerate(parent_nodes)}
    return TreeLevel(
        depth=depth,
        start=start,
        end=start + len(level_paths),
        parents=torch.tensor(parent_nodes),
        parent_rows=torch.tensor([row_of[node_of[p[:-1]]] for p in level_paths]),
        ranks=torch.tensor([p[-1] for p in level_paths]),
        topk=max(p[-1] for p in level_paths) + 1,
    )


def merge_token_paths(
    tree: TreeBuffers, tokens: torch.Tensor, extra: Sequence[Sequence[int]]
) -> tuple[TreeBuffers, torch.Tensor, torch.Tensor]:
    """One tree from a drafted tree and more token paths below its root, merged by prefix (one node per
    distinct token path): the heads' candidates and the context's, verified in one forward.

    tree, tokens (T,): the drafted tree; extra: token paths to follow the root with. Returns the merged
    buffers, their tokens (T',) and which nodes only `extra` proposed ((T',) bool). A node's children are
    distinct tokens, the tree's own in their rank order first."""
    token_list, parents = tokens.tolist(), tree.parents.tolist()
    trie = _TokenTrie(token_list[0])
    for node in range(1, len(token_list)):
        trie.child(parents[node], token_list[node])
    for path in extra:
        node = 0
        for token in path:
            node = trie.child(node, token)
    from_extra = [node >= tree.num_tokens for node in range(len(trie.tokens))]
    return tree_of_rank_paths(trie.rank_paths, trie.tokens, from_extra, tokens.device)


def tree_of_rank_paths(
    rank_paths: Sequence[tuple[int, ...]], tokens: Sequence[int], flags: Sequence[bool], device: torch.device
) -> tuple[TreeBuffers, torch.Tensor, torch.Tensor]:
    """Buffers of a trie's nodes given by their rank paths (the root's is ()), with their tokens (T,) long and a
    flag per node (T,) bool, all in the buffers' node order `(depth, path)`."""
    order = sorted(range(len(rank_paths)), key=lambda node: (len(rank_paths[node]), rank_paths[node]))
    buffers = cached_tree_buffers(tuple(rank_paths[node] for node in order[1:]), str(device))
    ordered_tokens = torch.tensor([tokens[node] for node in order], device=device)
    ordered_flags = torch.tensor([flags[node] for node in order], dtype=torch.bool, device=device)
    return buffers, ordered_tokens, ordered_flags


class _TokenTrie:
    """Nodes in insertion order: each one's token, and its path of child ranks (a tree spec path)."""

    def __init__(self, root_token: int) -> None:
        self.tokens = [root_token]
        self.rank_paths: list[tuple[int, ...]] = [()]
        self.children: list[dict[int, int]] = [{}]  # per node: token -> child node, ranks in insertion order

    def child(self, parent: int, token: int) -> int:
        """The node for `token` below `parent`, added when new."""
        existing = self.children[parent].get(token)
        if existing is not None:
            return existing
        node = len(self.tokens)
        self.tokens.append(token)
        self.rank_paths.append(self.rank_paths[parent] + (len(self.children[parent]),))
        self.children[parent][token] = node
        self.children.append({})
        return node


@functools.lru_cache(maxsize=1024)
def cached_tree_buffers(paths: tuple[tuple[int, ...], ...], device: str) -> TreeBuffers:
    """Buffers of sorted rank paths on `device`, built once per shape: merged and dynamic trees repeat their
    shapes from step to step."""
    return build_tree_buffers(paths, max(len(p) for p in paths)).to(device) if paths else root_only(device)


def root_only(device: str | torch.device = "cpu") -> TreeBuffers:
    """The tree of the root alone: a plain one-token step."""
    return build_tree_buffers(((0,),), 1).truncated(0).to(device)


def causal_mask(new: int, past: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive float mask (1, 1, new, past + new): every new token sees the past and earlier new ones."""
    allowed = torch.ones(new, past + new, dtype=torch.bool, device=device).tril(diagonal=past)
    return additive_mask(allowed, dtype)[None, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean visibility -> 0 / finfo.min float mask (a boolean mask is silently wrong in eager attention)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def tree_attention_mask(
    tree: TreeBuffers, past: int, dtype: torch.dtype, prompt_visible: torch.Tensor | None = None
) -> torch.Tensor:
    """Additive float mask (1, 1, T, past + T) for verifying the tree after `past` cached tokens:
    each node sees the verified prefix, the root and its own ancestors. prompt_visible: (L,) bool, L <= past,
    the prompt positions that are attended (None: all)."""
    seen = torch.ones(tree.num_tokens, past, dtype=torch.bool, device=tree.attention_mask.device)  # (T, past)
    if prompt_visible is not None:
        seen[:, : prompt_visible.shape[0]] = prompt_visible
    allowed = torch.cat([seen, tree.attention_mask], dim=1)  # (T, past + T)
    return additive_mask(allowed, dtype)[None, None]


def batched_tree_attention_mask(
    trees: Sequence[TreeBuffers], visible: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Additive float mask (B, 1, T, S + T) for verifying row b's tree after the S cache entries of a batch, T the
    largest tree: row b's nodes see its visible entries (`visible`: (B, S) bool; padding and holes are not) and
    their own ancestors; the nodes padding a smaller tree to T see only themselves (a query must see something)."""
    rows, past = visible.shape
    size = max(tree.num_tokens for tree in trees)
    allowed = torch.zeros(rows, size, past + size, dtype=torch.bool, device=visible.device)
    allowed[:, :, :past] = visible[:, None, :]
    allowed[:, :, past:] = torch.eye(size, dtype=torch.bool, device=visible.device)
    for row, tree in enumerate(trees):
        nodes = tree.num_tokens
        allowed[row, :nodes, past : past + nodes] = tree.attention_mask
        allowed[row, nodes:, :past] = False
    return additive_mask(allowed, dtype)[:, None]


# --------------------------------------------------------------------------------------------------
# Tree search: the best tree for measured head accuracies and a measured latency profile.


@dataclass(frozen=True)
class TreeChoice:
    """A searched tree and the figures it was chosen by."""

    paths: tuple[tuple[int, ...], ...]
    expected_tau: float  # 1 + expected number of accepted drafts per step
    expected_tokens_per_second: float  # expected_tau / (verify seconds of its size + drafting seconds)


def path_probability(path: Sequence[int], rank_accuracy: Sequence[Sequence[float]]) -> float:
    """P(every draft on `path` is accepted) = prod_k rank_accuracy[k][path[k]], where rank_accuracy[k][r]
    is the measured probability that head k's rank-r candidate is the base's token (given a correct path)."""
    probability = 1.0
    for depth, rank in enumerate(path):
        probability *= rank_accuracy[depth][rank] if rank < len(rank_accuracy[depth]) else 0.0
    return probability


def expected_tau(paths: Sequence[Sequence[int]], rank_accuracy: Sequence[Sequence[float]]) -> float:
    """Expected tokens per verification step: 1 (the bonus) + sum over nodes of P(node accepted).

    Siblings are mutually exclusive (one token is right), so the accepted path's length is the sum of
    the acceptance indicators of all nodes, and tau = 1 + sum_nodes P(node accepted)."""
    return 1.0 + sum(path_probability(p, rank_accuracy) for p in paths)


def greedy_tree(rank_accuracy: Sequence[Sequence[float]], num_nodes: int) -> tuple[tuple[int, ...], ...]:
    """The `num_nodes`-node tree maximising `expected_tau`, built greedily as in the Medusa paper: add the
    frontier node (a child of the tree) with the largest acceptance probability, `num_nodes` times.

    A child's probability never exceeds its parent's, so the greedy set is the top `num_nodes` paths by
    probability among those whose parents are in the tree: optimal for this additive objective. The depth
    is at most `len(rank_accuracy)` (one head per depth)."""
    chosen: list[tuple[int, ...]] = []
    frontier = {(rank,) for rank in range(len(rank_accuracy[0]))} if rank_accuracy else set()
    while frontier and len(chosen) < num_nodes:
        best = max(frontier, key=lambda p: (path_probability(p, rank_accuracy), -len(p), [-r for r in p]))
        frontier.remove(best)
        chosen.append(best)
        if len(best) < len(rank_accuracy):
            frontier |= {best + (rank,) for rank in range(len(rank_accuracy[len(best)]))}
    return tuple(sorted(chosen, key=lambda p: (len(p), p)))


def choose_tree(
    rank_accuracy: Sequence[Sequence[float]],
    verify_seconds: Sequence[float],
    draft_seconds: Callable[[tuple[tuple[int, ...], ...]], float] = lambda paths: 0.0,
) -> TreeChoice:
    """The greedy tree whose size maximises expected tokens per second on this machine.

    verify_seconds[m - 1]: measured seconds of one base forward over m tokens (m = nodes + 1, the root);
    draft_seconds(paths): estimated drafting time of a tree."""
    best: TreeChoice | None = None
    for num_nodes in range(1, len(verify_seconds)):
        paths = greedy_tree(rank_accuracy, num_nodes)
        if len(paths) < num_nodes:
            break  # no more nodes to add
        tau = expected_tau(paths, rank_accuracy)
        speed = tau / (verify_seconds[num_nodes] + draft_seconds(paths))
        if best is None or speed > best.expected_tokens_per_second:
            best = TreeChoice(paths=paths, expected_tau=tau, expected_tokens_per_second=speed)
    if best is None:
        raise ValueError("choose_tree needs latencies for at least 2 verified tokens and non-empty accuracies.")
    return best
