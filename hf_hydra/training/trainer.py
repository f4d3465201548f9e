"""`hf-hydra train`: train draft heads on cached base features, under `accelerate`.

The frozen base model's transformer layers never run here: every input comes from the feature
cache (`features.py`: post-norm hidden states, token ids, loss masks, the base's top-k next-token
distribution). Of the base only the input embedding (the Hydra heads read E(x)) and the lm_head
weight (initial head projections) are used.

One optimizer step:

    for each of `gradient_accumulation_steps` micro-batches (B sequences, padded to T):
        context  = heads.encode_context(h + noise)                          (B, T, d)
        head i   : rows (b, t) with a target at t + i + 2  -> logits         (N_i, K)
        loss     = sum_i decay^i (lm_weight * CE(x_{t+i+2}) + teacher_weight * CE(teacher))
        backward (gradients all-reduced across processes on the last micro-batch)
    clip, AdamW step, lr schedule step (linear warm-up, cosine to min_lr_ratio x peak)

Multi-process: `accelerate launch --multi_gpu --num_processes N -m hf_hydra.cli train ...` (on a
CPU-only machine the processes talk over gloo: `accelerate launch --cpu` starts one process unless
an MPI host file is given). Every process reads its own share of each global batch; only the main
process logs and writes files.

Outputs in `output_dir`: the heads (`save_pretrained`), `metrics.jsonl` (one line per step and per
validation), `training_curves.png`, `training_summary.json`, `training_args.json`, and
`checkpoints/step-NNNNNNNN` (accelerate state + step counter) for `resume=True`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from .. import assets
from ..configuration_hydra import DRAFT_VOCAB_PROJECTIONS, HEAD_ARCHS, VOCAB_PROJECTIONS
from ..heads import DraftHeads
from ..modeling_hydra import HydraForCausalLM
from .features import PREPARATION_FILE, FeatureCollection, FeatureStore, SequenceFeatures, read_preparation
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

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIXED_PRECISIONS = ("no", "bf16", "fp16")
ACCURACY_KS = (1, 5)
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
SUMMARY_FILE = "training_summary.json"
ARGS_FILE = "training_args.json"
GLOO_SETTLE_SECONDS = 0.5  # pause before destroying a multi-process run's process group (see _end_process_group)


@dataclass(frozen=True)
class TrainingArguments:
    """Everything one training run needs. Defaults: a cheap step (draft vocabulary of 8,192 words, teacher
    from the cache) and the Hydra++ recipe where it fits this hardware (method.md section 2)."""

    features_dir: str  # a folder written by `prepare_features`; validation and the draft vocabulary come from it
    output_dir: str  # heads, metrics, plot, summary and checkpoints go here
    base_model: str  # path or id of the frozen base the features were computed with
    head_arch: str = "hydra"  # "medusa" | "hydra" | "hydra++"
    num_heads: int = 4  # head i predicts the token i + 2 positions after t
    num_layers: int = 1  # residual blocks per head (Hydra++ recipe: 4)
    # "draft_vocab" (own projection onto K tokens: cheap), "shared_draft_vocab" (frozen base rows of the K
    # tokens: cheap and small), "per_head" (own projection onto the whole vocabulary), "shared" (base lm_head)
    vocab_projection: str = "draft_vocab"
    draft_vocab_size: int = 8192  # K most frequent target tokens of the training split (draft projections)
    lm_weight: float = 0.0  # weight of CE against the dataset token
    teacher_weight: float = 1.0  # weight of soft CE against the base's distribution (Hydra++ uses only this)
    head_decay: float = 1.0  # head i weighs decay^i: 1.0 equal (Hydra), 0.8 (Medusa)
    noise_alpha: float = 0.0  # NEFTune noise U(-1, 1) * alpha / sqrt(T * d) on h and E(x), training only
    dropout: float = 0.0  # Hydra++ only (recipe: 0.2)
    lr: float = 1e-3  # peak learning rate (Hydra++: 5e-4, Medusa-1: 1e-3)
    warmup_steps: int = 20  # linear warm-up to the peak, in optimizer steps
    min_lr_ratio: float = 0.33  # cosine decay ends at this fraction of the peak
    weight_decay: float = 0.1  # AdamW, on matrices only (not on biases or norms)
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables it
    batch_size: int = 8  # sequences per micro-batch per process
    gradient_accumulation_steps: int = 4  # micro-batches per optimizer step
    epochs: float = 1.0  # passes over the training sequences (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; 0: derived from epochs
    seed: int = 0  # head initialisation, train/validation split, data order, noise and dropout
    validation_fraction: float = 0.05  # share of the sequences held out (split by sequence, seeded)
    eval_every: int = 50  # validate every N optimizer steps (and at the end); 0: only at the end
    save_every: int = 100  # checkpoint every N optimizer steps (and at the end); 0: never
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    resume: bool = False  # continue from the newest checkpoint in output_dir/checkpoints
    save_dtype: str = "float32"  # dtype of the saved heads: "float32" | "float16" | "bfloat16"
    # accelerate's autocast for the training steps: "no" | "bf16" (CPUs with AVX512-BF16 or AMX, recent GPUs:
    # 1.6-1.9x cheaper Hydra++ steps measured here) | "fp16" (GPUs); weights, optimizer and validation stay float32
    mixed_precision: str = "no"
    tree: str | None = None  # default draft tree saved with the heads; None: the package default, or a chain
    cpu: bool | None = None  # None: use the CPU when no CUDA device is present (multi-process gloo on CPU)
    # more feature folders (same base), all of them training data: e.g. the base reading ShareGPT's own answers
    extra_features_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_features_dirs", tuple(self.extra_features_dirs))  # a JSON list reads back
        _check_choice("head_arch", self.head_arch, HEAD_ARCHS)
        _check_choice("vocab_projection", self.vocab_projection, VOCAB_PROJECTIONS)
        _check_choice("save_dtype", self.save_dtype, tuple(SAVE_DTYPES))
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        for name in ("num_heads", "num_layers", "batch_size", "gradient_accumulation_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            raise ValueError("Give a positive max_steps, or max_steps=0 and a positive number of epochs.")
        if self.lm_weight < 0 or self.teacher_weight < 0 or self.lm_weight + self.teacher_weight == 0:
            raise ValueError("lm_weight and teacher_weight must be >= 0 and not both 0.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.lr <= 0 or self.head_decay <= 0 or self.noise_alpha < 0 or self.warmup_steps < 0:
            raise ValueError("lr and head_decay must be > 0, noise_alpha and warmup_steps >= 0.")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}.")


@dataclass(frozen=True)
class TrainingReport:
    """What a run did and cost; also written to `training_summary.json`."""

    output_dir: str
    head_arch: str
    steps: int  # optimizer steps done in total (over resumes)
    tokens: int  # training tokens seen in total, all processes together
    train_seconds: float  # time in training steps (no validation, no checkpointing), over resumes
    wall_seconds: float  # wall-clock of this call, everything included
    tokens_per_second: float  # tokens / train_seconds
    num_processes: int
    train_sequences: int
    validation_sequences: int
    draft_vocab_coverage: float | None  # share of the features' targets inside the draft vocabulary
    final_train_loss: float | None  # last step: sum over heads of lm_weight * lm + teacher_weight * teacher
    validation: dict = field(default_factory=dict)  # last validation: per-head top1 / top5 / losses


# --------------------------------------------------------------------------------------------------
# Data: split, order, batches


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


def total_steps(args: TrainingArguments, num_train: int, num_processes: int) -> int:
    """Optimizer steps of the run: max_steps, or enough for `epochs` passes."""
    if args.max_steps > 0:
        return args.max_steps
    micro_per_epoch = (math.ceil(num_train / args.batch_size) // num_processes) or 1
    return max(1, math.ceil(args.epochs * micro_per_epoch / args.gradient_accumulation_steps))


# --------------------------------------------------------------------------------------------------
# Objective


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


# --------------------------------------------------------------------------------------------------
# Schedule, optimizer


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


# --------------------------------------------------------------------------------------------------
# Checkpoints


class Progress:
    """The step counter and running totals; saved in every checkpoint."""

    def __init__(self) -> None:
        self.step, self.tokens, self.train_seconds = 0, 0, 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens, self.train_seconds = int(state["step"]), int(state["tokens"]), state["train_seconds"]


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / CHECKPOINTS_DIR
    found = [p for p in root.glob("step-*") if (p / "done").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> None:
    """accelerate state (heads, optimizer, scheduler, RNG, step counter); `done` marks it complete."""
    path = output_dir / CHECKPOINTS_DIR / f"step-{step:08d}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / "done").write_text(str(step))
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------
# Metrics and plot


class MetricsLog:
    """`metrics.jsonl`, written by the main process only; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= (resume_step or 0)]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Training loss per head, learning rate, validation top-1 / top-5 per head, from `metrics.jsonl`."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed
    except ImportError:
        logger.warning("matplotlib is not installed; skipping the plot of %s", metrics_path)
        return None
    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig = Figure(figsize=(13, 4), layout="constrained")
    loss_ax, lr_ax, acc_ax = fig.subplots(1, 3)
    steps = [r["step"] for r in train]
    for i, losses in enumerate(zip(*[r["head_loss"] for r in train], strict=True)):
        loss_ax.plot(steps, losses, label=f"head {i}")
    loss_ax.set(title="training loss per head", xlabel="step")
    if any(loss > 0 for r in train for loss in r["head_loss"]):  # else no curve to put on a log scale
        loss_ax.set_yscale("log")
    lr_ax.plot(steps, [r["lr"] for r in train])
    lr_ax.set(title="learning rate", xlabel="step")
    eval_steps = [r["step"] for r in evals]
    for i in range(len(evals[0]["top1"]) if evals else 0):
        line = acc_ax.plot(eval_steps, [r["top1"][i] for r in evals], marker="o", label=f"head {i}")[0]
        acc_ax.plot(eval_steps, [r["top5"][i] for r in evals], ls="--", marker="x", color=line.get_color())
    acc_ax.set(title="validation top-1 (o) / top-5 (x) vs base greedy", xlabel="step", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        if ax.lines:
            ax.legend(fontsize=7)
    fig.savefig(out_path, dpi=100)
    return Path(out_path)


# --------------------------------------------------------------------------------------------------
# Validation


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


# --------------------------------------------------------------------------------------------------
# Setup


def load_base(path: str) -> PreTrainedModel:
    """The frozen base, in float32 (only its embedding and lm_head weight are ever used here)."""
    return AutoModelForCausalLM.from_pretrained(assets.local_model_source(path), dtype=torch.float32).eval()


def build_model(
    args: TrainingArguments, base: PreTrainedModel, store: FeatureStore, train_split: Sequence[int]
) -> HydraForCausalLM:
    """Fresh heads on the base, checked against the features' hidden size and vocabulary; a draft vocabulary
    is the most frequent targets of the store's training split (the validation split stays unseen)."""
    d, vocab = base.config.get_text_config().hidden_size, base.get_output_embeddings().weight.shape[0]
    if (store.meta.hidden_size, store.meta.vocab_size) != (d, vocab):
        raise ValueError(
            f"The features in {args.features_dir} come from a model with hidden size {store.meta.hidden_size} and "
            f"vocabulary {store.meta.vocab_size}, but {args.base_model} has {d} and {vocab}: train on features "
            "prepared with this base model."
        )
    draft_ids = None
    if args.vocab_projection in DRAFT_VOCAB_PROJECTIONS:
        if args.draft_vocab_size > vocab:
            raise ValueError(f"draft_vocab_size={args.draft_vocab_size} exceeds the vocabulary ({vocab}).")
        draft_ids = store.most_frequent_targets(args.draft_vocab_size, train_split)
    return HydraForCausalLM.from_base(
        base,
        head_arch=args.head_arch,
        num_heads=args.num_heads,
        draft_token_ids=draft_ids,
        num_layers=args.num_layers,
        dropout=args.dropout,
        vocab_projection=args.vocab_projection,
        tree=args.tree,
    )


def draft_coverage(store: FeatureStore, draft_token_ids: torch.Tensor | None) -> float | None:
    """Share of the features' training targets (assistant tokens) inside the draft vocabulary."""
    if draft_token_ids is None:
        return None
    counts = store.target_token_counts()  # (V,)
    return float(counts[draft_token_ids.cpu()].sum() / counts.sum().clamp(min=1))


def make_accelerator(args: TrainingArguments) -> Accelerator:
    cpu = not torch.cuda.is_available() if args.cpu is None else args.cpu
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)  # buffers (draft ids, shared lm_head) are constant
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=cpu,
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[ddp],
    )


def save_heads(model: HydraForCausalLM, output_dir: Path, dtype: torch.dtype) -> None:
    """Final heads in `dtype` (`from_pretrained` loads them into the base's dtype); the trained heads in
    memory keep their own dtype (a converted copy is saved)."""
    trained = model.heads
    model.heads = copy.deepcopy(trained).to(dtype)
    try:
        model.save_pretrained(output_dir)
    finally:
        model.heads = trained


# --------------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Run:
    """What the loop needs, built once by `_setup`."""

    args: TrainingArguments
    accelerator: Accelerator
    model: HydraForCausalLM
    objective: nn.Module  # HeadsObjective, wrapped by accelerate
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: Progress
    store: FeatureStore  # features_dir: validation, draft vocabulary
    train_data: FeatureCollection  # features_dir's training split, then every extra folder
    embed: nn.Module
    train_indices: list[int]
    val_indices: list[int]
    total: int
    output_dir: Path


def _setup(args: TrainingArguments) -> _Run:
    accelerator = make_accelerator(args)
    output_dir = Path(args.output_dir)
    store = FeatureStore(args.features_dir)
    if int(store.target_token_counts().sum()) == 0:
        raise ValueError(
            f"The features in {args.features_dir} hold no target (assistant) tokens: every answer was cut off by "
            "prepare's --max-length. Prepare again with a larger --max-length."
        )
    train_data = FeatureCollection([store, *(FeatureStore(folder) for folder in args.extra_features_dirs)])
    train_split, val_indices = split_sequences(len(store), args.validation_fraction, args.seed)
    train_indices = train_split + list(range(len(store), len(train_data)))
    set_seed(args.seed)  # identical head initialisation on every process
    base = load_base(args.base_model)
    model = build_model(args, base, store, train_split)
    objective = HeadsObjective(model.heads, store.meta.vocab_size, args).train()
    optimizer = make_optimizer(objective, args)
    total = total_steps(args, len(train_indices), accelerator.num_processes)
    scheduler = make_scheduler(optimizer, args, total)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    progress = Progress()
    accelerator.register_for_checkpointing(scheduler, progress)
    set_seed(args.seed + accelerator.process_index)  # noise and dropout differ across processes
    embed = base.get_input_embeddings().to(accelerator.device)
    return _Run(
        args=args,
        accelerator=accelerator,
        model=model,
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=progress,
        store=store,
        train_data=train_data,
        embed=embed,
        train_indices=train_indices,
        val_indices=val_indices,
        total=total,
        output_dir=output_dir,
    )


def _maybe_resume(run: _Run) -> int | None:
    """Load the newest checkpoint when `resume` asks for one; the step it holds (None: fresh start)."""
    found = checkpoint_dirs(run.output_dir)
    if found and not run.args.resume:
        raise ValueError(
            f"{run.output_dir} holds checkpoints of an earlier run ({found[-1].name}); pass resume=True to continue "
            "it, or choose a new output_dir."
        )
    if not found:
        if run.args.resume:
            logger.warning("resume=True but %s has no checkpoint; starting from scratch", run.output_dir)
        return None
    run.accelerator.load_state(str(found[-1]))
    logger.info("Resumed from %s (step %d)", found[-1], run.progress.step)
    return run.progress.step


def _write_args(run: _Run) -> None:
    path = run.output_dir / ARGS_FILE
    if path.is_file() and run.args.resume:
        before, now = json.loads(path.read_text()), json.loads(json.dumps(asdict(run.args)))
        changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v and k != "resume"}
        if changed:
            logger.warning("Resuming with changed arguments (before, now): %s", changed)
    path.write_text(json.dumps(asdict(run.args), indent=2))


def _train_step(run: _Run, micro_batches: Iterator[tuple[int, list[int]]]) -> dict:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; its metrics (all processes)."""
    acc, args = run.accelerator, run.args
    head_loss, lm, teacher, counts = [], [], [], torch.zeros(3, args.num_heads)
    tokens, epoch = 0, 0
    for _ in range(args.gradient_accumulation_steps):
        epoch, indices = next(micro_batches)
        batch = collate([run.train_data.sequence(i) for i in indices]).to(acc.device)
        with acc.accumulate(run.objective):
            with torch.no_grad():
                token_embeds = run.embed(batch.input_ids)  # (B, T, d)
            losses = run.objective(batch, token_embeds).losses
            acc.backward(losses.total)
            if acc.sync_gradients and args.max_grad_norm > 0:
                acc.clip_grad_norm_(run.objective.parameters(), args.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad()
        head_loss.append(args.lm_weight * losses.lm.detach() + args.teacher_weight * losses.teacher.detach())
        lm.append(losses.lm.detach())
        teacher.append(losses.teacher.detach())
        counts += torch.stack([losses.lm_count, losses.lm_excluded, losses.teacher_count]).cpu()
        tokens += batch.num_tokens
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    stats = torch.stack([torch.stack(x).mean(0) for x in (head_loss, lm, teacher)]).to(acc.device)  # (3, H)
    stats = acc.reduce(stats, reduction="mean")
    counts, tokens_all = (acc.reduce(x.to(acc.device), reduction="sum") for x in (counts, torch.tensor(tokens)))
    return {
        "head_loss": stats[0].tolist(),
        "lm_loss": stats[1].tolist(),
        "teacher_loss": stats[2].tolist(),
        "lm_coverage": float(counts[0].sum() / (counts[0].sum() + counts[1].sum()).clamp(min=1)),
        "lr": lr,
        "epoch": epoch,
        "tokens": int(tokens_all),
    }


def _validate(run: _Run, metrics: MetricsLog) -> dict:
    if not run.val_indices:
        return {}
    result = evaluate(
        run.accelerator.unwrap_model(run.objective),
        run.store,
        run.val_indices,
        run.embed,
        run.args.batch_size,
        run.accelerator,
    )
    metrics.write({"kind": "eval", "step": run.progress.step, **result})
    top1 = ", ".join(f"{x:.3f}" for x in result["top1"])
    logger.info("step %d validation top-1 per head: %s", run.progress.step, top1)
    return result


def _loop(run: _Run, metrics: MetricsLog) -> tuple[dict, float | None]:
    args, acc, progress = run.args, run.accelerator, run.progress
    skip = progress.step * args.gradient_accumulation_steps
    stream = micro_batch_stream(
        run.train_indices, args.batch_size, args.seed, acc.num_processes, acc.process_index, skip=skip
    )
    bar = tqdm(
        total=run.total,
        initial=progress.step,
        desc=f"train {args.head_arch}",
        unit="step",
        disable=not acc.is_local_main_process,
    )
    validation, last_loss = {}, None
    while progress.step < run.total:
        start = time.perf_counter()
        record = _train_step(run, stream)
        progress.train_seconds += time.perf_counter() - start
        progress.step += 1
        progress.tokens += record["tokens"]
        last_loss = sum(record["head_loss"])
        metrics.write({"kind": "train", "step": progress.step, **record})
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{progress.tokens / progress.train_seconds:.0f}")
        if args.eval_every and progress.step % args.eval_every == 0 and progress.step < run.total:
            validation = _validate(run, metrics)
        if args.save_every and (progress.step % args.save_every == 0 or progress.step == run.total):
            save_checkpoint(acc, run.output_dir, progress.step, args.keep_checkpoints)
    bar.close()
    return validation, last_loss


def train(args: TrainingArguments) -> TrainingReport:
    """Train draft heads on a feature folder; write the heads and the run's records to `args.output_dir`.

    Under `accelerate launch` it ends the process group when done: one call per launched process."""
    wall_start = time.perf_counter()
    run = _setup(args)
    acc = run.accelerator
    if acc.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    resumed = _maybe_resume(run)
    metrics = MetricsLog(run.output_dir / METRICS_FILE, acc.is_main_process, resumed)
    if acc.is_main_process:
        _write_args(run)
    validation, last_loss = _loop(run, metrics)
    validation = _validate(run, metrics) or validation
    report = TrainingReport(
        output_dir=str(run.output_dir),
        head_arch=args.head_arch,
        steps=run.progress.step,
        tokens=run.progress.tokens,
        train_seconds=run.progress.train_seconds,
        wall_seconds=time.perf_counter() - wall_start,
        tokens_per_second=run.progress.tokens / run.progress.train_seconds if run.progress.train_seconds else 0.0,
        num_processes=acc.num_processes,
        train_sequences=len(run.train_indices),
        validation_sequences=len(run.val_indices),
        draft_vocab_coverage=draft_coverage(run.store, run.model.heads.draft_token_ids),
        final_train_loss=last_loss,
        validation=validation,
    )
    if acc.is_main_process:
        _finish(run, report)
    acc.wait_for_everyone()
    _end_process_group(acc)
    return report


def _end_process_group(acc: Accelerator) -> None:
    """Multi-process runs: destroy the process group while the interpreter is fully alive. gloo's worker threads
    free the last collectives' tensors after those return, and freeing a tensor that Python holds needs the GIL:
    left to interpreter exit that can abort a process (SIGABRT), and right after the last barrier it can deadlock
    with the process group's destructor (which joins the workers holding the GIL). The pause lets them finish."""
    if acc.num_processes > 1:
        time.sleep(GLOO_SETTLE_SECONDS)  # releases the GIL to the worker threads
        acc.end_training()


def _finish(run: _Run, report: TrainingReport) -> None:
    """Main process: heads in `save_dtype`, summary JSON, plot."""
    summary = {**asdict(report), "args": asdict(run.args)}
    (run.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    command = read_preparation(run.args.features_dir)
    if command is not None:  # how the features were made: the model card's reproduce section shows it
        extra = [read_preparation(folder) for folder in run.args.extra_features_dirs]
        record = {"command": command, **({"extra_commands": extra} if extra else {})}
        (run.output_dir / PREPARATION_FILE).write_text(json.dumps(record, indent=2))
    save_heads(run.model, run.output_dir, SAVE_DTYPES[run.args.save_dtype])  # also writes the model card
    with contextlib.suppress(ValueError, KeyError):  # an empty or foreign metrics file: no plot, no failure
        plot_metrics(run.output_dir / METRICS_FILE, run.output_dir / PLOT_FILE)
    logger.info(
        "Trained %s heads: %d steps, %d tokens at %.0f tokens/s; saved to %s",
        report.head_arch,
        report.steps,
        report.tokens,
        report.tokens_per_second,
        run.output_dir,
    )
