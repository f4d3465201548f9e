"""`hf-hydra tune-tree`: measure the heads and the machine, then pick the tree that is fastest here.

1. Rank accuracy of each head on held-out features (teacher forcing on the base's own text, so each
   head is measured given a correct path): rank_accuracy[k][r] = P(head k's rank-r candidate is the
   base's greedy token); and their calibration (`measure_calibration`, for dynamic trees): how often a
   candidate to which a head gives probability p is that token.
2. Latency of one base verification forward over m = 1..M tokens on a KV cache, on this machine.
3. `tree.choose_tree`: the greedy tree of each size, its expected tau, and the size with the most
   expected tokens per second (drafting time measured for each candidate tree).

The accuracy and calibration belong to the heads, the latencies to the machine: `tree_tuning.json` keeps them, so heads
tuned once on held-out features can be re-tuned for another machine from the stored table
(`stored_rank_accuracy`), without the features.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .drafting import draft_tree
from .dynamic_tree import HeadCalibration, calibrate
from .hub import TREE_TUNING_NAME, WEIGHTS_NAME, heads_digest
from .modeling_hydra import HydraForCausalLM
from .roofline import forward_seconds
from .training.features import FeatureStore
from .tree import TreeChoice, build_tree_buffers, choose_tree


@dataclass(frozen=True)
class TuningReport:
    rank_accuracy: list[list[float]]  # [head][rank]
    verify_seconds: list[float]  # [m - 1]: one base forward over m tokens
    choice: TreeChoice


@dataclass(frozen=True)
class StoredAccuracy:
    """The rank accuracy an earlier tuning measured for the heads in a folder, and how it was measured."""

    rank_accuracy: list[list[float]]  # [head][rank]
    command: str | None  # the `hf-hydra tune-tree --features ...` run that measured it


def stored_rank_accuracy(heads_dir: str | Path, num_heads: int) -> StoredAccuracy:
    """The accuracy table in `heads_dir`'s tree_tuning.json, checked against these heads."""
    path = Path(heads_dir) / TREE_TUNING_NAME
    remedy = "pass --features FOLDER (held-out features of the heads' training text) to measure the heads' accuracy"
    if not path.is_file():
        raise FileNotFoundError(f"{heads_dir} holds no {TREE_TUNING_NAME} from an earlier tuning: {remedy}.")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): {remedy}.") from None
    accuracy = record.get("rank_accuracy") if isinstance(record, dict) else None
    rows = accuracy[:num_heads] if isinstance(accuracy, list) else []
    if len(rows) < num_heads or not all(isinstance(row, list) and row for row in rows):
        raise ValueError(f"{path} holds no rank accuracy for {num_heads} heads: {remedy}.")
    digest = record.get("heads_sha256")  # absent from files written before it was recorded
    if digest is not None and digest != heads_digest(heads_dir):
        raise ValueError(f"{path} measured other heads ({WEIGHTS_NAME} changed since): {remedy}.")
    return StoredAccuracy(rows, record.get("accuracy_command", record.get("command")))


def measure_rank_accuracy(
    model: HydraForCausalLM, store: FeatureStore, sequence_indices: Sequence[int], max_rank: int = 10
) -> list[list[float]]:
    """rank_accuracy[k][r] for heads k and ranks r < max_rank over the given (held-out) sequences."""
    return measure_heads(model, store, sequence_indices, max_rank).rank_accuracy


def measure_calibration(
    model: HydraForCausalLM, store: FeatureStore, sequence_indices: Sequence[int], candidates: int = 8
) -> HeadCalibration:
    """How often a head's candidate with probability p is the base's token, per head, over the `candidates`
    most likely candidates at every position of the given (held-out) sequences (`dynamic_tree.calibrate`)."""
    return measure_heads(model, store, sequence_indices, candidates=candidates).calibration


@dataclass(frozen=True)
class HeadMeasurements:
    """What one teacher-forced pass over held-out features measures of the heads."""

    rank_accuracy: list[list[float]]  # [head][rank]
    calibration: HeadCalibration


@torch.no_grad()
def measure_heads(
    model: HydraForCausalLM,
    store: FeatureStore,
    sequence_indices: Sequence[int],
    max_rank: int = 10,
    candidates: int = 8,
) -> HeadMeasurements:
    """The heads' rank accuracy and calibration in one teacher-forced pass over the given sequences."""
    num_heads = model.heads.num_heads
    hits, totals = torch.zeros(num_heads, max_rank), torch.zeros(num_heads)
    probabilities: list[list[torch.Tensor]] = [[] for _ in range(num_heads)]
    candidate_hits: list[list[torch.Tensor]] = [[] for _ in range(num_heads)]
    for head, rows, columns in _teacher_forced_heads(model, store, sequence_indices, "heads' accuracy"):
        target_logit = rows.gather(1, columns.clamp(min=0)[:, None])  # (N, 1)
        rank = (rows > target_logit).sum(dim=1)  # (N,) 0 = top-1
        rank[columns < 0] = max_rank  # outside the draft vocabulary: never drafted
        hits[head] += torch.bincount(rank[rank < max_rank], minlength=max_rank).float()
        totals[head] += columns.numel()
        top = rows.float().softmax(dim=-1).topk(candidates, dim=-1)  # (N, candidates)
        probabilities[head].append(top.values.flatten())
        candidate_hits[head].append((top.indices == columns[:, None]).flatten())
    return HeadMeasurements(
        rank_accuracy=(hits / totals.clamp(min=1)[:, None]).tolist(),
        calibration=calibrate([torch.cat(p) for p in probabilities], [torch.cat(h) for h in candidate_hits]),
    )


def _teacher_forced_heads(
    model: HydraForCausalLM, store: FeatureStore, sequence_indices: Sequence[int], description: str
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per sequence and head k: the head's logits at the positions whose token k + 2 ahead is a target,
    reading the true path (N, V or K), and the column of the base's own token there (N,), -1 where the
    draft vocabulary lacks it."""
    heads = model.heads
    embed = model.base_lm.get_input_embeddings()
    column_of = _draft_columns(heads.draft_token_ids, store.meta.vocab_size)
    for index in tqdm(sequence_indices, desc=description, unit="seq"):
        features = store.sequence(index)
        hidden = features.hidden[None].to(model.dtype)  # (1, T, d)
        positions = torch.arange(hidden.shape[1])[None]  # (1, T)
        context = heads.encode_context(hidden, positions, None)
        logits = heads.teacher_forced_logits(context, embed(features.input_ids[None]))[0]  # (H, T, V or K)
        for head in range(heads.num_heads):
            shift = head + 2
            targets = features.loss_mask[shift:].nonzero().squeeze(-1)  # positions t with x_{t+s} a target
            greedy = features.teacher_ids[targets + shift - 1, 0]  # the base's own token at t + s
            yield head, logits[head, targets], column_of[greedy] if column_of is not None else greedy


def _draft_columns(draft_token_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    if draft_token_ids is None:
        return None
    columns = torch.full((vocab_size,), -1, dtype=torch.long)
    columns[draft_token_ids] = torch.arange(draft_token_ids.numel())
    return columns


@torch.no_grad()
def measure_verify_seconds(
    model: HydraForCausalLM, max_tokens: int, context_length: int = 300, repeats: int = 7
) -> list[float]:
    """Median seconds of one base forward over m = 1..max_tokens new tokens after `context_length` cached, on
    the base as loaded (packed kernels included): `roofline.forward_seconds`."""
    return forward_seconds({"base": model.base_lm}, max_tokens, context_length, repeats)["base"]


@torch.no_grad()
def measure_draft_seconds(model: HydraForCausalLM, paths: tuple[tuple[int, ...], ...], repeats: int = 5) -> float:
    """Median seconds to draft one tree of these paths with the model's heads."""
    tree = build_tree_buffers(paths, model.config.num_heads).to(model.device)
    context = torch.randn(model.config.base_hidden_size, dtype=model.dtype, device=model.device)
    root = torch.tensor(0, device=model.device)
    embed = model.base_lm.get_input_embeddings()
    runs = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        draft_tree(model.heads, tree, context, root, embed)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs[1:])


def tune_tree(model: HydraForCausalLM, rank_accuracy: list[list[float]], max_tokens: int = 32) -> TuningReport:
    """Measure this machine, then choose the tree for the heads' accuracy (from `measure_rank_accuracy` or
    `stored_rank_accuracy`); the caller stores `report.choice.paths` with the heads."""
    model.eval()
    accuracy = rank_accuracy[: model.config.num_heads]
    verify = measure_verify_seconds(model, max_tokens)
    choice = choose_tree(accuracy, verify, lambda paths: measure_draft_seconds(model, paths))
    return TuningReport(rank_accuracy=accuracy, verify_seconds=verify, choice=choice)
