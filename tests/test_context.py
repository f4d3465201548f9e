"""Context candidates (hf_hydra.context) and trees merged from heads and context (hf_hydra.step_drafts).

The reference is plain greedy `generate`, as in test_decoding.py; the prompts repeat themselves, so the text
offers continuations to copy and the context candidates are accepted (checked, not assumed).
"""

from __future__ import annotations

import sys

import pytest
import torch
from test_decoding import ARCHS, HEAD_ARCHS, NEW_TOKENS, SMALL_VOCAB, _hydra, _plain, _prompts

from hf_hydra import context_speculative_generate
from hf_hydra.context import AcceptanceRates, ContextDrafter, SuffixIndex
from hf_hydra.decoding import tree_speculative_generate
from hf_hydra.tree import build_tree_buffers, merge_token_paths

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _repeating_prompts(seed: int = 7) -> list[torch.Tensor]:
    """Prompts that repeat a random phrase (with a change), and random ones."""
    prompts = []
    for phrase in _prompts(SMALL_VOCAB, lengths=(3, 5, 7), seed=seed):
        repeated = torch.cat([phrase, phrase[:, :2], phrase, (phrase + 1) % SMALL_VOCAB, phrase], dim=1)
        prompts.append(repeated)
    return prompts + _prompts(SMALL_VOCAB, lengths=(4, 9))


# ------------------------------------------------------------------------------------------------------
# The index


def test_continuations_longest_match_first_then_most_recent_and_distinct() -> None:
    index = SuffixIndex(max_ngram=3)
    index.extend([1, 2, 3, 9, 1, 2, 4, 5, 7, 2, 3, 8, 1, 2])
    found = index.continuations(length=3, max_candidates=5)
    # suffix (1, 2): after the 2-gram at positions 1 and 5 (most recent first), then after the 1-gram 2 at 9
    assert [(c.tokens, c.match_length) for c in found] == [((4, 5, 7), 2), ((3, 9, 1), 2), ((3, 8, 1), 1)]
    assert index.continuations(length=3, max_candidates=1) == found[:1]


def test_a_suffix_seen_nowhere_else_has_no_continuation() -> None:
    index = SuffixIndex()
    index.extend([4, 5, 6])
    assert index.continuations(length=4, max_candidates=3) == []


def _one_step(index: SuffixIndex, token: int) -> None:
    index.extend([token])
    index.continuations(10, 2)


def _traced_lines(function, *args) -> int:
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
        return tracer

    sys.settrace(tracer)
    try:
        function(*args)
    finally:
        sys.settrace(None)
    return lines


@pytest.mark.parametrize("length", [200, 20_000])
def test_the_index_work_per_token_does_not_grow_with_the_context(length: int) -> None:
    """The Python lines run by one step (append a token, find candidates) on a 200- and a 20,000-token text
    of the same repeating pattern are the same: nothing scans the context."""
    counts = []
    for size in (200, length):
        index = SuffixIndex()
        index.extend([i % 13 for i in range(size)])
        counts.append(_traced_lines(_one_step, index, size % 13))
    assert counts[0] == counts[1]


def test_candidates_are_cut_where_their_estimated_acceptance_drops() -> None:
    drafter = ContextDrafter(max_candidates=1, max_length=10, min_probability=0.1)
    drafter.extend([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2])
    (candidate,) = drafter.candidates()
    # prior rate 0.4: 0.4, 0.16 >= 0.1, 0.064 < 0.1 -> two tokens
    assert candidate.tokens == (3, 4) and candidate.match_length == 2
    for _ in range(20):
        drafter.rates.record(2, proposed=10, accepted=10)
    (candidate,) = drafter.candidates()
    assert candidate.tokens == (3, 4, 5, 6, 7, 8, 9, 10, 11, 1)


def test_acceptance_rates_count_the_first_rejection_only() -> None:
    rates = AcceptanceRates(prior_rate=0.5, prior_weight=2.0)
    rates.record(3, proposed=6, accepted=2)  # 2 successes, 1 failure; the 3 tokens after it were never tried
    assert rates.rate(3) == pytest.approx((2 + 1.0) / (3 + 2.0))
    assert rates.rate(1) == 0.5


# ------------------------------------------------------------------------------------------------------
# Merging by prefix


def test_merged_tree_shares_prefixes_and_keeps_children_distinct() -> None:
    tree = build_tree_buffers([[0], [1], [0, 0]], 4)
    tokens = torch.tensor([7, 3, 5, 9])  # root 7; depth 1: 3, 5; below 3: 9
    merged, merged_tokens, from_context = merge_token_paths(tree, tokens, [(3, 9, 4, 4), (6,), (3, 2)])

    def token_path(node: int) -> tuple[int, ...]:
        return tuple(merged_tokens[merged.ancestors[node, 1 : int(merged.depths[node]) + 1]].tolist())

    heads_paths = {(3,), (5,), (3, 9)}
    assert int(merged_tokens[0]) == 7 and merged.num_tokens == 8
    assert {token_path(a) for a in range(1, 8)} == heads_paths | {(6,), (3, 2), (3, 9, 4), (3, 9, 4, 4)}
    assert from_context.tolist() == [a > 0 and token_path(a) not in heads_paths for a in range(8)]
    for node in range(merged.num_tokens):  # siblings: distinct tokens
        children = merged_tokens[(merged.parents == node).nonzero()[:, 0]].tolist()
        assert len(children) == len(set(children))
    assert (merged.depths[1:] >= merged.depths[:-1]).all()  # depth order, as every tree


# ------------------------------------------------------------------------------------------------------
# Greedy output: plain generate's, with merged trees and with context alone


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
@pytest.mark.parametrize("arch", ARCHS)
def test_merged_trees_give_plain_greedy_tokens(tiny_model_factory, arch: str, head_arch: str) -> None:
    model = _hydra(tiny_model_factory, arch, head_arch)
    context_tokens = 0
    for prompt in _repeating_prompts():
        plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS)
        for tree in ("cpu_small_11", [[0]]):
            out = model.generate(
                prompt, speculative=True, tree=tree, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True
            )
            assert torch.equal(out.sequences, plain), f"prompt {prompt.tolist()}"
            context_tokens += out.speculation.context_tokens
    assert context_tokens > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_context_alone_gives_plain_greedy_tokens(tiny_model_factory, arch: str) -> None:
    model = _hydra(tiny_model_factory, arch)
    for prompt in _repeating_prompts():
        plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS)
        out = model.generate(prompt, speculative="context", max_new_tokens=NEW_TOKENS, return_dict_in_generate=True)
        assert torch.equal(out.sequences, plain)
        stats = out.speculation  # every accepted draft came from the context
        assert stats.context_tokens == stats.accepted_drafts >= sum(stats.accepted_lengths) - stats.steps
        # any causal LM, no heads: the custom_generate function
        assert torch.equal(
            model.base_lm.generate(prompt, custom_generate=context_speculative_generate, max_new_tokens=NEW_TOKENS),
            plain,
        )


def test_a_long_context_stays_exact(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory, "llama", "hydra++")
    prompt = torch.cat(_repeating_prompts() * 6, dim=1)  # a few hundred tokens, repeating
    plain = _plain(model, prompt, max_new_tokens=64)
    out = model.generate(prompt, speculative=True, max_new_tokens=64, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.speculation.tau > 1.5


def _new_token_inside_a_context_block(model, prompt: torch.Tensor) -> int | None:
    """A token that a context-only run accepts inside a step's block (not as its last token) and that is new
    in the generated text there: as EOS it stops the run inside the accepted candidate."""
    probe = model.generate(prompt, speculative="context", max_new_tokens=NEW_TOKENS, return_dict_in_generate=True)
    generated = probe.sequences[0, prompt.shape[1] :].tolist()
    start = 1
    for length in probe.speculation.accepted_lengths:
        block = generated[start : start + length]
        inside = [token for i, token in enumerate(block[:-1]) if token not in generated[: start + i]]
        if inside:
            return inside[0]
        start += length
    return None


def test_eos_inside_a_context_candidate(tiny_model_factory) -> None:
    """Stop at a token that arrives inside an accepted context candidate, not at its end (tiny random models
    repeat themselves, so a few models and prompts are searched for one)."""
    for seed in range(4):
        model = _hydra(tiny_model_factory, "llama", "hydra", seed=seed)
        for phrase in [p for prompt_seed in range(10) for p in _prompts(SMALL_VOCAB, (4, 6, 9), prompt_seed)]:
            prompt = torch.cat([phrase] * 3, dim=1)
            eos = _new_token_inside_a_context_block(model, prompt)
            if eos is None:
                continue
            plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
            for speculative in ("context", True):
                out = model.generate(prompt, speculative=speculative, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
                assert torch.equal(out, plain) and int(out[0, -1]) == eos
            return
    raise AssertionError("no context candidate was accepted with a new token inside it; choose other prompts")


def test_sources_are_validated(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory)
    with pytest.raises(ValueError, match="sources must be one of"):
        model.generate(_prompts(SMALL_VOCAB)[1], speculative=True, sources="lookup", max_new_tokens=4)
    with pytest.raises(ValueError, match="needs draft heads"):
        model.base_lm.generate(
            _prompts(SMALL_VOCAB)[1], custom_generate=tree_speculative_generate, sources="heads", max_new_tokens=4
        )
