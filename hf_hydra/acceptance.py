"""Acceptance rules: which path of a verified tree to keep, and the bonus token after it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import TreeBuffers


@dataclass(frozen=True)
class Acceptance:
    """The accepted path and the token the base model itself chose after it."""

    nodes: torch.Tensor  # (a,) node indices from the root down, a = 1 + number of accepted drafts
    bonus_token: torch.Tensor  # () long, the base's next token after the last accepted node


def greedy_accept(tokens: torch.Tensor, logits: torch.Tensor, tree: TreeBuffers) -> Acceptance:
    """Longest path whose drafts all equal the base model's argmax.

    With y_a = argmax logits[a] the base's greedy choice after node a, and a path r = n_0 .. n_D
    (n_0 the root), the accepted length is
        L(r) = max { j : tokens[n_i] == y_{n_{i-1}} for all 1 <= i <= j },
    the kept path is argmax_r L(r) (first on ties), and the bonus token is y at its last node. Every
    kept token is what greedy decoding would have produced, so the output is unchanged.

    tokens: (T,) drafted tree; logits: (T, V) the base's logits at each node.
    """
    predicted = logits.argmax(dim=-1)  # (T,)
    paths = tree.leaf_paths  # (P, D + 1)
    depth_index = torch.arange(paths.shape[1] - 1, device=paths.device)  # (D,)
    in_path = depth_index[None] < (tree.leaf_path_lengths - 1)[:, None]  # (P, D)
    matches = (tokens[paths[:, 1:]] == predicted[paths[:, :-1]]) & in_path  # (P, D)
    accepted = matches.long().cumprod(dim=1).sum(dim=1)  # (P,)
    best = int(accepted.argmax())
    nodes = paths[best, : int(accepted[best]) + 1]
    return Acceptance(nodes=nodes, bonus_token=predicted[nodes[-1]])
