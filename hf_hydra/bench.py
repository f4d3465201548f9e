"""MT-Bench benchmark: tau, tokens/s and speed-up of speculative methods against plain decoding.

All methods run interleaved per prompt in one process after a warm-up, so machine noise hits them
alike; speed-ups are ratios measured on the same prompt. One JSON holds everything; the Markdown
table and the plots are generated from it, never typed by hand. This module runs and times the methods and
assembles that report; bench_report.py writes it (the table from bench_table.py, the plots from bench_plots.py)
and merges the reports of shards.

Greedy (the default): every output is compared with plain greedy `generate` token for token. With a
temperature, every method samples (plain sampling is the reference, tree methods use lossless
acceptance and, as `<label>-typical`, typical acceptance); outputs differ by design, so instead of
mismatches the report gives each output's mean log-likelihood per token under the distribution plain
sampling draws from (the base's logits / temperature), a quality check for the lossy typical rule.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ._version import __version__
from .acceptance import TYPICAL
from .bench_table import AUTOREGRESSIVE
from .cache_name import cache_argument
from .decoding import context_speculative_generate
from .divergence import first_divergence
from .growing_cache import growing_cache
from .head_archs import HEAD_ARCHS, HYDRA
from .modeling_hydra import HydraForCausalLM
from .prepack import dtype_name, packed_kernel
from .roofline import describe_cpu
from .sequence_steps import STEP_PHASES, SpeculationStats
from .tree import DYNAMIC_TREE, TreeSpec, resolve_tree, static_default

SCHEMA_VERSION = 1
AUTOREGRESSIVE_PREPACKED = "autoregressive_prepacked"  # plain `generate` on the prepacked base, growing cache
PROMPT_LOOKUP = "prompt_lookup"
CONTEXT = "context"  # the tree loop with context candidates only (no heads): `context_speculative_generate`
ASSISTED = "hydra_assisted"  # the chain candidate generator in transformers' assisted loop
# Tree decoding with a set of heads, named by a label: the head architectures by default, any label
# (e.g. "hydra-lm" for an ablation) when several heads sets are compared.
TREE_METHODS = HEAD_ARCHS
ALL_METHODS = (AUTOREGRESSIVE, PROMPT_LOOKUP, CONTEXT, ASSISTED, *TREE_METHODS)
PROMPT_LOOKUP_TOKENS = 10
TYPICAL_SUFFIX = f"-{TYPICAL}"  # "<label>-typical": tree decoding with those heads and typical acceptance
# "<label>": the heads' default (a dynamic tree where the heads carry its policy) merged with context
# candidates; "<label>-static": the heads' static tree merged with context candidates; "<label>-heads": the
# heads' static tree alone (Hydra as published).
STATIC_SUFFIX = "-static"
HEADS_ONLY_SUFFIX = "-heads"
VARIANT_SUFFIXES = (STATIC_SUFFIX, HEADS_ONLY_SUFFIX)
# "<label>-stock": the heads' default tree on the stock (unpacked) base, when the others run on a packed one,
# always speculating: what speculative decoding gave before packing (asked for by name with --methods).
STOCK_SUFFIX = "-stock"


@dataclass(frozen=True)
class PromptResult:
    """One method on one prompt."""

    question_id: int
    category: str
    method: str
    new_tokens: int
    seconds: float
    steps: int | None  # base verification forwards (tree methods)
    accepted_lengths: list[int] | None  # tokens appended per step (tree methods)
    phase_seconds: dict[str, float] | None  # prefill / draft / verify / accept / commit (tree methods)
    identical: bool | None  # greedy: output equals autoregressive greedy token for token (None when sampling)
    divergence_gap: float | None  # when not identical: base top-2 logit gap at the first differing token
    log_likelihood: float | None = None  # sampling: mean log-prob per new token under base logits / temperature
    context_tokens: int | None = None  # accepted drafts only the context candidates proposed (tree methods)
    accepted_drafts: int | None = None  # accepted drafts, whatever proposed them (tree methods)

    @property
    def tau(self) -> float | None:
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else None


@dataclass(frozen=True)
class MethodSummary:
    method: str
    tau: float | None  # tokens per verification step, bonus included (tree methods)
    tokens_per_second: float  # total new tokens / total seconds
    # Speed-ups compare seconds per new token (sampled outputs differ in length; greedy ones do not, so
    # there they equal the ratios of seconds).
    speedup_median: float  # median over prompts of (autoregressive s/token / method s/token)
    speedup_total: float  # autoregressive tokens/s over all prompts / method tokens/s over the same prompts
    mismatches: int | None  # outputs differing from autoregressive greedy (None when sampling)
    speedup_by_category: dict[str, float] = field(default_factory=dict)  # median per category
    acceptance_by_depth: list[float] = field(default_factory=list)  # P(draft at depth k accepted), tree methods
    step_time_shares: dict[str, float] = field(default_factory=dict)  # draft/verify/accept/commit share of steps
    mean_log_likelihood: float | None = None  # sampling: mean over prompts of the per-token log-likelihood
    context_share: float | None = None  # share of the accepted drafts that only the context proposed


def acceptance_by_depth(accepted_lengths: Sequence[int], max_depth: int) -> list[float]:
    """P(the draft at depth k was accepted) for k = 1..max_depth: a step appending n tokens accepted
    the drafts at depths 1..n-1."""
    if not accepted_lengths:
        return []
    return [sum(n - 1 >= k for n in accepted_lengths) / len(accepted_lengths) for k in range(1, max_depth + 1)]


Runner = Callable[[torch.Tensor, int], tuple[torch.Tensor, SpeculationStats | None]]


def decoding_options(temperature: float | None) -> dict:
    """generate() options of every method: greedy, or pure temperature sampling (no top-k / top-p)."""
    if temperature is None:
        return {"do_sample": False}
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (leave it out for greedy), got {temperature}.")
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


def method_runners(
    base: PreTrainedModel,
    heads: dict[str, HydraForCausalLM],
    methods: Sequence[str],
    temperature: float | None = None,
    prepacked_base: PreTrainedModel | None = None,
    stock_heads: dict[str, HydraForCausalLM] | None = None,
) -> dict[str, Runner]:
    """A `(input_ids, max_new_tokens) -> (sequence, speculation statistics or None)` function per method;
    a method named like a key of `heads` is tree decoding with those heads' default tree merged with context
    candidates (lossless acceptance when sampling), `<label>-static` their static tree merged,
    `<label>-heads` their static tree alone, `<label>-typical` the default with typical acceptance (sampling
    only).

    prepacked_base: the base with prepacked linear layers (`hf_hydra.prepack`), on which the heads sit;
    prompt lookup and `autoregressive_prepacked` then run on it too (on a growing cache, like the default path's
    plain decoding), `autoregressive` stays on `base` with `generate`'s own cache.
    stock_heads: the same heads sets on the stock `base`, for `<label>-stock`."""
    options = decoding_options(temperature)
    known = (*ALL_METHODS, AUTOREGRESSIVE_PREPACKED) if prepacked_base is not None else ALL_METHODS
    stock_heads = stock_heads or {}
    known = (*known, *(label + STOCK_SUFFIX for label in stock_heads))
    unknown = [m for m in methods if m not in known and _heads_label(m, temperature) not in heads]
    if unknown:
        raise ValueError(
            f"Unknown methods {unknown}; choose among {known}, the labels of --heads, '<label>{STATIC_SUFFIX}', "
            f"'<label>{HEADS_ONLY_SUFFIX}' and, when sampling, '<label>{TYPICAL_SUFFIX}'."
        )
    missing = [m for m in methods if m in TREE_METHODS and m not in heads]
    if ASSISTED in methods and not heads:
        missing.append(ASSISTED)
    if missing:
        raise ValueError(f"Methods {missing} need heads: pass --heads ARCH=PATH for them.")
    runners: dict[str, Runner] = {}
    fast_base = prepacked_base if prepacked_base is not None else base
    for method in methods:
        if method == AUTOREGRESSIVE:
            runners[method] = lambda ids, n: (base.generate(ids, max_new_tokens=n, **options), None)
        elif method == AUTOREGRESSIVE_PREPACKED:
            runners[method] = lambda ids, n: (
                fast_base.generate(ids, max_new_tokens=n, **_grown(fast_base), **options),
                None,
            )
        elif method == PROMPT_LOOKUP:
            runners[method] = lambda ids, n: (
                fast_base.generate(
                    ids, max_new_tokens=n, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS, **_grown(fast_base), **options
                ),
                None,
            )
        elif method == CONTEXT:
            runners[method] = _tree_runner(fast_base, {**options, "custom_generate": context_speculative_generate})
        elif method == ASSISTED:
            assisted_model = heads.get(HYDRA.name) or next(iter(heads.values()))
            runners[method] = lambda ids, n, m=assisted_model: (
                m.generate(ids, max_new_tokens=n, speculative="assisted", **options),
                None,
            )
        elif method in heads:
            runners[method] = _tree_runner(heads[method], {**options, "speculative": True})
        elif method.removesuffix(STOCK_SUFFIX) in stock_heads:
            stock_model = stock_heads[method.removesuffix(STOCK_SUFFIX)]  # its default tree, asked for by name:
            default_tree = stock_model.generation_config.hydra_tree  # it speculates even where no tree pays
            runners[method] = _tree_runner(stock_model, {**options, "speculative": True, "tree": default_tree})
        elif method.endswith(VARIANT_SUFFIXES):
            model = heads[_heads_label(method, temperature)]
            static = {**options, "speculative": True, "tree": static_tree(model)}
            if method.endswith(HEADS_ONLY_SUFFIX):
                static["sources"] = "heads"
            runners[method] = _tree_runner(model, static)
        else:
            typical = {**options, "speculative": True, "acceptance": TYPICAL}
            runners[method] = _tree_runner(heads[_heads_label(method, temperature)], typical)
    return runners


def use_tree(heads: dict[str, HydraForCausalLM], tree: TreeSpec) -> None:
    """Make `tree` (a name or rank paths) the default and the static tree of every heads set, e.g. to compare
    heads on one tree, or tuned trees with Medusa's reference `mc_sim_7b_63`; a ValueError when it is too
    deep for a set."""
    for model in heads.values():
        model.set_tree(tree)


def static_tree(model: HydraForCausalLM) -> list[list[int]]:
    """The heads' static tree: their default unless that is dynamic, else the tree of their config."""
    tree = static_default(model.generation_config.hydra_tree, model.config.tree)
    return [list(p) for p in resolve_tree(tree, model.config.num_heads)]


def _heads_label(method: str, temperature: float | None) -> str:
    """The heads a method runs with: its name, without `-heads`, or without `-typical` when sampling."""
    if temperature is not None and method.endswith(TYPICAL_SUFFIX):
        return method.removesuffix(TYPICAL_SUFFIX)
    return method.removesuffix(HEADS_ONLY_SUFFIX).removesuffix(STATIC_SUFFIX)


def _grown(model: PreTrainedModel) -> dict:
    """A growing cache (`hf_hydra.growing_cache`) for one plain `generate` call, as the default path's plain
    decoding uses: the plain methods other than the `autoregressive` reference decode as fast as they can."""
    return cache_argument(growing_cache(model.config))


def _tree_runner(model: PreTrainedModel, options: dict) -> Runner:
    """Tree decoding: `model.generate` with `options` (a speculative mode, or a custom_generate function)."""

    def run(input_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, SpeculationStats]:
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, return_dict_in_generate=True, **options)
        return out.sequences, getattr(out, "speculation", None)  # None: it decoded plainly (no tree pays here)

    return run


@torch.no_grad()
def mean_log_likelihood(base: PreTrainedModel, sequence: torch.Tensor, prompt_length: int, temperature: float) -> float:
    """Mean log-probability of the new tokens of `sequence` (1, S) under softmax(base logits / temperature)."""
    logits = base(sequence).logits[0, prompt_length - 1 : -1].float()  # (S - L, V): predicts tokens L..S-1
    logprobs = (logits / temperature).log_softmax(dim=-1)
    new_tokens = sequence[0, prompt_length:]
    return float(logprobs.gather(-1, new_tokens[:, None]).mean())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


T = TypeVar("T")


def timed(call: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """`call()` and its wall time in seconds, the device synchronised before and after, so that the time covers
    the call's own work: none queued before it, all of its own."""
    _synchronize(device)
    start = time.perf_counter()
    result = call()
    _synchronize(device)
    return result, time.perf_counter() - start


def spread_over_categories(questions: Sequence[dict], limit: int | None = None) -> list[dict]:
    """The first `limit` questions taken round-robin over the categories (one of each category first), so
    a small `--limit` still covers every category; all of them, in that order, when `limit` is None."""
    by_category: dict[str, list[dict]] = {}
    for question in questions:
        by_category.setdefault(question["category"], []).append(question)
    rounds = itertools.zip_longest(*by_category.values())
    ordered = [q for round_ in rounds for q in round_ if q is not None]
    return ordered[:limit]


def bench_prompts(
    tokenizer: PreTrainedTokenizerBase,
    base: PreTrainedModel,
    questions: Sequence[dict],
    turn: int,
    max_new_tokens: int,
) -> list[tuple[dict, torch.Tensor]]:
    """(question, input_ids) per question; turn 2 puts the model's own greedy first answer in context."""
    prompts = []
    for question in questions:
        messages = [{"role": "user", "content": question["turns"][0]}]
        if turn == 2:
            first = _chat_ids(tokenizer, messages).to(base.device)
            answer = base.generate(first, max_new_tokens=max_new_tokens, do_sample=False)[0, first.shape[1] :]
            messages += [
                {"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)},
                {"role": "user", "content": question["turns"][1]},
            ]
        prompts.append((question, _chat_ids(tokenizer, messages).to(base.device)))
    return prompts


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> torch.Tensor:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return encoded["input_ids"]


def run_bench(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    heads: dict[str, HydraForCausalLM],
    questions: Sequence[dict],
    methods: Sequence[str] = ALL_METHODS,
    max_new_tokens: int = 256,
    turn: int = 1,
    temperature: float | None = None,
    seed: int = 0,
    prepacked_base: PreTrainedModel | None = None,
    stock_heads: dict[str, HydraForCausalLM] | None = None,
) -> dict:
    """Run every method on every question, interleaved, after a warm-up; return the report as a dict.

    temperature None: greedy. Otherwise every method samples at that temperature; each method's draws on
    question q start from `torch.manual_seed(seed + q)` (reproducible, independent of the method order).
    prepacked_base, stock_heads: see `method_runners`; the reference stays plain `generate` on the stock `base`.
    """
    if turn not in (1, 2):
        raise ValueError(f"turn must be 1 or 2, got {turn}.")
    methods = [AUTOREGRESSIVE] + [m for m in methods if m != AUTOREGRESSIVE]  # the reference comes first
    runners = method_runners(base, heads, methods, temperature, prepacked_base, stock_heads)
    prompts = bench_prompts(tokenizer, base, questions, turn, max_new_tokens)
    for runner in runners.values():  # warm-up: first calls pay for allocation and lazy initialisation
        runner(prompts[0][1], 8)
    results = []
    for question, input_ids in tqdm(prompts, desc="bench", unit="prompt"):
        results += _bench_prompt(base, runners, question, input_ids, max_new_tokens, temperature, seed)
    trees = {label: model.generation_config.hydra_tree for label, model in heads.items()}  # "dynamic" or paths
    static_trees = {label: static_tree(model) for label, model in heads.items()}
    depths = _tree_depths(heads, methods, temperature)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(base.device),
        "settings": {
            "methods": methods,
            "max_new_tokens": max_new_tokens,
            "turn": turn,
            "num_prompts": len(prompts),
            "temperature": temperature,
            "seed": seed if temperature is not None else None,
            "trees": trees,
            "static_trees": static_trees,
            "tree_depths": depths,
            "prepacked": prepacked_base is not None,
            "kernel": packed_kernel(prepacked_base) if prepacked_base is not None else None,
            "heads_prepacked": {label: dtype_name(model.heads.prepacked_dtype) for label, model in heads.items()},
        },
        "results": [asdict(r) for r in results],
        "summary": [asdict(s) for s in summarize(results, methods, depths)],
    }


def _tree_depths(
    heads: dict[str, HydraForCausalLM], methods: Sequence[str], temperature: float | None
) -> dict[str, int]:
    """How deep each tree method's heads draft: their static tree's depth, or all heads for a dynamic tree."""
    depths = {}
    for method in methods:
        model = heads.get(_heads_label(method, temperature))
        if model is None:
            continue
        dynamic = model.generation_config.hydra_tree == DYNAMIC_TREE and not method.endswith(VARIANT_SUFFIXES)
        depths[method] = model.config.num_heads if dynamic else max(len(p) for p in static_tree(model))
    return depths


def shard(questions: Sequence[dict], index: int, count: int) -> list[dict]:
    """Questions index, index + count, ...: one of `count` benchmark processes run side by side."""
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}), got {index}.")
    return list(questions[index::count])


def _bench_prompt(
    base: PreTrainedModel,
    runners: dict[str, Runner],
    question: dict,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float | None = None,
    seed: int = 0,
) -> list[PromptResult]:
    reference = None
    results = []
    for method, runner in runners.items():
        if temperature is not None:
            torch.manual_seed(seed + question["question_id"])
        (sequence, stats), seconds = timed(functools.partial(runner, input_ids, max_new_tokens), input_ids.device)
        if reference is None:
            reference = sequence
        if temperature is None:
            divergence, log_likelihood = first_divergence(base, reference, sequence), None
        else:
            divergence, log_likelihood = None, mean_log_likelihood(base, sequence, input_ids.shape[1], temperature)
        results.append(
            PromptResult(
                question_id=question["question_id"],
                category=question["category"],
                method=method,
                new_tokens=sequence.shape[1] - input_ids.shape[1],
                seconds=seconds,
                steps=stats.steps if stats is not None else None,
                accepted_lengths=list(stats.accepted_lengths) if stats is not None else None,
                phase_seconds=stats.phase_seconds if stats is not None else None,
                identical=None if temperature is not None else divergence is None,
                divergence_gap=None if divergence is None else divergence.gap,
                log_likelihood=log_likelihood,
                context_tokens=stats.context_tokens if stats is not None else None,
                accepted_drafts=stats.accepted_drafts if stats is not None else None,
            )
        )
    return results


def summarize(
    results: Sequence[PromptResult], methods: Sequence[str], tree_depths: dict[str, int]
) -> list[MethodSummary]:
    """Per-method tau, tokens/s, speed-ups (median of per-prompt ratios and total-time ratio), mismatches
    (greedy) or mean log-likelihood (sampling), and for tree methods the acceptance rate per depth of
    their tree (`tree_depths`)."""
    reference = {r.question_id: r for r in results if r.method == AUTOREGRESSIVE}
    summaries = []
    for method in methods:
        rows = [r for r in results if r.method == method]
        ratios = [_seconds_per_token(reference[r.question_id]) / _seconds_per_token(r) for r in rows]
        accepted = [n for r in rows for n in (r.accepted_lengths or [])]
        by_category: dict[str, list[float]] = {}
        for row, ratio in zip(rows, ratios, strict=True):
            by_category.setdefault(row.category, []).append(ratio)
        summaries.append(
            MethodSummary(
                method=method,
                tau=sum(accepted) / len(accepted) if accepted else None,
                tokens_per_second=_tokens_per_second(rows),
                speedup_median=statistics.median(ratios),
                speedup_total=_tokens_per_second(rows) / _tokens_per_second([reference[r.question_id] for r in rows]),
                mismatches=None if rows[0].identical is None else sum(not r.identical for r in rows),
                speedup_by_category={c: statistics.median(v) for c, v in sorted(by_category.items())},
                acceptance_by_depth=acceptance_by_depth(accepted, tree_depths.get(method, 0)),
                step_time_shares=step_time_shares([r.phase_seconds for r in rows if r.phase_seconds]),
                mean_log_likelihood=_mean([r.log_likelihood for r in rows if r.log_likelihood is not None]),
                context_share=_context_share(rows),
            )
        )
    return summaries


def _context_share(rows: Sequence[PromptResult]) -> float | None:
    """Accepted drafts only the context proposed / all accepted drafts (tree methods)."""
    tree_rows = [r for r in rows if r.context_tokens is not None and r.accepted_drafts is not None]
    drafts = sum(r.accepted_drafts for r in tree_rows)
    return sum(r.context_tokens for r in tree_rows) / drafts if drafts > 0 else None


def _seconds_per_token(result: PromptResult) -> float:
    return result.seconds / max(result.new_tokens, 1)


def _tokens_per_second(results: Sequence[PromptResult]) -> float:
    return sum(r.new_tokens for r in results) / sum(r.seconds for r in results)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def step_time_shares(phase_seconds: Sequence[dict[str, float]]) -> dict[str, float]:
    """Share of the decoding steps' total time (prefill excluded) spent in each phase, over prompts."""
    totals = {phase: sum(p.get(phase, 0.0) for p in phase_seconds) for phase in STEP_PHASES}
    step = sum(totals.values())
    return {phase: seconds / step for phase, seconds in totals.items()} if step else {}


def machine_info(device: torch.device) -> dict:
    cpu = describe_cpu()
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu.model,
        "cpu_flags": cpu.flags,
        "cpu_vector_level": cpu.vector_level,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_hydra": __version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
