"""Verify a candidate tree with ONE base forward on transformers' native KV cache, then keep only the
accepted entries of the cache. No forked modeling code: a 4D additive mask and explicit position ids
are all the base model needs (transformers.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from . import support
from .cache_name import cache_argument
from .tree import TreeBuffers, tree_attention_mask


@dataclass(frozen=True)
class Verification:
    """The base model's view of every tree node."""

    logits: torch.Tensor  # (T, V) next-token logits after each node
    hidden: torch.Tensor  # (T, d) post-norm last hidden state of each node


def check_cache_supported(cache: DynamicCache) -> None:
    """Tree verification rewrites cache entries in place: only plain full-attention layers allow it."""
    unsupported = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if unsupported:
        raise support.refuse("cache_layers", support.TREE, f"this model's cache has {sorted(unsupported)}")


@torch.no_grad()
def verify_tree(
    base: PreTrainedModel,
    cache: DynamicCache,
    tokens: torch.Tensor,
    tree: TreeBuffers,
    prompt_visible: torch.Tensor | None = None,
    position_offset: int = 0,
) -> Verification:
    """Run the base over all T tree tokens at once; the cache grows by T entries (see `keep_accepted`).

    tokens: (T,) the drafted tree in node order. Node a sits at position `past + position_offset + depth[a]`
    and attends to the verified prefix (but the prompt positions `prompt_visible` (L,) masks) and its
    ancestors only, as one-token decoding would place and mask it.
    """
    past = cache.get_seq_length()
    mask = tree_attention_mask(tree, past, base.dtype, prompt_visible)  # (1, 1, T, past + T)
    position_ids = (past + position_offset + tree.depths)[None]  # (1, T)
    out = base(
        input_ids=tokens[None],
        attention_mask=mask,
        position_ids=position_ids,
        **cache_argument(cache),
        use_cache=True,
        output_hidden_states=True,
    )
    return Verification(logits=out.logits[0], hidden=out.hidden_states[-1][0])


def keep_accepted(cache: DynamicCache, past: int, accepted_nodes: torch.Tensor, num_tree_tokens: int) -> None:
    """Compact the cache after a tree forward: keep the entries of `accepted_nodes` (node indices, in
    path order) right after the `past` verified ones and drop the rest of the tree. Leading nodes already in
    place (node i at row past + i: the root, often its first child) are not copied."""
    nodes = accepted_nodes.tolist()
    in_place = next((i for i, node in enumerate(nodes) if node != i), len(nodes))
    if in_place < len(nodes):
        moved = past + accepted_nodes[in_place:]  # (m,) cache rows to move down
        start = past + in_place
        for layer in cache.layers:
            # Advanced indexing copies the rows first, so overlapping source and target is safe.
            layer.keys[..., start : start + moved.shape[0], :] = layer.keys[..., moved, :]
            layer.values[..., start : start + moved.shape[0], :] = layer.values[..., moved, :]
    cache.crop(-(num_tree_tokens - len(nodes)))
