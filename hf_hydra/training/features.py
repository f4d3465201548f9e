"""The feature folder: one pass of the frozen base model over the training text, cached on disk.

Training heads needs, per token t: the base's post-norm hidden state h_t, the token id, whether the
token is a training target (assistant text), and the base's own next-token distribution (the teacher)
as its top-k log-probabilities. All of it is written once into memory-mapped `.npy` files, so later
epochs never run the base model's transformer layers again.

Layout of a feature folder (N tokens over S sequences, d hidden size, k teacher top-k):

    meta.json              FeatureMeta
    offsets.npy            (S + 1,) int64   sequence s covers tokens offsets[s]:offsets[s + 1]
    input_ids.npy          (N,) int32
    loss_mask.npy          (N,) uint8       1 where the token is assistant text (a target)
    hidden.npy             (N, d) float16   base post-norm last hidden state
    teacher_ids.npy        (N, k) int32     top-k of the base's next-token distribution at t
    teacher_logprobs.npy   (N, k) float16   their log-probabilities
    progress.json          {"sequences_done": n, "done_after": [[a, b], ...], "cpu_seconds": c}: sequences
                           [0, n) and each [a, b) are written (a rerun computes only the others), in c seconds of
                           CPU time over every run so far
    preparation.json       {"command": ...}: the `hf-hydra prepare` command that made the folder (CLI only)

`preparation.py` writes a folder; this module defines its layout and reads it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
PREPARATION_FILE = "preparation.json"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedSequence:
    """One training sequence: token ids and the mask of target (assistant) tokens."""

    input_ids: Sequence[int]
    loss_mask: Sequence[int]


def training_sequences(rendered: Sequence[TokenizedSequence]) -> list[TokenizedSequence]:
    """The sequences that still hold target tokens (a long prompt can push the whole answer past the
    truncation length); how many were dropped is logged."""
    kept = [s for s in rendered if any(s.loss_mask)]
    if len(kept) < len(rendered):
        logger.warning(
            "%d of %d conversations have no assistant token left after truncation; skipped.",
            len(rendered) - len(kept),
            len(rendered),
        )
    return kept


@dataclass(frozen=True)
class FeatureMeta:
    format_version: int
    base_model: str
    hidden_size: int
    vocab_size: int
    num_sequences: int
    num_tokens: int
    teacher_topk: int


@dataclass(frozen=True)
class SequenceFeatures:
    """The cached features of one sequence of T tokens, as tensors."""

    input_ids: torch.Tensor  # (T,) long
    loss_mask: torch.Tensor  # (T,) bool
    hidden: torch.Tensor  # (T, d) float32
    teacher_ids: torch.Tensor  # (T, k) long
    teacher_logprobs: torch.Tensor  # (T, k) float32


class FeatureStore:
    """Read access to a feature folder written by `prepare_features`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{self.folder} is not a feature folder (no meta.json); run `hf-hydra prepare` first.")
        self.meta = FeatureMeta(**json.loads(meta_path.read_text()))
        if self.meta.format_version != FORMAT_VERSION:
            raise ValueError(f"{self.folder} has feature format {self.meta.format_version}; re-run prepare.")
        done = sequences_done(self.folder)
        if done < self.meta.num_sequences:
            raise ValueError(
                f"{self.folder} is incomplete ({done}/{self.meta.num_sequences} sequences); "
                "re-run the same `hf-hydra prepare` command to resume it."
            )
        self.offsets = np.load(self.folder / "offsets.npy")
        self._arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in ARRAY_NAMES}

    def __len__(self) -> int:
        return self.meta.num_sequences

    def sequence(self, index: int) -> SequenceFeatures:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        a = {name: np.asarray(array[start:end]) for name, array in self._arrays.items()}
        return SequenceFeatures(
            input_ids=torch.from_numpy(a["input_ids"].astype(np.int64)),
            loss_mask=torch.from_numpy(a["loss_mask"].astype(bool)),
            hidden=torch.from_numpy(a["hidden"].astype(np.float32)),
            teacher_ids=torch.from_numpy(a["teacher_ids"].astype(np.int64)),
            teacher_logprobs=torch.from_numpy(a["teacher_logprobs"].astype(np.float32)),
        )

    def target_token_counts(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """How often each token id is a target (an assistant token) in the sequences `indices` (all when None): (V,)."""
        ids = np.asarray(self._arrays["input_ids"], dtype=np.int64)
        mask = np.asarray(self._arrays["loss_mask"], dtype=bool)
        if indices is not None:
            mask = mask & self._token_mask(indices)
        return torch.from_numpy(np.bincount(ids[mask], minlength=self.meta.vocab_size))

    def most_frequent_targets(self, k: int, indices: Sequence[int] | None = None) -> torch.Tensor:
        """The k most frequent target token ids of the sequences `indices` (all when None; a draft vocabulary),
        sorted by id: (k,)."""
        return self.target_token_counts(indices).topk(k).indices.sort().values

    def _token_mask(self, indices: Sequence[int]) -> np.ndarray:
        """(total tokens,) True on the tokens of the sequences `indices`."""
        selected = np.zeros(len(self), dtype=bool)
        selected[np.asarray(indices, dtype=np.int64)] = True
        return np.repeat(selected, np.diff(self.offsets))


ARRAY_NAMES = ("input_ids", "loss_mask", "hidden", "teacher_ids", "teacher_logprobs")


def array_layout(meta: FeatureMeta) -> dict[str, tuple[tuple[int, ...], type]]:
    """Each array file's (shape, numpy dtype)."""
    n, d, k = meta.num_tokens, meta.hidden_size, meta.teacher_topk
    return {
        "input_ids": ((n,), np.int32),
        "loss_mask": ((n,), np.uint8),
        "hidden": ((n, d), np.float16),
        "teacher_ids": ((n, k), np.int32),
        "teacher_logprobs": ((n, k), np.float16),
    }


def bytes_per_token(meta: FeatureMeta) -> int:
    """Disk bytes one token takes in the arrays."""
    layout = array_layout(meta).values()
    return sum(int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype in layout)


class FeatureCollection:
    """Feature folders of one base model read as one list of sequences: the first folder's, then the next's."""

    def __init__(self, stores: Sequence[FeatureStore]) -> None:
        if not stores:
            raise ValueError("FeatureCollection needs at least one feature folder.")
        first = stores[0]
        for store in stores[1:]:
            ours, theirs = _compatibility(first.meta), _compatibility(store.meta)
            if ours != theirs:
                raise ValueError(
                    f"The features in {store.folder} (base, hidden size, vocabulary, teacher top-k: {theirs}) do not "
                    f"match those in {first.folder} ({ours}): prepare both with the same base and --teacher-topk."
                )
        self.stores = list(stores)
        self.starts = np.cumsum([0] + [len(store) for store in stores])  # (len(stores) + 1,)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def sequence(self, index: int) -> SequenceFeatures:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} of a collection of {len(self)}")
        position = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.stores[position].sequence(index - int(self.starts[position]))


def _compatibility(meta: FeatureMeta) -> tuple:
    return meta.base_model, meta.hidden_size, meta.vocab_size, meta.teacher_topk


def write_preparation(folder: str | Path, command: str, cpu_seconds: float | None = None) -> None:
    """Record the command that made the feature folder and the CPU seconds it took (training copies the command
    beside the heads)."""
    record = {"command": command} | ({} if cpu_seconds is None else {"cpu_seconds": cpu_seconds})
    (Path(folder) / PREPARATION_FILE).write_text(json.dumps(record, indent=2))


def read_preparation(folder: str | Path) -> dict | None:
    """The record of `write_preparation`: "command" and, where measured, "cpu_seconds" (None: not made by the
    CLI)."""
    path = Path(folder) / PREPARATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_done_ranges(folder: Path) -> list[tuple[int, int]]:
    """The [start, end) ranges of sequences already written, sorted and merged."""
    path = folder / "progress.json"
    if not path.is_file():
        return []
    progress = json.loads(path.read_text())
    ranges = [(0, progress["sequences_done"])] + [tuple(r) for r in progress.get("done_after", [])]
    return merge_ranges(ranges)


def write_progress(folder: Path, ranges: Sequence[tuple[int, int]], cpu_seconds: float) -> None:
    """Record the written ranges and the CPU time spent so far (atomically: a stop mid-write keeps the previous
    record)."""
    merged = merge_ranges(ranges)
    prefix = merged[0][1] if merged and merged[0][0] == 0 else 0
    rest = [list(r) for r in merged if r[0] != 0]
    tmp = folder / "progress.json.tmp"
    tmp.write_text(json.dumps({"sequences_done": prefix, "done_after": rest, "cpu_seconds": cpu_seconds}))
    tmp.replace(folder / "progress.json")


def read_cpu_seconds(folder: Path) -> float:
    """CPU seconds the runs preparing the folder have spent so far (0 where not recorded)."""
    path = folder / "progress.json"
    return float(json.loads(path.read_text()).get("cpu_seconds", 0.0)) if path.is_file() else 0.0


def sequences_done(folder: Path) -> int:
    """How many sequences from the first on are written (the folder is complete when that is all of them)."""
    ranges = read_done_ranges(folder)
    return ranges[0][1] if ranges and ranges[0][0] == 0 else 0


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-empty, non-overlapping [start, end) ranges covering the same sequences."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
