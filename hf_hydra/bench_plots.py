"""Plots of an `hf-hydra bench` report: speed-up per MT-Bench category and acceptance rate per tree depth.

Apart from the runs so that it needs only the report (a JSON-able dict) and matplotlib, which is imported
when a plot is drawn: the benchmark itself and everything that imports it run without it.
"""

from __future__ import annotations

from pathlib import Path

from .bench_table import AUTOREGRESSIVE


def plot_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Speed-up per category and method, and acceptance rate per tree depth, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    summaries = [s for s in report["summary"] if s["method"] != AUTOREGRESSIVE]
    categories = sorted({c for s in summaries for c in s["speedup_by_category"]})
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(len(summaries), 1)
    for i, s in enumerate(summaries):
        xs = [c + i * width for c in range(len(categories))]
        ax.bar(xs, [s["speedup_by_category"].get(c, 0.0) for c in categories], width, label=s["method"])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(categories))], categories, rotation=20)
    ax.set_ylabel("speed-up vs autoregressive (median)")
    ax.legend()
    speedup_png = out_dir / "speedup_by_category.png"
    fig.tight_layout()
    fig.savefig(speedup_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summaries:
        if s["acceptance_by_depth"]:
            depths = range(1, len(s["acceptance_by_depth"]) + 1)
            ax.plot(depths, s["acceptance_by_depth"], marker="o", label=s["method"])
    ax.set_xlabel("tree depth")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1)
    ax.legend()
    acceptance_png = out_dir / "acceptance_by_depth.png"
    fig.tight_layout()
    fig.savefig(acceptance_png, dpi=120)
    plt.close(fig)
    return [speedup_png, acceptance_png]
