"""Checkpoints for `resume=True`: accelerate's full state plus the run's step counter and running totals.

A checkpoint counts only once its `done` marker is written after every process has saved its share, so a run
stopped mid-save resumes from the previous complete one; only the newest `keep_checkpoints` are kept.

When to save: every `save_every` steps, at the last step, and when `save_every_minutes` have passed. Saving is a
collective (every process writes its share, then waits for the others), so all processes must decide alike: the
step rules are the same everywhere, and the time rule reads the main process's clock alone and broadcasts its
answer (processes reading their own clocks could disagree by a step, and one saving alone waits forever).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

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


class SaveTimer:
    """Wall time since the last checkpoint, on the main process's clock. `clock` returns seconds (default
    `time.monotonic`; tests pass their own); it is read once at the start and once per step (`tick`)."""

    def __init__(self, minutes: float, is_main: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.is_main, self.clock = minutes * 60, is_main, clock
        self.now = self.last = clock() if is_main else 0.0

    def tick(self) -> None:
        if self.is_main:
            self.now = self.clock()

    def due(self) -> bool:
        """Main process: the time is up (as of the last tick); other processes: False (only main's answer counts)."""
        return self.is_main and self.seconds > 0 and self.now - self.last >= self.seconds

    def saved(self) -> None:
        self.last = self.now


def main_process_says(accelerator: Accelerator, answer: bool) -> bool:
    """The main process's `answer`, on every process (a collective: every process must call it at the same step)."""
    flag = torch.tensor([int(answer)], device=accelerator.device)
    return bool(broadcast(flag, from_process=0).item())


def checkpoint_due(accelerator: Accelerator, step: int, total: int, save_every: int, timer: SaveTimer) -> bool:
    """Save at `step`? At the last step (when checkpoints are on at all), every `save_every` steps, or when the
    main process's `timer` is due. The same answer on every process."""
    if save_every == 0 and timer.seconds == 0:
        return False
    if step == total or (save_every and step % save_every == 0):
        return True
    return timer.seconds > 0 and main_process_says(accelerator, timer.due())
