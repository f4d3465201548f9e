"""`prepare_features`: what it writes equals the base's own forward, a stopped run resumes without computing a
sequence twice, spawned workers write the same bytes as one process, and the disk it needs is stated and checked
before anything runs. A tiny random Llama saved to a temporary folder (offline, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_model
from filelock import FileLock
from transformers import AutoModelForCausalLM

from hf_hydra.training.features import (
    ARRAY_NAMES,
    FeatureStore,
    TokenizedSequence,
    bytes_per_token,
    read_cpu_seconds,
    read_done_ranges,
    sequences_done,
    write_progress,
)
from hf_hydra.training.preparation import LOCK_FILE, BaseSource, prepare_features

TOPK = 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_base")
    make_tiny_model("llama", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


@pytest.fixture(scope="module")
def sequences() -> list[TokenizedSequence]:
    """11 random sequences of 5..20 tokens, the first 2 of each a prompt."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(11):
        length = int(rng.integers(5, 21))
        out.append(TokenizedSequence(rng.integers(0, TINY_VOCAB, size=length).tolist(), [0, 0] + [1] * (length - 2)))
    return out


@pytest.fixture(scope="module")
def straight(base, sequences, tmp_path_factory) -> Path:
    """One uninterrupted run in this process, on one thread as the tests and the workers run: module fixtures are
    built before the function-scoped `one_torch_thread`, and sums split across threads round differently."""
    out = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prepare_features(base, sequences, out, base_model_id="tiny", teacher_topk=TOPK, chunk_size=3)
    finally:
        torch.set_num_threads(threads)
    return out


def arrays(folder: Path) -> dict[str, np.ndarray]:
    return {name: np.load(folder / f"{name}.npy") for name in ARRAY_NAMES}


def assert_same_arrays(a: Path, b: Path) -> None:
    ours, theirs = arrays(a), arrays(b)
    for name in ARRAY_NAMES:
        assert np.array_equal(ours[name], theirs[name]), name


class ForwardCounter:
    """Counts the base's forwards through a forward hook; raises KeyboardInterrupt on forward `stop_at` (a user
    stopping the run mid-chunk)."""

    def __init__(self, model, stop_at: int | None = None) -> None:
        self.calls, self.stop_at = 0, stop_at
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt

    def remove(self) -> None:
        self.handle.remove()


def test_features_are_the_bases_own_forward(base, sequences, straight):
    store = FeatureStore(straight)
    assert len(store) == len(sequences) and sequences_done(straight) == len(sequences)
    for index in (0, 6, 10):
        ids = torch.tensor(sequences[index].input_ids)
        with torch.no_grad():
            out = base(input_ids=ids[None], output_hidden_states=True)
        logprobs = out.logits[0].log_softmax(-1)
        got = store.sequence(index)
        assert torch.equal(got.input_ids, ids)
        assert got.loss_mask.tolist() == [bool(m) for m in sequences[index].loss_mask]
        torch.testing.assert_close(got.hidden, out.hidden_states[-1][0].half().float())
        assert torch.equal(got.teacher_ids, logprobs.topk(TOPK).indices)
        torch.testing.assert_close(got.teacher_logprobs, logprobs.topk(TOPK).values.half().float())


def test_a_stopped_run_resumes_and_computes_each_sequence_once(base, sequences, straight, tmp_path):
    """Stopped during its third chunk (sequences 6..8): the rerun computes sequences 6..10 only, and the folder
    ends equal to an uninterrupted run's."""
    out = tmp_path / "stopped"
    counter = ForwardCounter(base, stop_at=8)
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_features(base, sequences, out, base_model_id="tiny", teacher_topk=TOPK, chunk_size=3)
        assert read_done_ranges(out) == [(0, 6)]
        stopped_cpu = read_cpu_seconds(out)
        with pytest.raises(ValueError, match="incomplete"):
            FeatureStore(out)
        counter.calls, counter.stop_at = 0, None
        report = prepare_features(base, sequences, out, base_model_id="tiny", teacher_topk=TOPK, chunk_size=3)
    finally:
        counter.remove()
    assert counter.calls == report.sequences == 5
    assert report.tokens == sum(len(s.input_ids) for s in sequences[6:])
    assert report.cpu_seconds > stopped_cpu > 0  # the CPU time of both runs, the stopped one's recorded chunks too
    assert_same_arrays(out, straight)


def test_a_rerun_fills_holes_left_by_out_of_order_workers(base, sequences, straight, tmp_path):
    """Workers finish chunks out of order; a stop can leave done ranges after a gap. Only the gaps are computed."""
    out = tmp_path / "holes"
    prepare_features(base, sequences, out, base_model_id="tiny", teacher_topk=TOPK, chunk_size=3)
    for name in ("hidden", "teacher_ids"):
        array = np.load(out / f"{name}.npy", mmap_mode="r+")
        array[:] = 0
        array.flush()
    write_progress(out, [(3, 5), (0, 0), (8, 11), (4, 6)], cpu_seconds=2.0)
    assert read_done_ranges(out) == [(3, 6), (8, 11)] and sequences_done(out) == 0
    for name in ("hidden", "teacher_ids"):  # what the "done" ranges held is kept: restore it from the straight run
        array = np.load(out / f"{name}.npy", mmap_mode="r+")
        reference = np.load(straight / f"{name}.npy")
        offsets = np.load(out / "offsets.npy")
        for start, end in [(3, 6), (8, 11)]:
            array[offsets[start] : offsets[end]] = reference[offsets[start] : offsets[end]]
        array.flush()
    counter = ForwardCounter(base)
    try:
        report = prepare_features(base, sequences, out, base_model_id="tiny", teacher_topk=TOPK, chunk_size=2)
    finally:
        counter.remove()
    assert counter.calls == report.sequences == 5  # sequences 0, 1, 2, 6, 7
    assert report.cpu_seconds > 2.0 and read_cpu_seconds(out) == report.cpu_seconds
    assert sequences_done(out) == len(sequences)
    assert_same_arrays(out, straight)


def test_spawned_workers_write_what_one_process_writes(base_dir, sequences, straight, tmp_path):
    out = tmp_path / "workers"
    report = prepare_features(BaseSource(str(base_dir)), sequences, out, base_model_id="tiny", teacher_topk=TOPK,
                              chunk_size=2, workers=2, threads_per_worker=1)
    assert report.sequences == len(sequences) and report.cpu_seconds > 0  # the workers' CPU time
    assert json.loads((out / "meta.json").read_text()) == json.loads((straight / "meta.json").read_text())
    assert_same_arrays(out, straight)


def test_a_second_run_on_a_folder_being_written_is_refused(base, sequences, straight):
    with FileLock(straight / LOCK_FILE), pytest.raises(RuntimeError, match="Another `hf-hydra prepare` is writing"):
        prepare_features(base, sequences, straight, base_model_id="tiny", teacher_topk=TOPK)
    prepare_features(base, sequences, straight, base_model_id="tiny", teacher_topk=TOPK)  # free again: nothing to do


def test_workers_need_a_source_not_a_loaded_model(base, sequences, tmp_path):
    with pytest.raises(ValueError, match="BaseSource"):
        prepare_features(base, sequences, tmp_path / "f", base_model_id="tiny", teacher_topk=TOPK, workers=2)


def test_disk_use_is_stated_and_checked_before_anything_runs(base, sequences, straight, tmp_path):
    """The plan's total is the arrays' bytes; a run that cannot fit is refused before it writes anything."""
    report = prepare_features(base, sequences, straight, base_model_id="tiny", teacher_topk=TOPK)
    data_bytes = sum(a.nbytes for a in arrays(straight).values())
    assert report.disk.total_bytes == data_bytes and report.disk.remaining_bytes == 0 and report.sequences == 0
    huge = [TokenizedSequence(range(10**11), range(10**11))]  # ~10 TB of features; never materialised
    out = tmp_path / "huge"
    with pytest.raises(ValueError, match="GB are free"):
        prepare_features(base, huge, out, base_model_id="tiny", teacher_topk=TOPK)
    assert not out.exists()


def test_a_folder_of_other_inputs_is_refused(base, sequences, straight):
    with pytest.raises(ValueError, match="other inputs"):
        prepare_features(base, sequences[:5], straight, base_model_id="tiny", teacher_topk=TOPK)


def test_bytes_per_token_matches_the_layout(straight):
    meta = FeatureStore(straight).meta
    assert bytes_per_token(meta) == 4 + 1 + 2 * meta.hidden_size + (4 + 2) * TOPK
