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
from .growing_cache import GrowingLayer
from .tree import TreeBuffers, batched_tree_attention_mask, tree_attention_mask


@dataclass(frozen=True)
class Verification:
    """The base model's view of every tree node."""

    logits: torch.Tensor  # (T, V) next-token logits after each node
    hidden: torch.Tensor  # (T, d) post-norm last hidden state of each node


def check_cache_supported(cache: DynamicCache) -> None:
    """Tree verification rewrites cache entries in place: only plain full-attention layers allow it."""
    plain = (DynamicLayer, GrowingLayer)
    unsupported = {type(layer).__name__ for layer in cache.layers if type(layer) not in plain}
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


# ------------------------------------------------------------------------------------------------------
# A batch of rows, each with its own tree


@torch.no_grad()
def verify_tree_rows(
    base: PreTrainedModel,
    cache: DynamicCache,
    tokens: list[torch.Tensor],
    trees: list[TreeBuffers],
    visible: torch.Tensor,
    positions: list[int],
) -> Verification:
    """Run the base once over every row's tree, padded to the largest T; the cache grows by T entries per row.

    tokens[b]: (T_b,) row b's tree in node order; visible: (B, S) bool, the cache entries each row attends
    (`batched_tree_attention_mask`); positions[b]: the position of row b's root. -> logits (B, T, V) and hidden
    (B, T, d); row b's entries past T_b belong to padding nodes and mean nothing."""
    size = max(tree.num_tokens for tree in trees)
    ids = torch.stack([torch.cat([t, t[:1].expand(size - t.shape[0])]) for t in tokens])  # (B, T): pads repeat the root
    position_ids = torch.stack([
        torch.cat([tree.depths, tree.depths.new_zeros(size - tree.num_tokens)]) + position
        for tree, position in zip(trees, positions, strict=True)
    ])  # (B, T)  # fmt: skip
    out = base(
        input_ids=ids,
        attention_mask=batched_tree_attention_mask(trees, visible, base.dtype),
        position_ids=position_ids,
        **cache_argument(cache),
        use_cache=True,
        output_hidden_states=True,
    )
    return Verification(logits=out.logits, hidden=out.hidden_states[-1])


def keep_accepted_rows(
    cache: DynamicCache, past: int, accepted_nodes: list[torch.Tensor], visible: torch.Tensor
) -> torch.Tensor:
    """Compact the cache after `verify_tree_rows`: row b's accepted nodes (a_b,) move to the front of the step's
    region, which keeps max_b a_b entries; a row's entries past its own a_b become holes. Copies only the region
    (never a row's whole cache). visible: (B, past) -> (B, past + max_b a_b), holes not visible."""
    kept = max(nodes.shape[0] for nodes in accepted_nodes)
    rows = torch.stack([torch.cat([n, n[-1:].expand(kept - n.shape[0])]) for n in accepted_nodes])  # (B, kept)
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name)  # (B, H, past + T, d)
            index = (past + rows)[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
            tensor[:, :, past : past + kept] = tensor.gather(2, index)
    cache.crop(-(cache.get_seq_length() - past - kept))
    lengths = torch.tensor([nodes.shape[0] for nodes in accepted_nodes], device=visible.device)  # (B,)
    new = torch.arange(kept, device=visible.device)[None] < lengths[:, None]  # (B, kept)
    return torch.cat([visible, new], dim=1)
