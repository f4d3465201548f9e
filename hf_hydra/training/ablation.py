"""The ablation table: what each training choice buys, generated from the runs' logs and one benchmark.

Each row is one trained heads folder (its `training_summary.json`: arch, losses, validation top-1 per
head) joined with the benchmark JSON of `hf-hydra bench`, where the same heads ran under the same label
(tau and speed-up on MT-Bench, greedy, on the trees that benchmark used: `bench --tree` for one tree for all).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..bench import AUTOREGRESSIVE
from ..tree import DYNAMIC_TREE
from .trainer import SUMMARY_FILE


@dataclass(frozen=True)
class AblationRow:
    label: str  # the method label of the heads in the benchmark
    head_arch: str
    losses: str  # "lm", "teacher" or "lm + teacher"
    noise_alpha: float
    num_layers: int
    steps: int
    validation_top1: list[float]  # per head, against the base's greedy token
    tau: float | None  # mean tokens per base forward on MT-Bench (None: not in the benchmark)
    speedup_median: float | None


def ablation_rows(runs: dict[str, str | Path], bench_report: dict) -> list[AblationRow]:
    """One row per `label -> heads folder`, in the given order."""
    summaries = {s["method"]: s for s in bench_report["summary"] if s["method"] != AUTOREGRESSIVE}
    rows = []
    for label, folder in runs.items():
        path = Path(folder) / SUMMARY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder} is not the output folder of `hf-hydra train`.")
        summary = json.loads(path.read_text())
        args = summary["args"]
        losses = [name for name in ("lm", "teacher") if args[f"{name}_weight"] > 0]
        bench = summaries.get(label)
        rows.append(
            AblationRow(
                label=label,
                head_arch=args["head_arch"],
                losses=" + ".join(losses),
                noise_alpha=args["noise_alpha"],
                num_layers=args["num_layers"],
                steps=summary["steps"],
                validation_top1=summary["validation"]["top1"],
                tau=None if bench is None else bench["tau"],
                speedup_median=None if bench is None else bench["speedup_median"],
            )
        )
    return rows


def markdown_ablation(rows: list[AblationRow], bench_report: dict) -> str:
    """The rows as a Markdown table, with the benchmark's settings in its caption."""
    settings = bench_report["settings"]
    heads = max((len(r.validation_top1) for r in rows), default=0)
    lines = [
        f"Validation top-1 per head (held-out ShareGPT, vs the base's greedy token); tau and speed-up on MT-Bench "
        f"turn {settings['turn']}, {settings['num_prompts']} prompts, greedy, {settings['max_new_tokens']} new "
        f"tokens, {_trees_text(settings.get('trees') or {})}.",
        "",
        "| heads | arch | loss | noise | layers | steps | " + " | ".join(f"top-1 head {i}" for i in range(heads))
        + " | tau | speed-up |",
        "|" + "---|" * (8 + heads),
    ]
    for r in rows:
        top1 = [f"{x:.3f}" for x in r.validation_top1] + ["-"] * (heads - len(r.validation_top1))
        tau = "-" if r.tau is None else f"{r.tau:.2f}"
        speedup = "-" if r.speedup_median is None else f"{r.speedup_median:.2f}x"
        lines.append(
            f"| {r.label} | {r.head_arch} | {r.losses} | {r.noise_alpha:g} | {r.num_layers} | {r.steps} | "
            + " | ".join(top1)
            + f" | {tau} | {speedup} |"
        )
    return "\n".join(lines) + "\n"


def _trees_text(trees: dict[str, list | str]) -> str:
    """'one N-node tree for all heads' when the benchmark used one tree (`bench --tree`), else each set's own."""
    distinct = {json.dumps(paths) for paths in trees.values()}
    if distinct == {json.dumps(DYNAMIC_TREE)}:
        return "dynamic trees for all heads"
    if len(distinct) == 1:
        return f"one {len(next(iter(trees.values())))}-node tree for all heads"
    return "each heads' default tree"
