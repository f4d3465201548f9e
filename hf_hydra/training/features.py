"""`hf-hydra prepare`: one pass of the frozen base model over the training text, cached on disk.

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
    progress.json          {"sequences_done": n}: a rerun resumes after n
    preparation.json       {"command": ...}: the `hf-hydra prepare` command that made the folder (CLI only)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm
from transformers import PreTrainedModel

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


@dataclass(frozen=True)
class PrepareReport:
    sequences: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


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
        done = _read_progress(self.folder)
        if done < self.meta.num_sequences:
            raise ValueError(
                f"{self.folder} is incomplete ({done}/{self.meta.num_sequences} sequences); "
                "re-run the same `hf-hydra prepare` command to resume it."
            )
        self.offsets = np.load(self.folder / "offsets.npy")
        self._arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in _ARRAY_NAMES}

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


_ARRAY_NAMES = ("input_ids", "loss_mask", "hidden", "teacher_ids", "teacher_logprobs")


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


def write_preparation(folder: str | Path, command: str) -> None:
    """Record the command that made the feature folder (training copies it beside the heads)."""
    (Path(folder) / PREPARATION_FILE).write_text(json.dumps({"command": command}, indent=2))


def read_preparation(folder: str | Path) -> str | None:
    """The command recorded by `write_preparation` (None: not made by the CLI)."""
    path = Path(folder) / PREPARATION_FILE
    return json.loads(path.read_text()).get("command") if path.is_file() else None


def _read_progress(folder: Path) -> int:
    path = folder / "progress.json"
    return json.loads(path.read_text())["sequences_done"] if path.is_file() else 0


def _write_progress(folder: Path, done: int) -> None:
    tmp = folder / "progress.json.tmp"
    tmp.write_text(json.dumps({"sequences_done": done}))
    tmp.replace(folder / "progress.json")


def _create_or_open(folder: Path, meta: FeatureMeta, offsets: np.ndarray) -> dict[str, np.memmap]:
    """Allocate the arrays (first run) or reopen them (resume, after checking the same inputs)."""
    meta_path = folder / "meta.json"
    shapes = {
        "input_ids": ((meta.num_tokens,), np.int32),
        "loss_mask": ((meta.num_tokens,), np.uint8),
        "hidden": ((meta.num_tokens, meta.hidden_size), np.float16),
        "teacher_ids": ((meta.num_tokens, meta.teacher_topk), np.int32),
        "teacher_logprobs": ((meta.num_tokens, meta.teacher_topk), np.float16),
    }
    if meta_path.is_file():
        if json.loads(meta_path.read_text()) != asdict(meta) or not np.array_equal(
            np.load(folder / "offsets.npy"), offsets
        ):
            raise ValueError(f"{folder} holds features of other inputs; choose a new output folder.")
        return {name: open_memmap(folder / f"{name}.npy", mode="r+") for name in shapes}
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "offsets.npy", offsets)
    arrays = {
        name: open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        for name, (shape, dtype) in shapes.items()
    }
    meta_path.write_text(json.dumps(asdict(meta), indent=2))
    return arrays


@torch.no_grad()
def base_features(base: PreTrainedModel, input_ids: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    """One base forward over (T,) tokens -> hidden (T, d), teacher top-k ids and log-probs (T, k), in float32
    whatever the base's dtype (numpy has no bfloat16; the store rounds them to float16 once)."""
    out = base(input_ids=input_ids[None], output_hidden_states=True)
    logprobs = out.logits[0].float().log_softmax(dim=-1)  # (T, V)
    top = logprobs.topk(topk, dim=-1)
    return {"hidden": out.hidden_states[-1][0].float(), "teacher_ids": top.indices, "teacher_logprobs": top.values}


def prepare_features(
    base: PreTrainedModel,
    sequences: Sequence[TokenizedSequence],
    out_dir: str | Path,
    base_model_id: str,
    teacher_topk: int = 32,
    flush_every: int = 16,
) -> PrepareReport:
    """Run the frozen base over every sequence and cache what training needs (resumable)."""
    folder = Path(out_dir)
    lengths = np.array([len(s.input_ids) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    meta = FeatureMeta(
        format_version=FORMAT_VERSION,
        base_model=base_model_id,
        hidden_size=base.config.get_text_config().hidden_size,
        vocab_size=base.get_output_embeddings().weight.shape[0],
        num_sequences=len(sequences),
        num_tokens=int(offsets[-1]),
        teacher_topk=teacher_topk,
    )
    arrays = _create_or_open(folder, meta, offsets)
    done = _read_progress(folder)
    start_time, tokens = time.perf_counter(), 0
    progress = tqdm(total=meta.num_tokens, initial=int(offsets[done]), unit="tok", desc="prepare", smoothing=0.05)
    for index in range(done, len(sequences)):
        start, end = int(offsets[index]), int(offsets[index + 1])
        ids = torch.tensor(sequences[index].input_ids, dtype=torch.long)
        features = base_features(base, ids.to(base.device), teacher_topk)
        arrays["input_ids"][start:end] = ids.numpy()
        arrays["loss_mask"][start:end] = np.asarray(sequences[index].loss_mask, dtype=np.uint8)
        for name, value in features.items():
            arrays[name][start:end] = value.cpu().numpy()
        tokens += end - start
        progress.update(end - start)
        if (index + 1) % flush_every == 0 or index + 1 == len(sequences):
            for array in arrays.values():
                array.flush()
            _write_progress(folder, index + 1)
    progress.close()
    return PrepareReport(sequences=len(sequences) - done, tokens=tokens, seconds=time.perf_counter() - start_time)
