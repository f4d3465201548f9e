"""What tree decoding would gain on a GPU: measured verification and loop costs, projected speed-ups.

Three measurements on a random-weight base (Llama of 7B shape in bfloat16 on CUDA; no download, weights
initialised on the device), then one projection:

    forwards   t(n): one tree-verification forward over n new tokens after `context_length` cached ones,
               through the package's own path (`verification.verify_tree`: the tree's 4D additive mask,
               depth positions, the native cache), median of `repeats` after a warm-up round, the device
               synchronised around each forward; and plain decoding's one-token forward (no 4D mask), t_plain
    plain      plain greedy `generate`'s seconds per new token (its own per-step overhead included)
    loop       `generate(speculative=True)` with fresh heads of each shipped architecture on the same base,
               the loop's own time per step from the package's phase timer (`SpeculationStats.phase_seconds`:
               draft, accept, commit) plus the call's time outside every phase (Python, generate's set-up)
    projection for each shipped heads set and shipped tree, at the tau the heads reach on MT-Bench:
                   tokens per step = tau (bonus included)
                   step seconds    = t(n) + loop seconds per step
                   tokens / s      = tau / step seconds
                   speed-up        = (tokens / s) x t_plain   (and x plain generate's seconds per token)
               Every projected number is labelled "projection": tau comes from the heads on their real base
               (SmolLM2-135M, `artifacts/bench`), the costs from a random 7B-shape base.

`python -m gpu_check.profile_gpu --dry-run --out DIR` runs the same code on the CPU with a tiny shape in seconds
(what tests/test_gpu_check.py runs); `gpu_check/device_check.py` runs the full one on the GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, PreTrainedModel

from hf_hydra import HydraForCausalLM, assets
from hf_hydra.attention import use_packed_gqa_attention
from hf_hydra.bench import machine_info
from hf_hydra.cache_name import cache_argument
from hf_hydra.sequence_steps import STEP_PHASES
from hf_hydra.tree import MC_SIM_7B_63, NAMED_TREES, TreeBuffers, build_tree_buffers, expected_tau, resolve_tree

ROOT = Path(__file__).resolve().parents[1]
PROJECTION = "projection"  # the label of every projected figure
NUM_HEADS = 4  # as the shipped heads
SHIPPED_HEADS = ("medusa", "hydra", "hydra++")
DEFAULT_TREE = "default"  # a shipped heads set's own tree (its config.json `tree`)
SHIPPED_TREES = (DEFAULT_TREE, *NAMED_TREES)  # default, mc_sim_7b_63, cpu_small_11
PLAIN = "plain"  # plain decoding's one-token forward, beside the tree forwards
# What every report says about its own figures.
NOTES = (
    "Every projected figure is a projection: tau was measured with the shipped heads on their SmolLM2-135M base "
    "(MT-Bench turn 1, greedy, the heads' tree alone), the costs on a random-weight base with fresh heads; trained "
    "heads on a real base of this shape reach another tau.",
    "Loop time per step = the call's wall time minus its prefill and verification phases (the package's PhaseTimer: "
    "CUDA events, the device's timeline, no synchronisation per phase), divided by the steps.",
    "The shipped Hydra and Hydra++ heads decode by default with tree='dynamic' merged with context candidates: "
    "their tree's size changes from step to step, so that default is not projected here.",
    "mc_sim_7b_63: no MT-Bench run of the shipped heads exists; its tau is what their rank accuracy "
    "(tree_tuning.json) predicts, which overestimated the measured tau on the other trees (column 'expected tau').",
)
RESULT_JSON = "gpu_check.json"
RESULT_MARKDOWN = "gpu_check.md"
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture base's size (random weights)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int

    def config(self) -> LlamaConfig:
        """Its config: no special tokens (generation runs to its length), positions for a long context."""
        return LlamaConfig(
            **dataclasses.asdict(self),
            max_position_embeddings=4096,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )


LLAMA_7B = ModelShape(4096, 32, 32, 32, 11008, 32000)  # Llama-2-7B / Vicuna-7B
TINY = ModelShape(64, 2, 4, 2, 128, 256)  # the dry run: grouped-query attention like the small real models


@dataclass(frozen=True)
class Settings:
    """What one run measures, and on what."""

    device: str
    dtype: str  # a torch dtype's name
    shape: ModelShape
    context_length: int  # tokens cached before every timed forward and in every generate prompt
    sizes: tuple[int, ...]  # n of the t(n) curve (trees of that many tokens, the root included)
    repeats: int  # timed rounds after one warm-up round (medians)
    loop_new_tokens: int  # new tokens per timed generate call
    draft_vocab_size: int  # K of the heads' shared draft vocabulary (the shipped heads: 8192)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


GPU = Settings("cuda", "bfloat16", LLAMA_7B, 1000, (1, 2, 4, 8, 16, 32, 64), 7, 48, 8192)
DRY_RUN = Settings("cpu", "float32", TINY, 32, (1, 2, 4, 8), 2, 6, 64)


# ------------------------------------------------------------------------------------------------ models


def random_base(settings: Settings, seed: int = 0) -> PreTrainedModel:
    """A random-weight Llama of `settings.shape`, built and initialised on the device in its dtype, in eval
    mode, on the attention the Hydra wrapper gives it (`use_packed_gqa_attention`: sdpa, grouped-query heads
    packed for tree forwards)."""
    torch.manual_seed(seed)
    with torch.device(settings.device):
        base = AutoModelForCausalLM.from_config(
            settings.shape.config(), dtype=settings.torch_dtype, attn_implementation="sdpa"
        )
    use_packed_gqa_attention(base)
    return base.eval()


def fresh_heads(base: PreTrainedModel, head_arch: str, settings: Settings, seed: int = 0) -> HydraForCausalLM:
    """Fresh (untrained, randomly initialised) heads of `head_arch` on `base`, shaped as the shipped ones: four
    heads of one layer projecting onto the base lm_head's rows of K draft tokens (`shared_draft_vocab`)."""
    generator = torch.Generator().manual_seed(seed)
    draft_ids = torch.randperm(settings.shape.vocab_size, generator=generator)[: settings.draft_vocab_size].sort()
    torch.manual_seed(seed + 1)
    model = HydraForCausalLM.from_base(  # built on the host, then moved to the base's device and dtype
        base, head_arch=head_arch, num_heads=NUM_HEADS, vocab_projection="shared_draft_vocab",
        draft_token_ids=draft_ids.values,
    )  # fmt: skip
    return model.eval()


# ------------------------------------------------------------------------------------------------ trees


def tree_of_size(num_tokens: int) -> TreeBuffers:
    """A tree of `num_tokens` tokens, the root included: the first num_tokens - 1 nodes of Medusa's
    mc_sim_7b_63 (its paths are listed parents first, so every prefix is a tree), the root alone for 1."""
    if not 1 <= num_tokens <= len(MC_SIM_7B_63) + 1:
        raise ValueError(f"tree sizes run from 1 to {len(MC_SIM_7B_63) + 1} tokens; got {num_tokens}.")
    if num_tokens == 1:
        return build_tree_buffers(((0,),), NUM_HEADS).truncated(0)
    return build_tree_buffers(MC_SIM_7B_63[: num_tokens - 1], NUM_HEADS)


def tree_label(paths: Sequence[Sequence[int]]) -> str:
    """A tree's name where it has one (`NAMED_TREES`), else its rank paths in compact JSON."""
    paths = resolve_tree(paths, NUM_HEADS)
    for name, named in NAMED_TREES.items():
        if resolve_tree(named, NUM_HEADS) == paths:
            return name
    return json.dumps([list(p) for p in paths], separators=(",", ":"))


def shipped_heads_tree(heads: str) -> tuple[tuple[int, ...], ...]:
    """The rank paths of a shipped heads set's own tree (config.json `tree`)."""
    config = json.loads((assets.pretrained_heads_path(heads) / "config.json").read_text())
    return resolve_tree(config["tree"], config["num_heads"])


def shipped_trees() -> dict[str, tuple[tuple[int, ...], ...]]:
    """Every tree a shipped heads set decodes with by name or by default, by label."""
    trees = {name: resolve_tree(name, NUM_HEADS) for name in NAMED_TREES}
    for heads in SHIPPED_HEADS:
        paths = shipped_heads_tree(heads)
        trees[tree_label(paths)] = paths
    return trees


# ------------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """`run()` and its wall seconds, the device synchronised before and after (queued GPU work included)."""
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return result, time.perf_counter() - start


@dataclass(frozen=True)
class ForwardProfile:
    """Median seconds of one forward after the cached context: trees by label, and plain decoding's step."""

    context_length: int
    repeats: int
    sizes: list[int]  # n of the t(n) curve
    seconds: list[float]  # [i]: t(sizes[i]), a tree-verification forward (mc_sim_7b_63's first n - 1 nodes)
    tree_seconds: dict[str, float]  # t(n) of each shipped tree, with its own mask
    tree_tokens: dict[str, int]  # n of each shipped tree
    plain_seconds: float  # plain decoding's one-token forward (causal, no 4D mask): t_plain

    @property
    def ratios(self) -> list[float]:
        """t(n) / t(1) along the curve."""
        one = self.seconds[self.sizes.index(1)]
        return [t / one for t in self.seconds]

    def to_record(self) -> dict:
        return dataclasses.asdict(self) | {"ratios": self.ratios}


@torch.no_grad()
def profile_forwards(
    base: PreTrainedModel, trees: dict[str, TreeBuffers], context_length: int, repeats: int, seed: int = 0
) -> dict[str, float]:
    """Median seconds of `verify_tree` over each tree after `context_length` cached tokens, and of plain
    decoding's one-token forward (key `PLAIN`). Each round times every tree once, in turn (a burst of noise hits
    a few rounds of everything); the cache is cropped back to the context after every forward."""
    from hf_hydra.verification import verify_tree  # the decoding loop's own tree forward

    device, vocab = base.device, base.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=base.config)
    prompt = torch.randint(vocab, (1, context_length), generator=generator).to(device)
    base(input_ids=prompt, **cache_argument(cache), use_cache=True, logits_to_keep=1)
    trees = {label: tree.to(device) for label, tree in trees.items()}
    runs: dict[str, list[float]] = {label: [] for label in [*trees, PLAIN]}
    for _ in range(repeats + 1):
        for label, tree in trees.items():
            tokens = torch.randint(vocab, (tree.num_tokens,), generator=generator).to(device)
            runs[label].append(timed(functools.partial(verify_tree, base, cache, tokens, tree), device)[1])
            cache.crop(-tree.num_tokens)  # back to the context
        token = torch.randint(vocab, (1, 1), generator=generator).to(device)
        step = functools.partial(base, input_ids=token, **cache_argument(cache), use_cache=True)
        runs[PLAIN].append(timed(step, device)[1])
        cache.crop(-1)
    return {label: statistics.median(seconds[1:]) for label, seconds in runs.items()}


def forward_profile(base: PreTrainedModel, settings: Settings) -> ForwardProfile:
    """t(n) along `settings.sizes`, t(n) of every shipped tree and t_plain, measured together."""
    curve = {f"n={n}": tree_of_size(n) for n in settings.sizes}
    shipped = {label: build_tree_buffers(paths, NUM_HEADS) for label, paths in shipped_trees().items()}
    seconds = profile_forwards(base, curve | shipped, settings.context_length, settings.repeats)
    return ForwardProfile(
        context_length=settings.context_length,
        repeats=settings.repeats,
        sizes=list(settings.sizes),
        seconds=[seconds[f"n={n}"] for n in settings.sizes],
        tree_seconds={label: seconds[label] for label in shipped},
        tree_tokens={label: tree.num_tokens for label, tree in shipped.items()},
        plain_seconds=seconds[PLAIN],
    )


@dataclass(frozen=True)
class PlainGenerate:
    """Plain greedy `generate`'s seconds per new token after the context, its per-step overhead included:
    the difference of two calls of different lengths (the prefill and set-up cancel)."""

    short_tokens: int
    long_tokens: int
    seconds_per_token: float


def plain_generate(base: PreTrainedModel, settings: Settings, seed: int = 0) -> PlainGenerate:
    """Time plain greedy `generate` after a random `context_length`-token prompt (after a warm-up call)."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(base.config.vocab_size, (1, settings.context_length), generator=generator).to(base.device)
    short, long = max(1, settings.loop_new_tokens // 4), settings.loop_new_tokens

    def run(new_tokens: int) -> float:
        call = functools.partial(base.generate, prompt, do_sample=False, max_new_tokens=new_tokens)
        return timed(call, base.device)[1]

    run(short)  # warm-up
    seconds = [run(short), run(long)]
    return PlainGenerate(short, long, (seconds[1] - seconds[0]) / (long - short))


@dataclass(frozen=True)
class LoopTiming:
    """`generate(speculative=True)` on one tree with fresh heads: the loop's own time per step."""

    head_arch: str
    tree: str
    tree_tokens: int
    steps: int
    new_tokens: int
    phase_seconds_per_step: dict[str, float]  # draft / verify / accept / commit (the package's PhaseTimer)
    outside_seconds_per_step: float  # the call's wall time outside the prefill and every step phase

    @property
    def loop_seconds_per_step(self) -> float:
        """Everything a step costs but the verification forward: drafting, acceptance, cache compaction and
        the Python around them."""
        phases = self.phase_seconds_per_step
        return phases["draft"] + phases["accept"] + phases["commit"] + self.outside_seconds_per_step

    def to_record(self) -> dict:
        return dataclasses.asdict(self) | {"loop_seconds_per_step": self.loop_seconds_per_step}


def loop_timing(
    model: HydraForCausalLM, label: str, paths: Sequence[Sequence[int]], settings: Settings, seed: int = 0
) -> LoopTiming:
    """One timed greedy `generate(speculative=True, tree=paths, sources="heads")` after a random prompt of
    `context_length` tokens (after a short warm-up call), split by the package's own phase timer."""
    device = model.base_lm.device
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(settings.shape.vocab_size, (1, settings.context_length), generator=generator).to(device)
    options = {"speculative": True, "tree": [list(p) for p in paths], "sources": "heads", "do_sample": False}
    model.generate(prompt, max_new_tokens=2, **options)  # warm-up
    call = functools.partial(
        model.generate, prompt, max_new_tokens=settings.loop_new_tokens, return_dict_in_generate=True, **options
    )
    output, seconds = timed(call, device)
    stats = output.speculation
    phases = stats.phase_seconds
    steps = max(stats.steps, 1)
    outside = seconds - sum(phases.values())
    return LoopTiming(
        head_arch=model.config.head_arch,
        tree=label,
        tree_tokens=len(paths) + 1,
        steps=stats.steps,
        new_tokens=stats.new_tokens,
        phase_seconds_per_step={phase: phases.get(phase, 0.0) / steps for phase in STEP_PHASES},
        outside_seconds_per_step=outside / steps,
    )


def loop_timings(base: PreTrainedModel, settings: Settings) -> list[LoopTiming]:
    """The loop's cost for every shipped architecture on every tree it ships with (`shipped_trees_of`)."""
    timings = []
    for head_arch in SHIPPED_HEADS:
        model = fresh_heads(base, head_arch, settings)
        for label, paths in shipped_trees_of(head_arch).items():
            timings.append(loop_timing(model, label, paths, settings))
        del model
        if base.device.type == "cuda":
            torch.cuda.empty_cache()
    return timings


def shipped_trees_of(heads: str) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The trees a shipped heads set is projected on: its own (default) tree and the named trees, by label."""
    own = shipped_heads_tree(heads)
    return {tree_label(own): own} | {name: resolve_tree(name, NUM_HEADS) for name in NAMED_TREES}


# ------------------------------------------------------------------------------------------------ tau


@dataclass(frozen=True)
class TauSource:
    """Where the tau of a shipped heads set on one tree was measured: a bench JSON and its method."""

    heads: str
    tree: str  # DEFAULT_TREE (the heads' own tree) or a name of NAMED_TREES
    bench: str  # relative to the repository root
    method: str


# Greedy MT-Bench (turn 1) runs of the shipped heads, the heads' tree alone (no context candidates); see
# artifacts/bench/README.md. No bench ran mc_sim_7b_63: its tau is the heads' expectation (`expected_tau_of`).
MEASURED_TAU = tuple(
    TauSource(heads, tree, bench, heads)
    for tree, bench in (
        (DEFAULT_TREE, "artifacts/bench/main-1280-retuned/bench.json"),  # 80 prompts
        ("cpu_small_11", "artifacts/bench/same-tree-1280/bench.json"),  # 16 prompts
    )
    for heads in SHIPPED_HEADS
)


@dataclass(frozen=True)
class Tau:
    """A tau (tokens per verification step, bonus included) and where it comes from, in words."""

    value: float
    source: str
    brief: str  # the source in a few words, for the table
    measured: bool  # False: expected from the heads' rank accuracy, not measured on MT-Bench


def bench_tau(source: TauSource, paths: Sequence[Sequence[int]], root: Path = ROOT) -> Tau:
    """The tau `source.method` reached in `source.bench`, after checking that it decoded greedily on `paths`."""
    report = json.loads((root / source.bench).read_text())
    settings = report["settings"]
    tree = settings.get("trees", {}).get(source.method)
    if tree is None or resolve_tree(tree, NUM_HEADS) != resolve_tree(paths, NUM_HEADS):
        raise ValueError(f"{source.bench} ran {source.method!r} on {tree}, not on {[list(p) for p in paths]}.")
    if settings.get("temperature") is not None:
        raise ValueError(f"{source.bench} sampled (temperature {settings['temperature']}); greedy tau expected.")
    summary = next(row for row in report["summary"] if row["method"] == source.method)
    where = (
        f"{source.bench}, method {source.method!r}: MT-Bench turn {settings.get('turn', 1)}, "
        f"{settings.get('num_prompts')} prompts, greedy, {settings.get('max_new_tokens')} new tokens"
    )
    brief = f"MT-Bench, {Path(source.bench).parent.name}/, {settings.get('num_prompts')} prompts"
    return Tau(summary["tau"], where, brief, measured=True)


def expected_tau_of(heads: str, paths: Sequence[Sequence[int]]) -> Tau:
    """The tau a shipped heads set's measured rank accuracy (its tree_tuning.json) predicts on `paths`."""
    path = assets.pretrained_heads_path(heads) / "tree_tuning.json"
    rank_accuracy = json.loads(path.read_text())["rank_accuracy"]
    where = f"expected from {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name} rank_accuracy"
    value = expected_tau(resolve_tree(paths, NUM_HEADS), rank_accuracy)
    return Tau(value, where, "expected from the heads' rank accuracy (no MT-Bench run)", measured=False)


def shipped_tau(heads: str, tree: str, paths: Sequence[Sequence[int]], root: Path = ROOT) -> Tau:
    """The MT-Bench tau of `heads` on `tree` where a bench measured it, else the heads' expectation."""
    for source in MEASURED_TAU:
        if (source.heads, source.tree) == (heads, tree):
            return bench_tau(source, paths, root)
    return expected_tau_of(heads, paths)


# ------------------------------------------------------------------------------------------------ projection


@dataclass(frozen=True)
class ProjectedSpeed:
    """Tree decoding's projected speed from tau and measured costs (all seconds per step or per token)."""

    tokens_per_step: float  # = tau, the bonus token included
    step_seconds: float  # t(n) + the loop's own time per step
    tokens_per_second: float  # tau / step_seconds
    speedup: float  # over plain decoding at `plain_seconds` per token: tokens_per_second * plain_seconds


def project(tau: float, verify_seconds: float, loop_seconds: float, plain_seconds: float) -> ProjectedSpeed:
    """Speed of tree decoding that appends `tau` tokens per step, a step costing one verification forward
    (`verify_seconds`, t(n)) plus the loop's own time (`loop_seconds`), against plain decoding's
    `plain_seconds` per token."""
    if tau < 1.0 or min(verify_seconds, plain_seconds) <= 0.0 or loop_seconds < 0.0:
        raise ValueError("project needs tau >= 1, positive forward times and a non-negative loop time.")
    step = verify_seconds + loop_seconds
    return ProjectedSpeed(
        tokens_per_step=tau, step_seconds=step, tokens_per_second=tau / step, speedup=tau * plain_seconds / step
    )


@dataclass(frozen=True)
class Projection:
    """One shipped heads set on one shipped tree: its tau, the costs it was projected with, and the result."""

    heads: str
    tree: str
    tree_tokens: int
    tau: Tau
    expected_tau: float  # what the heads' rank accuracy predicts on this tree (beside a measured tau)
    verify_seconds: float  # t(n), measured
    verify_ratio: float  # t(n) / t(1)
    loop_seconds: float  # measured, per step
    versus_forward: ProjectedSpeed  # against plain decoding's one-token forward
    versus_generate: ProjectedSpeed  # against plain `generate`'s seconds per token
    label: str = PROJECTION


def projections(
    profile: ForwardProfile, loops: Sequence[LoopTiming], plain: PlainGenerate, root: Path = ROOT
) -> list[Projection]:
    """Every shipped heads set on each of its shipped trees."""
    loop_of = {(timing.head_arch, timing.tree): timing.loop_seconds_per_step for timing in loops}
    one = profile.seconds[profile.sizes.index(1)]
    rows = []
    for heads in SHIPPED_HEADS:
        own = tree_label(shipped_heads_tree(heads))
        for label, paths in shipped_trees_of(heads).items():
            tau = shipped_tau(heads, DEFAULT_TREE if label == own else label, paths, root)
            verify, loop = profile.tree_seconds[label], loop_of[heads, label]
            rows.append(Projection(
                heads=heads,
                tree=label if label != own else f"{label} (default)",
                tree_tokens=profile.tree_tokens[label],
                tau=tau,
                expected_tau=expected_tau_of(heads, paths).value,
                verify_seconds=verify,
                verify_ratio=verify / one,
                loop_seconds=loop,
                versus_forward=project(tau.value, verify, loop, profile.plain_seconds),
                versus_generate=project(tau.value, verify, loop, plain.seconds_per_token),
            ))  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------ report


def markdown(report: dict) -> str:
    """The t(n) curve, the loop's cost and the projected speed-ups as Markdown tables."""
    env, profile = report["environment"], report["forward_profile"]
    lines = [
        f"# GPU check: {env.get('gpu', env['device'])}, {report['settings']['dtype']}, "
        f"torch {env['torch']}, transformers {env['transformers']}",
        "",
        f"Random-weight base {report['settings']['shape']}, {profile['context_length']} tokens cached; medians of "
        f"{profile['repeats']} rounds. Plain one-token forward t_plain = {profile['plain_seconds'] * 1e3:.2f} ms; "
        f"plain generate {report['plain_generate']['seconds_per_token'] * 1e3:.2f} ms per token.",
        "",
        "| n | " + " | ".join(str(n) for n in profile["sizes"]) + " |",
        "|---|" + "---|" * len(profile["sizes"]),
        "| t(n) ms | " + " | ".join(f"{t * 1e3:.2f}" for t in profile["seconds"]) + " |",
        "| t(n)/t(1) | " + " | ".join(f"{r:.2f}" for r in profile["ratios"]) + " |",
        "",
        "| heads (fresh) | tree | n | draft ms | verify ms | accept ms | commit ms | outside ms | loop ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for loop in report["loops"]:
        phases = loop["phase_seconds_per_step"]
        cells = [phases[p] * 1e3 for p in ("draft", "verify", "accept", "commit")]
        lines.append(
            f"| {loop['head_arch']} | {loop['tree']} | {loop['tree_tokens']} | "
            + " | ".join(f"{c:.2f}" for c in cells)
            + f" | {loop['outside_seconds_per_step'] * 1e3:.2f} | {loop['loop_seconds_per_step'] * 1e3:.2f} |"
        )
    lines += [
        "",
        "Projected speed-ups (projection: tau of the shipped heads on their SmolLM2-135M base, costs of this "
        "random base; step = t(n) + loop):",
        "",
        "| heads | tree | n | tau | tau source | expected tau | t(n)/t(1) | loop ms | projected tokens/s (projection) "
        "| projected speed-up vs plain forward (projection) | projected speed-up vs plain generate (projection) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["projections"]:
        tau = row["tau"]
        lines.append(
            f"| {row['heads']} | {row['tree']} | {row['tree_tokens']} | {tau['value']:.2f} | {tau['brief']} | "
            f"{row['expected_tau']:.2f} | {row['verify_ratio']:.2f} | {row['loop_seconds'] * 1e3:.2f} | "
            f"{row['versus_forward']['tokens_per_second']:.1f} | {row['versus_forward']['speedup']:.2f}x | "
            f"{row['versus_generate']['speedup']:.2f}x |"
        )
    lines += ["", *(f"* {note}" for note in report["notes"])]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> None:
    """`gpu_check.json` (everything) and, once the projections are in, `gpu_check.md`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_JSON).write_text(json.dumps(report, indent=1))
    if "projections" in report:
        (out_dir / RESULT_MARKDOWN).write_text(markdown(report))


def run(settings: Settings, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Measure, project and write the report, rewriting the JSON after every stage (a run cut short still
    leaves what it measured)."""
    report: dict = {"settings": dataclasses.asdict(settings), "notes": list(NOTES), "environment": {}}
    started = time.perf_counter()
    base = random_base(settings)
    built = {"base_dtype": str(base.dtype), "build_seconds": time.perf_counter() - started}
    report["environment"] = machine_info(base.device) | built
    log(f"base built in {report['environment']['build_seconds']:.1f} s")
    profile = forward_profile(base, settings)
    report["forward_profile"] = profile.to_record()
    write_report(report, out_dir)
    log("t(n)/t(1): " + ", ".join(f"{n}: {r:.2f}" for n, r in zip(profile.sizes, profile.ratios, strict=True)))
    plain = plain_generate(base, settings)
    report["plain_generate"] = dataclasses.asdict(plain)
    write_report(report, out_dir)
    loops = loop_timings(base, settings)
    report["loops"] = [timing.to_record() for timing in loops]
    write_report(report, out_dir)
    report["projections"] = [dataclasses.asdict(row) for row in projections(profile, loops, plain)]
    report["seconds"] = time.perf_counter() - started
    write_report(report, out_dir)
    log(f"projections written to {out_dir / RESULT_MARKDOWN} ({report['seconds']:.1f} s)")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape, float32, on the CPU: seconds")
    args = parser.parse_args(argv)
    run(DRY_RUN if args.dry_run else GPU, args.out)


if __name__ == "__main__":
    main()
