"""Grouped-query attention for tree verification, without copying the KV cache.

transformers' `sdpa` attention repeats every key/value head for each of its query heads (`repeat_kv`: a copy of
the whole cache, in every layer, at every step) whenever a mask is given and more than one query token comes in,
which is exactly the tree verification forward (and the Hydra++ prefix layer's). Packing the query heads that share
a KV head into the query length instead, (B, H, q, d) -> (B, H_kv, G * q, d) with the mask repeated G times along
the queries, computes the same attention on the cached KV heads as they are, with bit-identical logits; the
saving grows with the cache's length.

`PACKED_GQA_ATTENTION` is registered with transformers' `AttentionInterface`, and sdpa's mask builder with its
`AttentionMaskInterface` (so the masks transformers makes are sdpa's); every call that is not such a forward (one
query token, no mask, no GQA, per-head masks, dropout, attention extras) goes to transformers' own `sdpa`
function unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ._compat import attn_implementation

PACKED_GQA_ATTENTION = "sdpa_packed_gqa"
_SDPA = "sdpa"
# keyword arguments that leave sdpa's attention plain (a sliding window is already in the mask under sdpa); any
# other one (softcap, position bias, sinks, a paged cache, ...) goes to transformers' function
_PLAIN_ATTENTION_KWARGS = frozenset(
    {"position_ids", "cache_position", "use_cache", "output_hidden_states", "sliding_window"}
)


def packed_gqa_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (B, H, q, d), key and value (B, H_kv, k, d), attention_mask (B, 1, q, k) -> (B, q, H, d), like
    transformers' `sdpa_attention_forward`, which serves every call this packing does not apply to."""
    groups = getattr(module, "num_key_value_groups", 1)
    if not _packable(groups, query, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, q_length, dim = query.shape
    packed_query = query.reshape(batch, heads // groups, groups * q_length, dim)  # (B, H_kv, G * q, d)
    packed_mask = attention_mask.repeat(1, 1, groups, 1)  # (B, 1, G * q, k)
    out = torch.nn.functional.scaled_dot_product_attention(
        packed_query, key, value, attn_mask=packed_mask, scale=scaling
    )  # (B, H_kv, G * q, d_v)
    out = out.reshape(batch, heads, q_length, value.shape[-1]).transpose(1, 2).contiguous()  # (B, q, H, d_v)
    return out, None


def _packable(
    groups: int, query: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float, extras: dict
) -> bool:
    """Several query tokens, grouped KV heads, one mask for all heads, nothing but plain attention asked for."""
    shaped = (
        groups > 1
        and query.shape[2] > 1
        and attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
    )
    if not shaped or dropout != 0.0:  # most calls (one-token decoding steps) stop here, before the kwargs scan
        return False
    asked = (name for name, value in extras.items() if value is not None and value is not False)
    return all(name in _PLAIN_ATTENTION_KWARGS for name in asked)


def use_packed_gqa_attention(model: PreTrainedModel) -> bool:
    """Switch a model that runs transformers' `sdpa` attention to `PACKED_GQA_ATTENTION` (in place); True when
    it did. Models on another attention implementation (eager, flash, flex, custom) are left as they are."""
    if attn_implementation(model.config) != _SDPA:
        return False
    model.set_attn_implementation(PACKED_GQA_ATTENTION)
    return True


AttentionInterface.register(PACKED_GQA_ATTENTION, packed_gqa_sdpa_attention)
# transformers builds no mask at all for an attention name it has no mask function for: give it sdpa's
AttentionMaskInterface.register(PACKED_GQA_ATTENTION, sdpa_mask)
