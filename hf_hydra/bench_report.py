"""An `hf-hydra bench` report's files and shards: writing the JSON with the Markdown table and plots beside it,
and merging the reports of processes that ran side by side (`--shard I/N`) into one.

Apart from the runs (bench.py) because these start from a finished report: `hf-hydra bench-merge` only reads
JSONs, recomputes the summary with `bench.summarize` and writes the same files a single run writes.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .bench import PromptResult, summarize
from .bench_plots import plot_report
from .bench_table import AUTOREGRESSIVE, check_per_prompt_report, markdown_table


def merge_reports(reports: Sequence[dict]) -> dict:
    """One report from the shards of one benchmark (same settings and machine, disjoint questions)."""
    for index, report in enumerate(reports):
        check_per_prompt_report(report, f"report {index + 1}")
    first = reports[0]
    same = ("methods", "max_new_tokens", "turn", "temperature", "seed", "trees", "static_trees", "prepacked",
            "heads_prepacked")
    for other in reports[1:]:
        differing = [k for k in same if other["settings"].get(k) != first["settings"].get(k)]
        if differing or other["machine"] != first["machine"]:
            raise ValueError(f"These reports are not shards of one benchmark: they differ in {differing or 'machine'}.")
    results = [PromptResult(**row) for report in reports for row in report["results"]]
    ids = [r.question_id for r in results if r.method == AUTOREGRESSIVE]
    if len(ids) != len(set(ids)):
        raise ValueError("The reports share questions; merge the shards of one `--shard I/N` benchmark only.")
    settings = {
        **first["settings"],
        "num_prompts": len(ids),
        "shards": len(reports),  # processes that ran side by side, each on its own questions
    }
    return {
        **first,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "results": [asdict(r) for r in results],
        "summary": [asdict(s) for s in summarize(results, settings["methods"], settings["tree_depths"])],
    }


def write_report(report: dict, json_path: str | Path) -> list[Path]:
    """Write the JSON, and beside it the Markdown table and the plots generated from it."""
    written = write_json_and_table(report, json_path, markdown_table(report))
    return [*written, *plot_report(report, written[0].parent)]


def write_json_and_table(report: dict, json_path: str | Path, table: str) -> list[Path]:
    """Write a report's JSON and, beside it (.md), its Markdown `table`; the two paths."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1))
    table_path = json_path.with_suffix(".md")
    table_path.write_text(table)
    return [json_path, table_path]
