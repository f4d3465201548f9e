"""Tree decoding on a CUDA GPU (every test is marked `cuda`: skipped where torch sees no CUDA device).

The four tiny architectures of conftest, moved to the GPU with fresh heads: greedy `speculative=True` gives plain
greedy `generate`'s tokens in float32, and in bfloat16 up to a first differing token that is a top-2 logit tie
under bfloat16 rounding (`FirstMismatch.is_bfloat16_tie`); the heads, the tree buffers the loop verifies with and
its outputs live on the GPU; lossless and typical sampling run; and a decoding step synchronises the host with the
device a bounded number of times (`count_host_syncs`: the syncs by file:line are printed, `pytest -rP` shows them).

`gpu_check/device_check.py` runs this file on the lent GPU machine (gpu_check/README.md).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest
import torch
from conftest import TINY_ARCHS, TINY_VOCAB, make_tiny_model
from transformers import PreTrainedModel

from hf_hydra import HydraForCausalLM, HydraGenerateOutput, decoding

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda")
HEAD_ARCHS = ("medusa", "hydra", "hydra++")
TREES = ("cpu_small_11", "mc_sim_7b_63")
NUM_HEADS = 4
NEW_TOKENS = 32
# Two logits at most this many bfloat16 steps apart are a tie: a one-token forward and a tree forward round
# differently (on the CPU the first differing tokens of tiny models were 0 or 1 step apart).
TIE_STEPS = 2
# The loop syncs per step a few times for acceptance and cache compaction, once per appended token (the stopping
# criteria) and a few times more with context candidates; a sync per tree node would cost >= 63 on mc_sim_7b_63.
MAX_SYNCS_PER_STEP = 24
T = TypeVar("T")


def _prompts(lengths: tuple[int, ...] = (5, 11), seed: int = 1234) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY_VOCAB, (1, n), generator=generator).to(DEVICE) for n in lengths]


def _model(arch: str, head_arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> HydraForCausalLM:
    """Fresh seeded heads on a tiny seeded base, both on the GPU in `dtype`. Gemma is untied, as in
    test_decoding (a tiny random tied Gemma repeats one token forever)."""
    overrides = {"tie_word_embeddings": False} if arch == "gemma" else {}
    base = make_tiny_model(arch, seed=seed, **overrides).to(DEVICE, dtype)
    torch.manual_seed(seed + 100)
    return HydraForCausalLM.from_base(base, head_arch=head_arch, num_heads=NUM_HEADS).eval()


def _plain(model: HydraForCausalLM, prompt: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.base_lm.generate(prompt, do_sample=False, max_new_tokens=NEW_TOKENS, **kwargs)


def _speculative(model: HydraForCausalLM, prompt: torch.Tensor, **kwargs) -> HydraGenerateOutput:
    kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    out = model.generate(prompt, speculative=True, return_dict_in_generate=True, **kwargs)
    assert isinstance(out, HydraGenerateOutput)
    return out


# ------------------------------------------------------------------------------------------------------
# Greedy: plain greedy's tokens


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_speculative_equals_greedy_in_float32(arch: str, head_arch: str, tree: str) -> None:
    model = _model(arch, head_arch)
    for prompt in _prompts():
        out = _speculative(model, prompt, tree=tree)
        assert torch.equal(out.sequences, _plain(model, prompt)), f"{arch} {head_arch} {tree} {prompt.tolist()}"


@dataclass(frozen=True)
class FirstMismatch:
    """The first token where a speculative sequence differs from plain greedy's, and the base's view there."""

    index: int  # position in the sequence
    plain_token: int
    speculative_token: int
    top2: tuple[int, int]  # the base's two best next tokens after the common prefix (one forward over it)
    gap: float  # their logit gap
    step: float  # one bfloat16 step (unit in the last place) at the larger of the two logits

    @property
    def is_bfloat16_tie(self) -> bool:
        """Both tokens are the base's top two, and their logits are at most `TIE_STEPS` bfloat16 steps apart:
        which one wins depends on how a forward rounds, not on the decoding."""
        return set(self.top2) == {self.plain_token, self.speculative_token} and self.gap <= TIE_STEPS * self.step


def bfloat16_step(value: float) -> float:
    """The spacing of bfloat16 numbers (8 significant bits) at `value`."""
    return 2.0 ** (math.floor(math.log2(abs(value))) - 7) if value else 2.0**-133


@torch.no_grad()
def first_mismatch(base: PreTrainedModel, plain: torch.Tensor, speculative: torch.Tensor) -> FirstMismatch | None:
    """None when the (1, S) sequences are equal; else their first differing token, classified."""
    if torch.equal(plain, speculative):
        return None
    common = min(plain.shape[1], speculative.shape[1])
    differing = (plain[0, :common] != speculative[0, :common]).nonzero()
    assert differing.numel(), f"one sequence stops early: lengths {plain.shape[1]} and {speculative.shape[1]}"
    index = int(differing[0])
    values, tokens = base(plain[:, :index]).logits[0, -1].float().topk(2)
    return FirstMismatch(
        index=index,
        plain_token=int(plain[0, index]),
        speculative_token=int(speculative[0, index]),
        top2=(int(tokens[0]), int(tokens[1])),
        gap=float(values[0] - values[1]),
        step=bfloat16_step(float(values[0])),
    )


def test_first_mismatch_classification() -> None:
    """The tie rule on hand-made cases: a one-step gap between the two tokens is a tie; a wide gap, or a token
    outside the top two, is not."""
    tie = FirstMismatch(index=3, plain_token=5, speculative_token=7, top2=(7, 5), gap=0.0078125, step=0.0078125)
    assert tie.is_bfloat16_tie
    assert not FirstMismatch(3, 5, 7, (7, 5), gap=0.5, step=0.0078125).is_bfloat16_tie
    assert not FirstMismatch(3, 5, 9, (7, 5), gap=0.0, step=0.0078125).is_bfloat16_tie
    assert bfloat16_step(2.3) == 2.0**-6 and bfloat16_step(-1.0) == 2.0**-7


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_speculative_equals_greedy_in_bfloat16_up_to_ties(arch: str, head_arch: str) -> None:
    model = _model(arch, head_arch, torch.bfloat16)
    for tree in TREES:
        for prompt in _prompts(lengths=(5, 9, 11)):
            out = _speculative(model, prompt, tree=tree)
            mismatch = first_mismatch(model.base_lm, _plain(model, prompt), out.sequences)
            assert mismatch is None or mismatch.is_bfloat16_tie, f"{arch} {head_arch} {tree}: {mismatch}"


# ------------------------------------------------------------------------------------------------------
# Where things live


def test_heads_tree_buffers_and_outputs_are_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("llama", "hydra++")
    assert {t.device.type for t in [*model.heads.parameters(), *model.heads.buffers()]} == {DEVICE.type}
    seen: list[torch.device] = []

    def verify_tree(base, cache, tokens, tree, *args, **kwargs):
        verified = original_verify(base, cache, tokens, tree, *args, **kwargs)
        buffers = (tree.depths, tree.parents, tree.attention_mask, tree.ancestors, tree.leaf_paths)
        levels = [t for level in tree.levels for t in (level.parents, level.parent_rows, level.ranks)]
        seen.extend(t.device for t in (tokens, *buffers, *levels, verified.logits, verified.hidden))
        return verified

    def accept(*args, **kwargs):
        accepted = original_accept(*args, **kwargs)
        seen.extend((accepted.nodes.device, accepted.bonus_token.device))
        return accepted

    original_verify, original_accept = decoding.verify_tree, decoding.accept
    monkeypatch.setattr(decoding, "verify_tree", verify_tree)
    monkeypatch.setattr(decoding, "accept", accept)
    out = _speculative(model, _prompts()[0], tree="mc_sim_7b_63")
    assert out.speculation.steps > 0 and seen
    assert {device.type for device in seen} == {DEVICE.type}
    assert out.sequences.device.type == DEVICE.type


# ------------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("acceptance", ["lossless", "typical"])
@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_sampling_runs_and_is_reproducible_with_a_cuda_generator(head_arch: str, acceptance: str) -> None:
    model = _model("llama", head_arch)
    prompt = _prompts()[0]
    options = {"do_sample": True, "temperature": 0.8, "top_k": 50, "acceptance": acceptance, "tree": "mc_sim_7b_63"}
    runs = [
        _speculative(model, prompt, generator=torch.Generator(device=DEVICE).manual_seed(7), **options)
        for _ in range(2)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].sequences.shape[1] == prompt.shape[1] + NEW_TOKENS
    assert int(runs[0].sequences.max()) < TINY_VOCAB and runs[0].speculation.tau >= 1.0
    global_rng = _speculative(model, prompt, do_sample=True, tree="cpu_small_11")  # torch's global RNG
    assert global_rng.sequences.shape[1] == prompt.shape[1] + NEW_TOKENS


# ------------------------------------------------------------------------------------------------------
# Host synchronisations


@dataclass(frozen=True)
class SyncCount:
    """Host-device synchronisations torch flagged (`torch.cuda.set_sync_debug_mode("warn")`), by the Python line
    that caused them ("file:line")."""

    by_line: Counter[str]

    @property
    def total(self) -> int:
        return sum(self.by_line.values())


def count_host_syncs(run: Callable[[], T]) -> tuple[T, SyncCount]:
    """`run()`, counting the synchronising CUDA operations it performs (`.item()`, `.tolist()`, `bool()` of a
    GPU tensor, blocking copies, ...) by the Python line that called each."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = run()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    lines = Counter(
        f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )
    return result, SyncCount(lines)


def _syncs_per_step(model: HydraForCausalLM, prompt: torch.Tensor, label: str, **options) -> float:
    """Host syncs per decoding step: two calls of different lengths, whose difference is what the extra steps cost
    (generate's set-up and the prefill cancel). Prints them per step by file:line."""
    _speculative(model, prompt, max_new_tokens=8, **options)  # warm-up: cached tree buffers, kernels
    short, short_syncs = count_host_syncs(lambda: _speculative(model, prompt, max_new_tokens=8, **options))
    long, long_syncs = count_host_syncs(lambda: _speculative(model, prompt, max_new_tokens=40, **options))
    steps = long.speculation.steps - short.speculation.steps
    assert steps > 0
    per_step = (long_syncs.total - short_syncs.total) / steps
    per_line = {line: (long_syncs.by_line[line] - short_syncs.by_line[line]) / steps for line in long_syncs.by_line}
    print(f"{label}: {per_step:.2f} host syncs per step over {steps} steps")
    for line, count in sorted(per_line.items(), key=lambda item: -item[1]):
        print(f"  {count:6.2f}  {line}")
    return per_step


@pytest.mark.parametrize("sources", ["heads", "heads+context"])
@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_host_syncs_per_greedy_step_are_bounded(head_arch: str, sources: str) -> None:
    model = _model("llama", head_arch)
    label = f"greedy, {head_arch}, sources={sources}"
    per_step = _syncs_per_step(model, _prompts()[1], label, tree="mc_sim_7b_63", sources=sources)
    assert per_step <= MAX_SYNCS_PER_STEP


def test_host_syncs_per_lossless_sampling_step_are_bounded() -> None:
    """Lossless acceptance may sync once more per rejected child of the last accepted node: at most the tree's
    widest fan-out (10 for mc_sim_7b_63's root) on top of the greedy bound."""
    model = _model("llama", "hydra")
    options = {"tree": "mc_sim_7b_63", "sources": "heads", "do_sample": True, "temperature": 0.8}
    per_step = _syncs_per_step(model, _prompts()[1], "lossless sampling, hydra, sources=heads", **options)
    assert per_step <= MAX_SYNCS_PER_STEP + 10
