"""How long a run is and how fast it learns: the number of optimizer steps, AdamW, the learning-rate schedule.

The learning rate is a pure function of the step (linear warm-up, then cosine down to a floor): a resumed run takes
the step from its checkpoint and continues on its own curve, which is the checkpointed run's curve unless the resume
changed the length (`max_steps`, `epochs`) or the peak (`lr`). A finished run extended to more steps thus follows
the new, longer schedule from the step it reached (`follow_schedule`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .arguments import TrainingArguments


def total_steps(args: TrainingArguments, num_train: int, num_processes: int) -> int:
    """Optimizer steps of the run: max_steps, or enough for `epochs` passes."""
    if args.max_steps > 0:
        return args.max_steps
    micro_per_epoch = (math.ceil(num_train / args.batch_size) // num_processes) or 1
    return max(1, math.ceil(args.epochs * micro_per_epoch / args.gradient_accumulation_steps))


def lr_factor(step: int, warmup_steps: int, total: int, min_lr_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from 1 down to `min_lr_ratio` at step `total`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(heads: nn.Module, args: TrainingArguments) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases and norm weights are not decayed)."""
    params = [p for p in heads.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total: int) -> LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, args.warmup_steps, total, args.min_lr_ratio)

    return LambdaLR(optimizer, factor)


def follow_schedule(scheduler: LambdaLR, lr: float) -> None:
    """After loading a checkpoint: put the optimizer's learning rate on this run's curve at the step reached. The
    checkpoint holds its own run's peak and the rate that run set for the next step; the factor function is not
    saved, so the scheduler already has this run's (with this run's length)."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = lr * factor(scheduler.last_epoch)
