"""Checkpoints for `resume=True`: accelerate's full state plus the run's step counter and running totals.

A checkpoint counts only once its `done` marker is written after every process has saved its share, so a run
stopped mid-save resumes from the previous complete one; only the newest `keep_checkpoints` are kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator

CHECKPOINTS_DIR = "checkpoints"


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
