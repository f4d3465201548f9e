"""How long a run is and how fast it learns: the number of optimizer steps, AdamW, the learning-rate schedule.

The learning rate is a pure function of the step (linear warm-up, then cosine down to a floor), so a resumed run
continues on the same curve from the scheduler state in its checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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


def make_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total: int):
    def factor(step: int) -> float:
        return lr_factor(step, args.warmup_steps, total, args.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
