"""Heads -> candidate tree: fill every node of a `TreeBuffers` with a drafted token.

Medusa heads are independent: head k-1 is called once and its top-k fills all nodes of depth k.
Hydra heads are sequential: depth by depth, one batched head call over the frontier (the parents of
that depth's nodes), each path's input growing by the embedding of the token just chosen for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .heads import DraftHeads
from .tree import TreeBuffers, TreeLevel


@dataclass(frozen=True)
class DraftTree:
    """Tokens of one candidate tree in node order; `tokens[0]` is the root (the base's own next token)."""

    tokens: torch.Tensor  # (T,) long


@torch.no_grad()
def draft_tree(
    heads: DraftHeads,
    tree: TreeBuffers,
    context: torch.Tensor,
    root_token: torch.Tensor,
    embed_tokens: nn.Embedding,
) -> DraftTree:
    """Draft every node of `tree`.

    context: (d,) the heads' context vector at the last verified position; root_token: () long;
    embed_tokens: the base model's (frozen) input embedding.
    """
    tokens = torch.empty(tree.num_tokens, dtype=torch.long, device=context.device)
    tokens[0] = root_token
    if not heads.sequential:
        for level in tree.levels:
            candidates = _top_tokens(heads, level, context[None], None)  # (1, topk)
            tokens[level.start : level.end] = candidates[0, level.ranks]
        return DraftTree(tokens)

    node_embeds = torch.empty(tree.num_tokens, context.shape[-1], dtype=context.dtype, device=context.device)
    node_embeds[0] = embed_tokens(root_token)
    for level in tree.levels:
        path_nodes = tree.ancestors[level.parents, : level.depth]  # (F, k): root .. parent
        path_embeds = node_embeds[path_nodes]  # (F, k, d)
        frontier_context = context.expand(level.parents.shape[0], -1)  # (F, d)
        candidates = _top_tokens(heads, level, frontier_context, path_embeds)  # (F, topk)
        level_tokens = candidates[level.parent_rows, level.ranks]  # (n_k,)
        tokens[level.start : level.end] = level_tokens
        node_embeds[level.start : level.end] = embed_tokens(level_tokens)
    return DraftTree(tokens)


def _top_tokens(
    heads: DraftHeads, level: TreeLevel, context: torch.Tensor, path_embeds: torch.Tensor | None
) -> torch.Tensor:
    """Base-vocabulary ids of the `level.topk` most likely tokens of head `level.depth - 1`: (F, topk)."""
    logits = heads(level.depth - 1, context, path_embeds)  # (F, V or K)
    top = logits.topk(level.topk, dim=-1).indices  # (F, topk) rows of the draft vocabulary
    if heads.draft_token_ids is not None:
        top = heads.draft_token_ids[top]
    return top
