"""The Markdown table of an `hf-hydra bench` report (a JSON-able dict): what the README, the model cards and
the CLI show. Pure formatting: it imports no model, so the model-card writer can use it."""

from __future__ import annotations

AUTOREGRESSIVE = "autoregressive"  # plain `generate` on the stock base: the reference of every speed-up
# the "benchmark" key of a batch benchmark report (`hf-hydra bench --batch-size`): another layout than the
# per-prompt reports this module, bench-merge and model cards read
BATCH_BENCHMARK = "batch"


def check_per_prompt_report(report: dict, path: object) -> None:
    """A ValueError naming what to do when `report` is a batch benchmark report."""
    if report.get("benchmark") == BATCH_BENCHMARK:
        raise ValueError(
            f"{path} is a batch benchmark report (`hf-hydra bench --batch-size`), which has its own table and no "
            "shards; bench-merge and model cards take a per-prompt `hf-hydra bench` report (without --batch-size)."
        )

def markdown_table(report: dict) -> str:
    """The summary of a bench JSON as a Markdown table (what README and model cards show)."""
    settings, machine = report["settings"], report["machine"]
    temperature = settings.get("temperature")
    decoding = "greedy" if temperature is None else f"sampling at temperature {temperature}"
    quality = "mismatches" if temperature is None else "log-likelihood / token"
    lines = [
        f"MT-Bench turn {settings['turn']}, {settings['num_prompts']} prompts, {decoding}, "
        f"{settings['max_new_tokens']} new tokens; {machine['device']} ({_processor_text(machine)}, "
        f"{machine['torch_threads']} threads{_shards_text(settings)}), torch {machine['torch']}, "
        f"transformers {machine['transformers']}.{_prepacked_text(settings)}",
        "",
        f"| method | tau | tokens/s | speed-up (median) | speed-up (overall) | {quality} | drafting + bookkeeping "
        "| drafts from context |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in report["summary"]:
        tau = f"{s['tau']:.2f}" if s["tau"] is not None else "-"
        shares = s.get("step_time_shares")
        overhead = f"{1 - shares['verify']:.0%} of a step" if shares else "-"
        check = s["mismatches"] if temperature is None else f"{s['mean_log_likelihood']:.3f}"
        context = f"{s['context_share']:.0%}" if s.get("context_share") is not None else "-"
        lines.append(
            f"| {s['method']} | {tau} | {s['tokens_per_second']:.1f} | {s['speedup_median']:.2f}x "
            f"| {s['speedup_total']:.2f}x | {check} | {overhead} | {context} |"
        )
    return "\n".join(lines) + "\n"


def _processor_text(machine: dict) -> str:
    cpu = machine.get("cpu")  # absent from reports written before it was recorded
    cores = f", {machine['cpu_count']} cores" if machine.get("cpu_count") else ""
    level = machine.get("cpu_vector_level")  # absent from reports written before it was recorded
    vector = f", {level}" if level else ""
    return f"{cpu} {machine['processor']}{cores}{vector}" if cpu else machine["processor"]


def _prepacked_text(settings: dict) -> str:
    if not settings.get("prepacked"):
        return ""
    dtypes = sorted({dtype for dtype in (settings.get("heads_prepacked") or {}).values() if dtype})
    heads = f", the heads' computing in {' / '.join(dtypes)}" if dtypes else ""
    layers = PACKED_LAYERS.get(settings.get("kernel") or "onednn", settings.get("kernel"))
    return (
        f" Every method but `{AUTOREGRESSIVE}` (plain `generate`, stock kernels: the reference) runs on the base "
        f"with {layers}{heads}."
    )


# the packed base's kernel (`PrepackReport.kernel`); reports written before the choice existed used oneDNN's
PACKED_LAYERS = {
    "onednn": "oneDNN-prepacked linear layers",
    "panel": "panel-packed linear layers (`hf_hydra.cpu_kernels`)",
}


def _shards_text(settings: dict) -> str:
    shards = settings.get("shards") or 1
    return f" per process, {shards} processes side by side" if shards > 1 else ""
