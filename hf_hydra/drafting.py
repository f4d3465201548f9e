"""Heads -> candidate tree: fill every node of a `TreeBuffers` with a drafted token.

Medusa heads are independent: head k-1 is called once and its top-k fills all nodes of depth k.
Hydra heads are sequential: depth by depth, one batched head call over the frontier (the parents of
that depth's nodes), each path's input growing by the embedding of the token just chosen for it.

`sample_chain` is the sampling drafter of the chain candidate generator (transformers' assisted loop):
each draft is sampled from its head's processed distribution, which is returned with it as the proposal
transformers' speculative sampling needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.generation import LogitsProcessorList

from .acceptance import sample_token
from .heads import DraftHeads
from .tree import TreeBuffers, TreeLevel


@dataclass(frozen=True)
class DraftTree:
    """Tokens of one candidate tree in node order; `tokens[0]` is the root (the base's own next token).

    The tokens are all that acceptance needs, also for lossless sampling: a node's children are the top-k
    of its head, a deterministic function of the prefix, so as a proposal each child is a point mass on
    its token (see `hf_hydra.acceptance`), whatever the heads' probabilities were.
    """

    tokens: torch.Tensor  # (T,) long


@dataclass(frozen=True)
class DraftChain:
    """A sampled chain of drafts and the distributions they were sampled from (the proposals q)."""

    tokens: torch.Tensor  # (c,) long, the drafts after the root
    logits: torch.Tensor  # (c, V) float32 processed head logits over the base vocabulary; q_i = softmax(logits[i])


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


@torch.no_grad()
def sample_chain(
    heads: DraftHeads,
    length: int,
    context: torch.Tensor,
    sequence: torch.Tensor,
    embed_tokens: nn.Embedding,
    logits_processor: LogitsProcessorList,
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> DraftChain:
    """Sample `length` drafts after `sequence` (1, S), which ends with the root, one head after the other:
    draft i ~ q_i = softmax(logits_processor(sequence + drafts so far, head i's logits)), the processors
    applied as plain sampling applies them to the base (so q is warped like the target p).

    context: (d,) the heads' context vector at the last verified position; vocab_size: the base's V (a
    head with a reduced draft vocabulary gets -inf logits outside it).
    """
    drafted = sequence
    path_embeds = embed_tokens(sequence[0, -1:])  # (1, d): the root
    tokens, all_logits = [], []
    for head_index in range(length):
        head_logits = heads(head_index, context, path_embeds if heads.sequential else None).float()  # (V or K,)
        if heads.draft_token_ids is not None:
            full = head_logits.new_full((vocab_size,), -torch.inf)
            head_logits = full.scatter(0, heads.draft_token_ids, head_logits)  # (V,)
        scores = logits_processor(drafted, head_logits[None])[0] if len(logits_processor) else head_logits
        token = sample_token(scores.softmax(dim=-1), generator)[None]  # (1,)
        tokens.append(token[0])
        all_logits.append(scores)
        drafted = torch.cat([drafted, token[None]], dim=1)
        path_embeds = torch.cat([path_embeds, embed_tokens(token)], dim=0)  # (i + 2, d)
    return DraftChain(tokens=torch.stack(tokens), logits=torch.stack(all_logits))
