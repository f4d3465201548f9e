"""`hf-hydra prepare`: run the frozen base over the training text and write a feature folder (`features.py`).

The sequences are cut into chunks of consecutive ones. A chunk is computed by one process (this one, or one of
`workers` spawned processes, each loading the base itself), written into the folder's memory-mapped arrays (its own
rows) and flushed to disk before this process records it in progress.json. A stopped run therefore loses at most
the chunks in flight, and a rerun of the same command computes only the chunks not recorded, in any number of
processes. The disk space the folder needs is logged, and checked against the free space, before anything runs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .features import (
    ARRAY_NAMES,
    FORMAT_VERSION,
    FeatureMeta,
    TokenizedSequence,
    array_layout,
    bytes_per_token,
    read_cpu_seconds,
    read_done_ranges,
    write_progress,
)

logger = logging.getLogger(__name__)
LOCK_FILE = "prepare.lock"  # in the feature folder, held by the run writing it


@dataclass(frozen=True)
class BaseSource:
    """Where a worker process loads the frozen base from (a loaded model cannot cross to a spawned process)."""

    name_or_path: str
    dtype: str | None = None  # "float32", "bfloat16" or "float16"; None: the checkpoint's own

    def load(self) -> PreTrainedModel:
        options = {} if self.dtype is None else {"dtype": getattr(torch, self.dtype)}
        return AutoModelForCausalLM.from_pretrained(self.name_or_path, **options).eval()


@dataclass(frozen=True)
class DiskPlan:
    """What the feature folder takes on disk."""

    total_bytes: int  # the whole folder once complete
    remaining_bytes: int  # still to be written by this run (the arrays are sparse files until written)
    free_bytes: int  # free on the folder's file system now

    def describe(self) -> str:
        gb = 1e9
        return (f"the feature folder takes {self.total_bytes / gb:.2f} GB when complete; "
                f"{self.remaining_bytes / gb:.2f} GB still to write, {self.free_bytes / gb:.1f} GB free")


@dataclass(frozen=True)
class PrepareReport:
    sequences: int  # computed by this run (not counting those an earlier run wrote)
    tokens: int
    seconds: float  # wall time of this run
    cpu_seconds: float  # CPU time of the folder's preparation so far, every run and worker process
    disk: DiskPlan

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class _Chunk:
    """Consecutive sequences [first, first + len(sequences)) whose tokens start at row `row`."""

    first: int
    row: int
    sequences: list[TokenizedSequence]

    @property
    def end(self) -> int:
        return self.first + len(self.sequences)

    @property
    def tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.sequences)


@torch.no_grad()
def base_features(base: PreTrainedModel, input_ids: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    """One base forward over (T,) tokens -> hidden (T, d), teacher top-k ids and log-probs (T, k), in float32
    whatever the base's dtype (numpy has no bfloat16; the store rounds them to float16 once)."""
    out = base(input_ids=input_ids[None], output_hidden_states=True)
    logprobs = out.logits[0].float().log_softmax(dim=-1)  # (T, V)
    top = logprobs.topk(topk, dim=-1)
    return {"hidden": out.hidden_states[-1][0].float(), "teacher_ids": top.indices, "teacher_logprobs": top.values}


def prepare_features(
    base: PreTrainedModel | BaseSource,
    sequences: Sequence[TokenizedSequence],
    out_dir: str | Path,
    base_model_id: str,
    teacher_topk: int = 32,
    chunk_size: int = 16,
    workers: int = 1,
    threads_per_worker: int = 1,
) -> PrepareReport:
    """Run the frozen base over every sequence and cache what training needs (resumable, see the module docstring).

    `workers` > 1 spawns that many processes, each loading `base` (a `BaseSource`) and computing with
    `threads_per_worker` threads; `workers` = 1 computes here, on the loaded model or the source's.
    """
    if workers < 1 or threads_per_worker < 1:
        raise ValueError(f"workers and threads_per_worker must be >= 1, got {workers} and {threads_per_worker}")
    if workers > 1 and not isinstance(base, BaseSource):
        raise ValueError("prepare_features with workers > 1 needs a BaseSource (each process loads the base itself), "
                         "not a loaded model.")
    if isinstance(base, BaseSource) and workers == 1:
        base = base.load()
    folder = Path(out_dir)
    plan = _plan(base, sequences, folder, base_model_id, teacher_topk, chunk_size)
    _allocate(folder, plan.meta, plan.offsets)
    start_time = time.perf_counter()
    progress = tqdm(total=plan.meta.num_tokens, initial=plan.meta.num_tokens - plan.tokens, unit="tok",
                    desc="prepare", smoothing=0.05)
    record = _Record(folder, plan.done, read_cpu_seconds(folder), progress)
    try:
        with _only_writer(folder):
            if workers == 1:
                _run_here(base, teacher_topk, plan.pending, record)
            else:
                _run_in_workers(base, teacher_topk, plan.pending, record, workers, threads_per_worker)
    finally:
        progress.close()
    return PrepareReport(sequences=plan.sequences, tokens=plan.tokens, seconds=time.perf_counter() - start_time,
                         cpu_seconds=record.cpu_seconds, disk=plan.disk)


@dataclass(frozen=True)
class _Plan:
    """What a run will compute: the folder's layout, what earlier runs wrote, the chunks left, the disk."""

    meta: FeatureMeta
    offsets: np.ndarray  # (S + 1,) int64
    done: list[tuple[int, int]]
    pending: list[_Chunk]
    disk: DiskPlan

    @property
    def sequences(self) -> int:
        return sum(len(c.sequences) for c in self.pending)

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.pending)


def _plan(
    base: PreTrainedModel | BaseSource,
    sequences: Sequence[TokenizedSequence],
    folder: Path,
    base_model_id: str,
    teacher_topk: int,
    chunk_size: int,
) -> _Plan:
    """Check a resumed folder matches, find the chunks left, and refuse a run the disk cannot hold."""
    offsets = np.concatenate([[0], np.cumsum([len(s.input_ids) for s in sequences], dtype=np.int64)])
    hidden_size, vocab_size = _base_sizes(base)
    meta = FeatureMeta(format_version=FORMAT_VERSION, base_model=base_model_id, hidden_size=hidden_size,
                       vocab_size=vocab_size, num_sequences=len(sequences), num_tokens=int(offsets[-1]),
                       teacher_topk=teacher_topk)
    _check_resumable(folder, meta, offsets)
    done = read_done_ranges(folder)
    pending = _pending_chunks(sequences, offsets, done, chunk_size)
    disk = _disk_plan(folder, meta, sum(c.tokens for c in pending))
    plan = _Plan(meta, offsets, done, pending, disk)
    logger.info("prepare: %d of %d sequences to compute; %s", plan.sequences, len(sequences), disk.describe())
    if disk.remaining_bytes > disk.free_bytes:
        raise ValueError(f"prepare needs {disk.remaining_bytes / 1e9:.2f} GB more in {folder} but only "
                         f"{disk.free_bytes / 1e9:.2f} GB are free; free some space or choose another --out.")
    return plan


@dataclass
class _Record:
    """What the folder's progress.json says, kept up to date as chunks complete."""

    folder: Path
    done: list[tuple[int, int]]
    cpu_seconds: float
    progress: tqdm

    def completed(self, chunk: _Chunk, cpu_seconds: float) -> None:
        """`chunk` is on disk, computed in `cpu_seconds` of CPU time."""
        self.done.append((chunk.first, chunk.end))
        self.cpu_seconds += cpu_seconds
        write_progress(self.folder, self.done, self.cpu_seconds)
        self.progress.update(chunk.tokens)


def _base_sizes(base: PreTrainedModel | BaseSource) -> tuple[int, int]:
    """(hidden size, vocabulary size): from the loaded model, or from the source's config (the workers load it)."""
    if isinstance(base, BaseSource):
        text_config = AutoConfig.from_pretrained(base.name_or_path).get_text_config()
        return text_config.hidden_size, text_config.vocab_size
    return base.config.get_text_config().hidden_size, base.get_output_embeddings().weight.shape[0]


def _check_resumable(folder: Path, meta: FeatureMeta, offsets: np.ndarray) -> None:
    """A folder that exists must have been made from the same inputs (then the run resumes it)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return
    same_offsets = np.array_equal(np.load(folder / "offsets.npy"), offsets)
    if json.loads(meta_path.read_text()) != asdict(meta) or not same_offsets:
        raise ValueError(f"{folder} holds features of other inputs; choose a new output folder.")


def _allocate(folder: Path, meta: FeatureMeta, offsets: np.ndarray) -> None:
    """Create the arrays as sparse files on the first run (a resumed folder has them)."""
    if (folder / "meta.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "offsets.npy", offsets)
    for name, (shape, dtype) in array_layout(meta).items():
        open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
    (folder / "meta.json").write_text(json.dumps(asdict(meta), indent=2))


@contextlib.contextmanager
def _only_writer(folder: Path) -> Iterator[None]:
    """Hold the folder's lock while writing: a second run on the same folder (one started again without stopping
    the first) is refused instead of both recording progress over each other."""
    lock = FileLock(folder / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(
            f"Another `hf-hydra prepare` is writing {folder} (it holds {folder / LOCK_FILE}); wait for it to finish "
            "or stop it, then run the command again to resume."
        ) from None
    try:
        yield
    finally:
        lock.release()


def _open_arrays(folder: Path) -> dict[str, np.memmap]:
    return {name: open_memmap(folder / f"{name}.npy", mode="r+") for name in ARRAY_NAMES}


def _pending_chunks(
    sequences: Sequence[TokenizedSequence], offsets: np.ndarray, done: list[tuple[int, int]], chunk_size: int
) -> list[_Chunk]:
    """Chunks of at most `chunk_size` consecutive sequences covering every sequence not in `done`."""
    chunks, cursor = [], 0
    for start, end in [*done, (len(sequences), len(sequences))]:
        for first in range(cursor, start, chunk_size):
            last = min(first + chunk_size, start)
            chunks.append(_Chunk(first, int(offsets[first]), list(sequences[first:last])))
        cursor = max(cursor, end)
    return chunks


def _disk_plan(folder: Path, meta: FeatureMeta, remaining_tokens: int) -> DiskPlan:
    per_token = bytes_per_token(meta)
    existing = next(p for p in [folder.absolute(), *folder.absolute().parents] if p.exists())
    return DiskPlan(total_bytes=meta.num_tokens * per_token, remaining_bytes=remaining_tokens * per_token,
                    free_bytes=shutil.disk_usage(existing).free)


def _write_chunk(base: PreTrainedModel, arrays: dict[str, np.memmap], chunk: _Chunk, topk: int) -> float:
    """Compute the chunk's features, write them into its rows and flush them to disk; the CPU seconds it took
    (this process's, all its threads)."""
    cpu_start, row = time.process_time(), chunk.row
    for sequence in chunk.sequences:
        ids = torch.tensor(sequence.input_ids, dtype=torch.long)
        end = row + ids.shape[0]
        features = base_features(base, ids.to(base.device), topk)
        arrays["input_ids"][row:end] = ids.numpy()
        arrays["loss_mask"][row:end] = np.asarray(sequence.loss_mask, dtype=np.uint8)
        for name, value in features.items():
            arrays[name][row:end] = value.cpu().numpy()
        row = end
    for array in arrays.values():
        array.flush()
    return time.process_time() - cpu_start


def _run_here(model: PreTrainedModel, topk: int, pending: list[_Chunk], record: _Record) -> None:
    arrays = _open_arrays(record.folder)
    for chunk in pending:
        record.completed(chunk, _write_chunk(model, arrays, chunk, topk))


def _run_in_workers(
    source: BaseSource, topk: int, pending: list[_Chunk], record: _Record, workers: int, threads: int
) -> None:
    """Hand the chunks to `workers` spawned processes, recording each as it completes (a few queued ahead each)."""
    context = multiprocessing.get_context("spawn")  # forking a process that has run OpenMP can hang
    queue = iter(pending)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(source, str(record.folder), topk, threads)) as pool:
        running = {pool.submit(_worker_chunk, chunk): chunk for chunk in _take(queue, 2 * workers)}
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    chunk = running.pop(future)
                    record.completed(chunk, future.result())  # a worker's error stops the run here
                    running.update({pool.submit(_worker_chunk, c): c for c in _take(queue, 1)})
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _take(queue: Iterator[_Chunk], count: int) -> list[_Chunk]:
    """The next `count` chunks of `queue` (fewer at its end)."""
    return list(itertools.islice(queue, count))


class _WorkerState:
    """What a worker process loads once: the base, the open arrays and the teacher's top-k."""

    base: PreTrainedModel
    arrays: dict[str, np.memmap]
    topk: int


_worker = _WorkerState()


def _start_worker(source: BaseSource, folder: str, topk: int, threads: int) -> None:
    torch.set_num_threads(threads)
    _worker.base = source.load()
    _worker.arrays = _open_arrays(Path(folder))
    _worker.topk = topk


def _worker_chunk(chunk: _Chunk) -> float:
    return _write_chunk(_worker.base, _worker.arrays, chunk, _worker.topk)
