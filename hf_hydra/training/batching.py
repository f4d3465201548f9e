"""Which sequences a run trains on, in which order, on which process, and how they become a padded batch.

The train / validation split is by sequence and seeded, so other tools can measure trained heads on the same
held-out sequences. The order is a seeded shuffle per epoch, cut into global micro-batches that every process
shares out the same way: a resumed run skips exactly the micro-batches it already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .features import SequenceFeatures


@dataclass(frozen=True)
class Batch:
    """B sequences padded to T tokens (padding: loss_mask False, zeros elsewhere)."""

    input_ids: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T) bool
    hidden: torch.Tensor  # (B, T, d) float32
    teacher_ids: torch.Tensor  # (B, T, k) long
    teacher_logprobs: torch.Tensor  # (B, T, k) float32
    lengths: torch.Tensor  # (B,) long: real tokens per sequence

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


def collate(sequences: Sequence[SequenceFeatures]) -> Batch:
    """Pad sequences (each (T_b, ...)) on the right to the longest one."""

    def pad(name: str) -> torch.Tensor:
        return nn.utils.rnn.pad_sequence([getattr(s, name) for s in sequences], batch_first=True)

    return Batch(
        input_ids=pad("input_ids"),
        loss_mask=pad("loss_mask"),
        hidden=pad("hidden"),
        teacher_ids=pad("teacher_ids"),
        teacher_logprobs=pad("teacher_logprobs"),
        lengths=torch.tensor([len(s.input_ids) for s in sequences], dtype=torch.long),
    )


def split_sequences(num_sequences: int, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of sequence indices into (train, validation), both sorted."""
    order = np.random.default_rng(seed).permutation(num_sequences)
    n_val = round(validation_fraction * num_sequences)
    if validation_fraction > 0 and n_val == 0 and num_sequences > 1:
        n_val = 1
    if n_val >= num_sequences:
        raise ValueError(f"validation_fraction={validation_fraction} leaves no training sequences.")
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def epoch_batches(train: Sequence[int], batch_size: int, epoch: int, seed: int, num_processes: int) -> list[list[int]]:
    """The global micro-batches of one epoch: a seeded shuffle cut into batches of `batch_size`,
    trimmed to a multiple of `num_processes` (every process gets the same number)."""
    order = np.random.default_rng([seed, epoch]).permutation(np.asarray(train))
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return batches[: len(batches) - len(batches) % num_processes]


def micro_batch_stream(
    train: Sequence[int], batch_size: int, seed: int, num_processes: int, process_index: int, skip: int = 0
) -> Iterator[tuple[int, list[int]]]:
    """(epoch, sequence indices) of this process's micro-batches, epoch after epoch, after skipping `skip`."""
    epoch = 0
    while True:
        mine = epoch_batches(train, batch_size, epoch, seed, num_processes)[process_index::num_processes]
        if not mine:
            raise ValueError(
                f"{len(train)} training sequences make no batch of {batch_size} for each of {num_processes} "
                "processes; lower batch_size."
            )
        for batch in mine[skip:]:
            yield epoch, batch
        skip = max(0, skip - len(mine))
        epoch += 1
