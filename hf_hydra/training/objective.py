"""The loss the heads minimise, assembled per batch from cached features, and the validation metrics.

`HeadsObjective` holds the trainable heads (it is the module accelerate prepares and checkpoints) and turns one
padded batch into the weighted per-head losses of `losses.py`: NEFTune noise in training, the shared context
encoding, the rows each head is trained on, its logits. `evaluate` runs the same module in eval mode over the
validation split and reduces top-1 / top-5 accuracy against the base's greedy token, and the mean losses, across
processes, so validation measures exactly what training optimises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from ..heads import DraftHeads
from .arguments import TrainingArguments
from .batching import Batch, collate
from .features import FeatureStore
from .losses import (
    HeadLosses,
    HeadTargets,
    combine_head_losses,
    draft_vocab_index,
    head_targets,
    lm_loss,
    teacher_loss,
    topk_hits,
)

ACCURACY_KS = (1, 5)


def neftune_noise(x: torch.Tensor, lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """x (B, T, d) plus U(-1, 1) * alpha / sqrt(T_b * d) per sequence b (NEFTune)."""
    scale = alpha / torch.sqrt(lengths.to(x.dtype) * x.shape[-1])  # (B,)
    return x + (torch.rand_like(x) * 2 - 1) * scale[:, None, None]


@dataclass(frozen=True)
class StepOutput:
    losses: HeadLosses
    hits: torch.Tensor | None  # (H, len(ACCURACY_KS)) rows whose greedy token is in the head's top-k
    rows: torch.Tensor  # (H,) rows (valid positions) per head


class HeadsObjective(nn.Module):
    """The trainable heads and the loss they minimise on one batch (the module accelerate wraps).

    Holds no base weights: the token embeddings E(x) come in with the batch.
    """

    def __init__(self, heads: DraftHeads, vocab_size: int, args: TrainingArguments) -> None:
        super().__init__()
        self.heads = heads
        self.lm_weight, self.teacher_weight = args.lm_weight, args.teacher_weight
        self.head_decay, self.noise_alpha = args.head_decay, args.noise_alpha
        ids = heads.draft_token_ids
        self.register_buffer("draft_index", None if ids is None else draft_vocab_index(ids, vocab_size), False)

    def forward(self, batch: Batch, token_embeds: torch.Tensor, with_accuracy: bool = False) -> StepOutput:
        """batch: B padded sequences; token_embeds (B, T, d) = E(input_ids) of the frozen base.

        In eval mode autocast is switched off (accelerate's mixed precision wraps this forward): validation
        measures the heads in float32, as decoding runs them."""
        if self.training:
            return self._step(batch, token_embeds, with_accuracy)
        with torch.autocast(batch.hidden.device.type, enabled=False):
            return self._step(batch, token_embeds, with_accuracy)

    def _step(self, batch: Batch, token_embeds: torch.Tensor, with_accuracy: bool) -> StepOutput:
        hidden = batch.hidden
        if self.training and self.noise_alpha > 0:
            hidden = neftune_noise(hidden, batch.lengths, self.noise_alpha)
            token_embeds = neftune_noise(token_embeds, batch.lengths, self.noise_alpha)
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # (1, T)
        context = self.heads.encode_context(hidden, positions, None)  # (B, T, d)
        lm_terms, teacher_terms, hits, rows = [], [], [], []
        for i in range(self.heads.num_heads):
            targets = head_targets(batch.input_ids, batch.loss_mask, batch.teacher_ids, batch.teacher_logprobs, i)
            logits = self._head_logits(targets, context, token_embeds)  # (N_i, K or V)
            logq = logits.float().log_softmax(dim=-1)
            lm_terms.append(lm_loss(logq, targets.target_ids, self.draft_index))
            teacher_terms.append(teacher_loss(logq, targets.teacher_ids, targets.teacher_logprobs, self.draft_index))
            rows.append(targets.target_ids.numel())
            if with_accuracy:
                hits.append(topk_hits(logits.detach(), targets.greedy_ids, self.heads.draft_token_ids, ACCURACY_KS))
        losses = combine_head_losses(lm_terms, teacher_terms, self.lm_weight, self.teacher_weight, self.head_decay)
        return StepOutput(
            losses=losses,
            hits=torch.stack(hits) if with_accuracy else None,
            rows=torch.tensor(rows, device=hidden.device),
        )

    def _head_logits(self, targets: HeadTargets, context: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """Head i at its N rows (b, t): reads context[b, t] and, for Hydra, E(x_{t+1}), ..., E(x_{t+i+1})."""
        i, b, t = targets.head_index, targets.batch_index, targets.position
        path_embeds = None
        if self.heads.sequential:
            offsets = torch.arange(1, i + 2, device=t.device)  # (i + 1,)
            path_embeds = token_embeds[b[:, None], t[:, None] + offsets]  # (N, i + 1, d)
        return self.heads(i, context[b, t], path_embeds)  # (N, K or V)


@torch.no_grad()
def evaluate(
    objective: HeadsObjective,
    store: FeatureStore,
    indices: Sequence[int],
    embed: nn.Module,
    batch_size: int,
    accelerator: Accelerator,
) -> dict:
    """Per-head top-1 / top-5 against the base's greedy token and mean losses, over all processes."""
    was_training = objective.training
    objective.eval()
    num_heads = objective.heads.num_heads
    sums = torch.zeros(4, num_heads, device=accelerator.device)  # lm total, teacher total, lm count, teacher count
    hits = torch.zeros(num_heads, len(ACCURACY_KS), device=accelerator.device)
    rows = torch.zeros(num_heads, device=accelerator.device)
    mine = list(indices)[accelerator.process_index :: accelerator.num_processes]
    for start in range(0, len(mine), batch_size):
        batch = collate([store.sequence(i) for i in mine[start : start + batch_size]]).to(accelerator.device)
        out = objective(batch, embed(batch.input_ids), with_accuracy=True)
        losses = out.losses
        sums += torch.stack(
            [
                losses.lm * losses.lm_count,
                losses.teacher * losses.teacher_count,
                losses.lm_count.float(),
                losses.teacher_count.float(),
            ]
        )
        hits += out.hits
        rows += out.rows
    sums, hits, rows = (accelerator.reduce(x, reduction="sum") for x in (sums, hits, rows))
    objective.train(was_training)
    accuracy = (hits / rows.clamp(min=1)[:, None]).T  # (len(ks), H)
    return {
        "top1": accuracy[0].tolist(),
        "top5": accuracy[1].tolist(),
        "lm_loss": (sums[0] / sums[2].clamp(min=1)).tolist(),
        "teacher_loss": (sums[1] / sums[3].clamp(min=1)).tolist(),
        "rows": rows.long().tolist(),
    }
