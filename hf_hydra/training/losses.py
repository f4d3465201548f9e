"""Losses and accuracies of draft-head training, as pure functions on gathered rows.

Head i (0-based) at position t predicts token x_{t+s} with shift s = i + 2: the base model's own next
token x_{t+1} is the root of the draft tree, so the first head already looks two tokens ahead.

A padded batch (B, T) holds, per token, its id x_t, a loss mask (1 where x_t is assistant text, i.e.
a training target; 0 on padding) and the base's next-token distribution at t as top-k ids /
log-probs (the teacher: the base's prediction of x_{t+1}). For head i the rows of the loss are the
positions t with t + s < T and loss_mask[t + s]; at such a row

    target  x_{t+s}                                  (dataset token)
    teacher top-k of the base at t + s - 1           (the base's own distribution over x_{t+s})
    greedy  teacher_ids[t + s - 1, 0]                (the token greedy verification accepts)

`head_targets` gathers these rows once; every function below works on N gathered rows, so the
vocabulary projection (the dominant cost) only ever runs at positions that carry a loss.

Draft vocabulary: heads may project onto K < V token ids `draft_token_ids` (K,). A target id maps to
its draft row via `draft_vocab_index` (-1 outside the draft vocabulary); such targets are excluded
from the `lm` loss (and counted), and count as misses in the accuracies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadTargets:
    """What head `head_index` is trained on: its N rows (valid positions) of a padded (B, T) batch."""

    head_index: int
    batch_index: torch.Tensor  # (N,) long: b of each row
    position: torch.Tensor  # (N,) long: t, where the head reads the context
    target_ids: torch.Tensor  # (N,) long: x_{t+s}
    teacher_ids: torch.Tensor  # (N, k) long: top-k ids of the base's distribution at t + s - 1
    teacher_logprobs: torch.Tensor  # (N, k) float: their log-probabilities

    @property
    def shift(self) -> int:
        return self.head_index + 2

    @property
    def greedy_ids(self) -> torch.Tensor:
        """(N,) the base's argmax for x_{t+s}: what greedy verification would accept."""
        return self.teacher_ids[:, 0]


@dataclass(frozen=True)
class LossTerm:
    """A loss summed over the rows it counts; `mean` is what gets optimised."""

    total: torch.Tensor  # () sum over the counted rows
    count: torch.Tensor  # () number of counted rows
    excluded: torch.Tensor  # () rows left out (no target inside the draft vocabulary)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


@dataclass(frozen=True)
class HeadLosses:
    """The combined objective of one batch and its parts per head (H heads)."""

    total: torch.Tensor  # () sum_i w_i * (lm_weight * lm_i + teacher_weight * teacher_i)
    lm: torch.Tensor  # (H,) mean lm loss per head
    teacher: torch.Tensor  # (H,) mean teacher loss per head
    head_weights: torch.Tensor  # (H,) w_i = decay ** i
    lm_count: torch.Tensor  # (H,) rows of the lm loss
    lm_excluded: torch.Tensor  # (H,) rows whose target is outside the draft vocabulary
    teacher_count: torch.Tensor  # (H,) rows of the teacher loss


def head_targets(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    head_index: int,
) -> HeadTargets:
    """Gather the rows of head `head_index` (shift s = head_index + 2) from a padded batch.

    input_ids (B, T), loss_mask (B, T) bool (False on padding), teacher_ids / teacher_logprobs (B, T, k).
    Row (b, t) exists iff t + s < T and loss_mask[b, t + s].
    """
    shift = head_index + 2
    valid = loss_mask[:, shift:].bool()  # (B, T - s): [b, t] says whether x_{t+s} is a target
    batch_index, position = valid.nonzero(as_tuple=True)  # (N,), (N,)
    target_position = position + shift
    return HeadTargets(
        head_index=head_index,
        batch_index=batch_index,
        position=position,
        target_ids=input_ids[batch_index, target_position],
        teacher_ids=teacher_ids[batch_index, target_position - 1],
        teacher_logprobs=teacher_logprobs[batch_index, target_position - 1].float(),
    )


def draft_vocab_index(draft_token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(V,) long: the draft-vocabulary row of every token id, -1 for ids outside the draft vocabulary."""
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=draft_token_ids.device)
    index[draft_token_ids] = torch.arange(draft_token_ids.numel(), device=draft_token_ids.device)
    return index


def _rows(token_ids: torch.Tensor, draft_index: torch.Tensor | None) -> torch.Tensor:
    """Token ids -> columns of the student's logits (-1 where a token is outside the draft vocabulary)."""
    return token_ids if draft_index is None else draft_index[token_ids]


def lm_loss(
    student_logprobs: torch.Tensor, target_ids: torch.Tensor, draft_index: torch.Tensor | None = None
) -> LossTerm:
    """Cross-entropy against the dataset token: sum over counted rows n of -log q_n(x_n).

    student_logprobs (N, C): log-softmax of the head's logits over its C columns (V, or K draft rows);
    target_ids (N,) base token ids; draft_index (V,) from `draft_vocab_index`, or None for C = V.
    Rows whose target is outside the draft vocabulary are excluded (counted in `excluded`).
    """
    rows = _rows(target_ids, draft_index)  # (N,)
    keep = rows >= 0
    logq = student_logprobs.gather(-1, rows.clamp(min=0)[:, None])[:, 0]  # (N,)
    return LossTerm(
        total=-(logq * keep).sum(),
        count=keep.sum(),
        excluded=(~keep).sum(),
    )


def teacher_loss(
    student_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    draft_index: torch.Tensor | None = None,
) -> LossTerm:
    """Soft-target cross-entropy against the base's own distribution over the same token.

    With the teacher's top-k ids j and log-probs l_j (restricted to the draft vocabulary D when one
    is used), the target distribution is renormalised over them,

        p_j = exp(l_j) / sum_{j' in topk ∩ D} exp(l_j'),       loss_n = -sum_j p_j log q_n(id_j),

    summed over the rows n that have at least one top-k id in D (the others are `excluded`).
    student_logprobs (N, C); teacher_ids (N, k) base token ids; teacher_logprobs (N, k).
    """
    rows = _rows(teacher_ids, draft_index)  # (N, k)
    inside = rows >= 0
    keep = inside.any(dim=-1)  # (N,)
    masked = teacher_logprobs.float().masked_fill(~inside, float("-inf"))
    p = torch.where(keep[:, None], masked.softmax(dim=-1), 0.0).nan_to_num(0.0)  # (N, k), rows sum to 1 or 0
    logq = student_logprobs.gather(-1, rows.clamp(min=0))  # (N, k)
    ce = -(p * logq.masked_fill(~inside, 0.0)).sum(dim=-1)  # (N,)
    return LossTerm(total=ce.sum(), count=keep.sum(), excluded=(~keep).sum())


def head_weights(num_heads: int, decay: float, device: torch.device | None = None) -> torch.Tensor:
    """(H,) w_i = decay ** i: 1.0 weighs heads equally (Hydra), 0.8 is Medusa's choice."""
    return decay ** torch.arange(num_heads, dtype=torch.float32, device=device)


def combine_head_losses(
    lm_terms: Sequence[LossTerm],
    teacher_terms: Sequence[LossTerm],
    lm_weight: float,
    teacher_weight: float,
    decay: float = 1.0,
) -> HeadLosses:
    """total = sum_i decay^i * (lm_weight * mean lm_i + teacher_weight * mean teacher_i)."""
    lm = torch.stack([term.mean for term in lm_terms])  # (H,)
    teacher = torch.stack([term.mean for term in teacher_terms])  # (H,)
    weights = head_weights(len(lm_terms), decay, device=lm.device)
    total = (weights * (lm_weight * lm + teacher_weight * teacher)).sum()
    return HeadLosses(
        total=total,
        lm=lm,
        teacher=teacher,
        head_weights=weights,
        lm_count=torch.stack([term.count for term in lm_terms]),
        lm_excluded=torch.stack([term.excluded for term in lm_terms]),
        teacher_count=torch.stack([term.count for term in teacher_terms]),
    )


def topk_hits(
    student_logits: torch.Tensor,
    greedy_ids: torch.Tensor,
    draft_token_ids: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5),
) -> torch.Tensor:
    """(len(ks),) how many of the N rows have the base's greedy token among the head's top-k.

    student_logits (N, C); greedy_ids (N,) base token ids; draft_token_ids (K,) maps columns to token ids
    (None when C = V). A greedy token outside the draft vocabulary can never be hit: a miss.
    """
    k_max = min(max(ks), student_logits.shape[-1])
    top = student_logits.topk(k_max, dim=-1).indices  # (N, k_max) columns
    top_ids = top if draft_token_ids is None else draft_token_ids[top]  # (N, k_max) token ids
    match = top_ids == greedy_ids[:, None]  # (N, k_max)
    return torch.stack([match[:, :k].any(dim=-1).sum() for k in ks])
