"""The run's record on disk: `metrics.jsonl` (one line per training step and per validation) and its plot.

Only the main process writes. On resume the lines past the checkpoint's step are dropped, so the log reads as one
uninterrupted run. The plot reads the log alone (it can be redrawn after the run) and is skipped without
matplotlib.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"


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
