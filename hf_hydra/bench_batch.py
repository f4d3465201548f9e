"""Batch benchmark (`hf-hydra bench --batch-size 1,2,4,8`): total generated tokens per second of speculative
decoding against plain batched `generate`, per batch size, on MT-Bench prompts of different lengths.

For each batch size B the prompts are taken in consecutive groups of B and LEFT-padded with the tokenizer's pad
token (its eos where it has none), as batched `generate` expects. Every method runs on the same padded batch,
interleaved, greedy, in one process after a warm-up at that B: plain batched `generate` on the stock base (the
reference), on the prepacked base where there is one, and each heads set's `generate(speculative=True)` with its
default tree and sources (`hf_hydra.batch_decoding`: each row drafts its own tree, one base forward verifies
them all). A row's tokens count up to and including its EOS, not the padding after it; each row is checked
against the reference's row token for token. tau is tokens per batched base forward (all rows together),
the row tau tokens per step of one row: the single-prompt benchmark's tau.

The same prompts serve every batch size (the first multiple of every B), so tokens/s compare across B as well
as across methods. One JSON holds everything; the Markdown table is generated from it. The per-prompt benchmark
is `hf_hydra.bench`, whose prompts, machine record and timing this module reuses.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .bench import AUTOREGRESSIVE_PREPACKED, bench_prompts, machine_info, timed
from .bench_report import write_json_and_table
from .bench_table import AUTOREGRESSIVE, BATCH_BENCHMARK, PACKED_LAYERS
from .modeling_hydra import HydraForCausalLM
from .prepack import dtype_name, packed_kernel
from .sequence_steps import SpeculationStats

SCHEMA_VERSION = 1
WARM_UP_TOKENS = 8

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOutput:
    """One method's generate call on a batch."""

    sequences: torch.Tensor  # (B, L + n) padded with pad_token_id after a row finished
    speculation: SpeculationStats | None  # the rows summed, steps = batched forwards (None: plain decoding)
    per_row: tuple[SpeculationStats, ...] | None  # each row's own (None: plain decoding)


BatchRunner = Callable[[torch.Tensor, torch.Tensor, int], BatchOutput]  # (input_ids, attention_mask, n) -> output


@dataclass(frozen=True)
class BatchResult:
    """One method on one batch of prompts."""

    batch_size: int
    batch_index: int  # which group of `batch_size` consecutive prompts
    question_ids: list[int]  # its rows' questions, in row order
    prompt_lengths: list[int]  # each row's prompt tokens before padding
    method: str
    row_new_tokens: list[int]  # per row: generated tokens up to and including its EOS (no padding)
    seconds: float
    row_identical: list[bool]  # per row: the same tokens as the reference's row (greedy)
    steps: int | None  # batched base forwards after the prefill (tree methods)
    tau: float | None  # tokens appended per batched forward, all rows together (tree methods)
    row_steps: list[int] | None  # per row: the forwards it took part in (tree methods)
    row_tau: list[float | None] | None  # per row: tokens per step of that row; None where it took none

    @property
    def new_tokens(self) -> int:
        return sum(self.row_new_tokens)


@dataclass(frozen=True)
class BatchSizeSummary:
    """One method at one batch size, over every batch of that size."""

    batch_size: int
    method: str
    batches: int
    new_tokens: int
    tokens_per_second: float  # all new tokens / all seconds
    speedup_median: float  # median over batches of (method tokens/s / autoregressive tokens/s on the same batch)
    speedup_total: float  # tokens_per_second / autoregressive tokens_per_second at this batch size
    tau: float | None  # tokens per batched forward over the batches (all rows together; tree methods)
    row_tau: float | None  # tokens per step of a row over every row: comparable with single-prompt tau
    mismatches: int  # rows differing from the autoregressive row


def batch_runners(
    base: PreTrainedModel,
    heads: dict[str, HydraForCausalLM],
    methods: Sequence[str],
    pad_token_id: int,
    prepacked_base: PreTrainedModel | None = None,
) -> dict[str, BatchRunner]:
    """A greedy batch runner per method: `autoregressive` (plain `generate` on `base`), `autoregressive_prepacked`
    (on `prepacked_base`, where given) and a key of `heads` (`generate(speculative=True)` with those heads'
    default tree and sources). Finished rows are padded with `pad_token_id`."""
    known = [AUTOREGRESSIVE, *([AUTOREGRESSIVE_PREPACKED] if prepacked_base is not None else []), *heads]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"Unknown batch methods {unknown}; choose among {known} (heads by their --heads label).")
    options = {"do_sample": False, "pad_token_id": pad_token_id}
    runners: dict[str, BatchRunner] = {}
    for method in methods:
        if method == AUTOREGRESSIVE:
            runners[method] = functools.partial(_plain, base, options)
        elif method == AUTOREGRESSIVE_PREPACKED:
            runners[method] = functools.partial(_plain, prepacked_base, options)
        else:
            runners[method] = functools.partial(_speculative, heads[method], options)
    return runners


def _plain(model: PreTrainedModel, options: dict, ids: torch.Tensor, mask: torch.Tensor, n: int) -> BatchOutput:
    return BatchOutput(model.generate(ids, attention_mask=mask, max_new_tokens=n, **options), None, None)


def _speculative(model: HydraForCausalLM, options: dict, ids: torch.Tensor, mask: torch.Tensor, n: int) -> BatchOutput:
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=n, speculative=True, return_dict_in_generate=True, **options
    )
    speculation = getattr(out, "speculation", None)  # None: it decoded plainly (heads fitted where no tree pays)
    per_row = getattr(out, "speculation_per_row", None)  # None for one prompt: its statistics are the row's
    if per_row is None and speculation is not None:
        per_row = (speculation,)
    return BatchOutput(out.sequences, speculation, per_row)


def pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that fills padding: the tokenizer's pad token, else its eos (as `generate` falls back to)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token: set tokenizer.pad_token to batch prompts.")
    return pad


def left_pad(prompts: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (1, L_i) -> input_ids and attention_mask (B, max L_i), padded on the left as batched decoding
    expects (every row's last token at the end)."""
    longest = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=prompts[0].dtype, device=prompts[0].device)
    mask = torch.zeros_like(ids)  # (B, L)
    for row, prompt in enumerate(prompts):
        ids[row, longest - prompt.shape[1] :] = prompt[0]
        mask[row, longest - prompt.shape[1] :] = 1
    return ids, mask


def generated_lengths(new_tokens: torch.Tensor, eos_token_ids: Sequence[int]) -> list[int]:
    """Per row of new_tokens (B, n): the tokens up to and including its first EOS, all n without one."""
    lengths = []
    for row in new_tokens.tolist():
        ends = [i for i, token in enumerate(row) if token in eos_token_ids]
        lengths.append(ends[0] + 1 if ends else len(row))
    return lengths


def eos_ids(model: PreTrainedModel) -> list[int]:
    """The eos token ids `generate` stops at by default (none for a model without one)."""
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def common_prompt_count(available: int, batch_sizes: Sequence[int]) -> int:
    """The most prompts every batch size splits into full batches: a multiple of all of them."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}.")
    step = math.lcm(*batch_sizes)
    if available < step:
        raise ValueError(
            f"{available} prompts cannot fill whole batches of every size {list(batch_sizes)}: pass --limit of a "
            f"multiple of {step} (or more questions)."
        )
    return available - available % step


def run_batch_bench(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    heads: dict[str, HydraForCausalLM],
    questions: Sequence[dict],
    batch_sizes: Sequence[int],
    methods: Sequence[str] | None = None,
    max_new_tokens: int = 256,
    turn: int = 1,
    prepacked_base: PreTrainedModel | None = None,
) -> dict:
    """Every method on every batch of every size, interleaved per batch, after a warm-up at each size; the
    report as a dict. methods: default the reference, `autoregressive_prepacked` with a `prepacked_base`,
    and every heads set; the reference always runs first."""
    if turn not in (1, 2):
        raise ValueError(f"turn must be 1 or 2, got {turn}.")
    count = common_prompt_count(len(questions), batch_sizes)
    if count < len(questions):
        logger.warning("Benchmarking %d of %d prompts: whole batches of every size %s.", count, len(questions),
                       list(batch_sizes))  # fmt: skip
    if methods is None:
        methods = [AUTOREGRESSIVE, *([AUTOREGRESSIVE_PREPACKED] if prepacked_base is not None else []), *heads]
    methods = [AUTOREGRESSIVE] + [m for m in methods if m != AUTOREGRESSIVE]
    pad = pad_token(tokenizer)
    runners = batch_runners(base, heads, methods, pad, prepacked_base)
    prompts = bench_prompts(tokenizer, base, questions[:count], turn, max_new_tokens)
    results = []
    for batch_size in batch_sizes:
        results += _bench_batch_size(runners, prompts, batch_size, max_new_tokens, pad, eos_ids(base))
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": BATCH_BENCHMARK,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(base.device),
        "settings": {
            "methods": methods,
            "batch_sizes": list(batch_sizes),
            "max_new_tokens": max_new_tokens,
            "turn": turn,
            "num_prompts": count,
            "pad_token_id": pad,
            "padding_side": "left",
            "temperature": None,  # greedy
            "trees": {label: model.generation_config.hydra_tree for label, model in heads.items()},
            "prepacked": prepacked_base is not None,
            "kernel": packed_kernel(prepacked_base) if prepacked_base is not None else None,
            "heads_prepacked": {label: dtype_name(model.heads.prepacked_dtype) for label, model in heads.items()},
        },
        "results": [asdict(r) for r in results],
        "summary": [asdict(s) for s in summarize_batches(results, batch_sizes, methods)],
    }


def _bench_batch_size(
    runners: dict[str, BatchRunner],
    prompts: Sequence[tuple[dict, torch.Tensor]],
    batch_size: int,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
) -> list[BatchResult]:
    """Every batch of `batch_size` consecutive prompts, after a warm-up on the first (first calls at a new
    shape pay for allocation and lazy initialisation)."""
    groups = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    first_ids, first_mask = left_pad([ids for _, ids in groups[0]], pad_token_id)
    for runner in runners.values():
        runner(first_ids, first_mask, WARM_UP_TOKENS)
    results = []
    for index, group in enumerate(tqdm(groups, desc=f"bench batch {batch_size}", unit="batch")):
        results += _bench_batch(runners, group, batch_size, index, max_new_tokens, pad_token_id, eos_token_ids)
    return results


def _bench_batch(
    runners: dict[str, BatchRunner],
    group: Sequence[tuple[dict, torch.Tensor]],
    batch_size: int,
    index: int,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
) -> list[BatchResult]:
    """Every method on one padded batch, timed; each row checked against the first method's (the reference)."""
    ids, mask = left_pad([prompt for _, prompt in group], pad_token_id)  # (B, L)
    reference: list[list[int]] | None = None
    results = []
    for method, runner in runners.items():
        out, seconds = timed(functools.partial(runner, ids, mask, max_new_tokens), ids.device)
        new_tokens = out.sequences[:, ids.shape[1] :]  # (B, n)
        lengths = generated_lengths(new_tokens, eos_token_ids)
        rows = [row[:length] for row, length in zip(new_tokens.tolist(), lengths, strict=True)]
        reference = rows if reference is None else reference
        results.append(
            BatchResult(
                batch_size=batch_size,
                batch_index=index,
                question_ids=[question["question_id"] for question, _ in group],
                prompt_lengths=[prompt.shape[1] for _, prompt in group],
                method=method,
                row_new_tokens=lengths,
                seconds=seconds,
                row_identical=[row == ref for row, ref in zip(rows, reference, strict=True)],
                **_speculation_fields(out),
            )
        )
    return results


def _speculation_fields(out: BatchOutput) -> dict:
    """steps, tau, row_steps and row_tau of a tree method's output; None each for plain decoding."""
    if out.speculation is None or out.per_row is None:
        return {"steps": None, "tau": None, "row_steps": None, "row_tau": None}
    return {
        "steps": out.speculation.steps,
        "tau": out.speculation.tau if out.speculation.steps else None,
        "row_steps": [row.steps for row in out.per_row],
        "row_tau": [row.tau if row.steps else None for row in out.per_row],
    }


def summarize_batches(
    results: Sequence[BatchResult], batch_sizes: Sequence[int], methods: Sequence[str]
) -> list[BatchSizeSummary]:
    """Per batch size and method: tokens/s, speed-ups over the reference (median over batches and overall),
    tau (all rows, per batched forward) and row tau (per step of a row), mismatched rows."""
    summaries = []
    for batch_size in batch_sizes:
        sized = [r for r in results if r.batch_size == batch_size]
        reference = {r.batch_index: r for r in sized if r.method == AUTOREGRESSIVE}
        for method in methods:
            rows = [r for r in sized if r.method == method]
            if rows:
                summaries.append(_summarize_method(batch_size, method, rows, reference))
    return summaries


def _summarize_method(
    batch_size: int, method: str, rows: Sequence[BatchResult], reference: dict[int, BatchResult]
) -> BatchSizeSummary:
    ratios = [_tokens_per_second([r]) / _tokens_per_second([reference[r.batch_index]]) for r in rows]
    tree = [r for r in rows if r.steps]
    row_steps = [(tau, steps) for r in tree for tau, steps in zip(r.row_tau, r.row_steps, strict=True) if steps]
    return BatchSizeSummary(
        batch_size=batch_size,
        method=method,
        batches=len(rows),
        new_tokens=sum(r.new_tokens for r in rows),
        tokens_per_second=_tokens_per_second(rows),
        speedup_median=statistics.median(ratios),
        speedup_total=_tokens_per_second(rows) / _tokens_per_second([reference[r.batch_index] for r in rows]),
        tau=_weighted_mean([(r.tau, r.steps) for r in tree]),
        row_tau=_weighted_mean(row_steps),
        mismatches=sum(not identical for r in rows for identical in r.row_identical),
    )


def _tokens_per_second(results: Sequence[BatchResult]) -> float:
    return sum(r.new_tokens for r in results) / sum(r.seconds for r in results)


def _weighted_mean(pairs: Sequence[tuple[float, int]]) -> float | None:
    """sum(tau * steps) / sum(steps): all the tokens appended over all the steps; None without steps."""
    steps = sum(weight for _, weight in pairs)
    return sum(value * weight for value, weight in pairs) / steps if steps else None


def markdown_batch_table(report: dict) -> str:
    """The summary of a batch bench JSON as a Markdown table, its caption naming settings and machine."""
    settings, machine = report["settings"], report["machine"]
    lines = [
        f"MT-Bench turn {settings['turn']}, {settings['num_prompts']} prompts in left-padded batches, greedy, "
        f"{settings['max_new_tokens']} new tokens at most per row; {machine['device']} ({_processor_text(machine)}, "
        f"{machine['torch_threads']} threads), torch {machine['torch']}, transformers {machine['transformers']}. "
        f"tokens/s: generated tokens of all rows (each up to its EOS) per second; speed-up over `{AUTOREGRESSIVE}` "
        "(plain batched `generate` on the stock base) at the same batch size; tau: tokens per batched base forward "
        f"(per step of one row in parentheses); mismatches: rows differing from `{AUTOREGRESSIVE}`."
        f"{_prepacked_text(settings)}",
        "",
        "| batch size | method | tokens/s | speed-up (median) | speed-up (overall) | tau | mismatches |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["summary"]:
        tau = f"{s['tau']:.2f} ({s['row_tau']:.2f} per row)" if s["tau"] is not None else "-"
        lines.append(
            f"| {s['batch_size']} | {s['method']} | {s['tokens_per_second']:.1f} | {s['speedup_median']:.2f}x "
            f"| {s['speedup_total']:.2f}x | {tau} | {s['mismatches']} |"
        )
    return "\n".join(lines) + "\n"


def _processor_text(machine: dict) -> str:
    cores = f", {machine['cpu_count']} cores" if machine.get("cpu_count") else ""
    vector = f", {machine['cpu_vector_level']}" if machine.get("cpu_vector_level") else ""
    gpu = f", {machine['gpu']}" if machine.get("gpu") else ""
    return f"{machine['cpu']} {machine['processor']}{cores}{vector}{gpu}"


def _prepacked_text(settings: dict) -> str:
    if not settings["prepacked"]:
        return ""
    layers = PACKED_LAYERS.get(settings["kernel"], settings["kernel"])
    return f" Every method but `{AUTOREGRESSIVE}` runs on the base with {layers}."


def write_batch_report(report: dict, json_path: str | Path) -> list[Path]:
    """Write the JSON, and beside it the Markdown table generated from it."""
    return write_json_and_table(report, json_path, markdown_batch_table(report))
