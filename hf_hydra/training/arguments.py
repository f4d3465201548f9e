"""What one training run is asked to do: `TrainingArguments`, checked when it is built.

A module of its own because every part of training reads the arguments (the objective its loss weights, the
schedule its step counts and learning rate, the loop all the rest) while they depend on none of those parts; the
CLI derives one `--option` per field from it without importing the training loop. A run stores its arguments
in `output_dir/training_args.json`; `continued_options` reads them back, so `hf-hydra train --output-dir DIR
--resume` alone continues a run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..configuration_hydra import VOCAB_PROJECTIONS
from ..head_archs import DEFAULT_HEAD_ARCH, HEAD_ARCHS

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIXED_PRECISIONS = ("no", "bf16", "fp16")
ARGS_FILE = "training_args.json"  # in output_dir: the arguments of the run's latest start (or resume)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingArguments:
    """Everything one training run needs. Defaults: a cheap step (draft vocabulary of 8,192 words, teacher
    from the cache) and the Hydra++ recipe where it fits this hardware (method.md section 2)."""

    features_dir: str  # a folder written by `prepare_features`; validation and the draft vocabulary come from it
    output_dir: str  # heads, metrics, plot, summary and checkpoints go here
    base_model: str  # path or id of the frozen base the features were computed with
    head_arch: str = DEFAULT_HEAD_ARCH  # one of `hf_hydra.head_archs.HEAD_ARCHS`
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
    # Checkpoints (output_dir/checkpoints): every save_every optimizer steps (0: not by steps) and whenever
    # save_every_minutes of wall time have passed since the last one (0: not by time), whichever comes first;
    # the last step too when either is on, so a finished run can be extended
    save_every: int = 100
    save_every_minutes: float = 10.0
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    # continue from the newest checkpoint in output_dir/checkpoints; a larger max_steps or epochs extends the run,
    # and the learning rate then follows the new, longer schedule from the step reached
    resume: bool = False
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
        if self.save_every < 0 or self.save_every_minutes < 0:
            raise ValueError("save_every and save_every_minutes must be >= 0 (0 turns that trigger off).")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}.")


def continued_options(given: dict) -> dict:
    """The options of `hf-hydra train`: those `given` on the command line (the ones not None), over the arguments
    stored in `output_dir/training_args.json` when `resume` continues a run there. So `--output-dir DIR
    --resume` alone continues DIR's run as it was started, and e.g. `--max-steps N` or `--epochs E` beside it
    extends a finished run (its learning-rate schedule becomes the new, longer one from the step reached;
    `--epochs` alone also drops a stored max_steps, which would otherwise set the length)."""
    path = Path(given["output_dir"]) / ARGS_FILE
    if not (given.get("resume") and path.is_file()):
        if "features_dir" in given:
            return given
        if given.get("resume"):
            raise ValueError(
                f"--resume found no {ARGS_FILE} in {given['output_dir']}, so there is no run to continue there: "
                "pass the --output-dir of an earlier `hf-hydra train` run, or start a run in this folder with "
                "--features-dir FOLDER (and --base-model and the other options it needs)."
            )
        raise ValueError(
            "Pass --features-dir FOLDER (a folder written by `hf-hydra prepare`), or --resume to continue "
            "the run in --output-dir."
        )
    stored = json.loads(path.read_text())
    known = {f.name for f in fields(TrainingArguments)}
    unknown = sorted(set(stored) - known)
    if unknown:
        logger.warning("Ignoring arguments in %s that this version does not know: %s", path, unknown)
    options = {k: v for k, v in stored.items() if k in known} | given
    if "epochs" in given and "max_steps" not in given:
        options["max_steps"] = 0  # --epochs alone sets the length: a stored max_steps would override it
    return options
