"""Sampling with speculation, end to end through `generate(do_sample=True, speculative=...)`.

Lossless tree sampling is judged statistically against plain sampling:

* model: a tiny random Llama with an 8-token vocabulary and random (seeded) draft heads; a 5-token prompt.
* reference: the EXACT joint distribution of the first three sampled tokens under plain sampling, read
  from plain `generate`'s own processed scores (`output_scores`, i.e. after its temperature / top-k /
  top-p / min-p / repetition-penalty processors) after the prompt, after all 8 one-token and all 64
  two-token continuations: P(x1, x2, x3) = p(x1) p(x2 | x1) p(x3 | x1, x2), 512 cells.
* sample: N = 800 speculative calls with `max_new_tokens=3` and a seeded generator (the first token comes
  from the prefill, the next two from the first tree step or two: accepted drafts, rejections, bonus).
* statistic: Pearson's chi-square over the 512 cells, cells expected < 5 times pooled into one; the test
  passes when its p-value exceeds 1e-3.
* power: `test_a_wrong_residual_fails_the_statistical_test` swaps the residual r <- norm(r with c zeroed)
  for a wrong one inside the test only: forgetting to renormalise, or not zeroing the rejected token.
  With N = 1000 and 600 samples the same test then gives p < 1e-6 (measured: p = 2e-14 and 4e-28; with the
  correct residual and these N: p = 0.62 and 0.39).
* harness: plain sampling itself (a batched `generate` with `num_return_sequences`) passes the same test.

Typical acceptance is not distribution-preserving, so it is tested by its limits (temperature -> 0 and
top_k=1 give greedy decoding) and by reproducibility.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from sampling_stats import chi_square_p_value, exact_first_three
from transformers import GenerationConfig, PreTrainedModel

from hf_hydra import HydraForCausalLM, HydraGenerateOutput, acceptance
from hf_hydra.dynamic_tree import DynamicTreePolicy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STAT_VOCAB = 8
STAT_PROMPT = torch.tensor([[1, 2, 3, 4, 5]])
STAT_SAMPLES = 800
P_VALUE_PASS = 1e-3
P_VALUE_FAIL = 1e-6
# Three children at the root, two under the first two of them, depth 3.
WIDE_TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [0, 0, 0]]

DRAFT_VOCAB = "draft_vocab"  # heads projecting onto 5 of the 8 tokens: proposals with zeros outside them
# name: (head_arch or DRAFT_VOCAB, speculative, tree, sampling options). speculative True: the heads' tree
# merged with context candidates (the default sources); "heads": the heads alone; "context": no heads.
STAT_CASES: dict[str, tuple[str, bool | str, object, dict]] = {
    "temperature_1-wide_tree": ("hydra", True, WIDE_TREE, {}),
    "heads_only-temperature_0.8-wide_tree": ("hydra", "heads", WIDE_TREE, {"temperature": 0.8}),
    "merged-temperature_0.9-chain_2": ("hydra++", True, "chain-2", {"temperature": 0.9}),
    "merged-temperature_0.9-dynamic": ("hydra++", True, "dynamic", {"temperature": 0.9}),
    "context_only-temperature_1.2-top_k_5": ("hydra", "context", None, {"temperature": 1.2, "top_k": 5}),
    "temperature_0.6-top_k_3-wide_tree": ("hydra++", True, WIDE_TREE, {"temperature": 0.6, "top_k": 3}),
    "temperature_1.4-top_p_0.85-cpu_small_11": ("medusa", True, "cpu_small_11", {"temperature": 1.4, "top_p": 0.85}),
    "repetition_penalty-min_p-chain": ("hydra", True, "chain-3", {"repetition_penalty": 1.5, "min_p": 0.05}),
    "assisted-temperature_0.8-draft_vocab": (DRAFT_VOCAB, "assisted", None, {"temperature": 0.8}),
}


def _stat_model(
    factory: Callable[..., PreTrainedModel], head_arch: str = "hydra", dtype: torch.dtype = torch.float32
) -> HydraForCausalLM:
    base = factory("llama", seed=0, vocab_size=STAT_VOCAB).to(dtype)
    torch.manual_seed(100)
    if head_arch == DRAFT_VOCAB:
        return HydraForCausalLM.from_base(
            base, head_arch="hydra", num_heads=4, vocab_projection="draft_vocab",
            draft_token_ids=torch.tensor([6, 0, 3, 2, 7]),
        ).eval()  # fmt: skip
    model = HydraForCausalLM.from_base(base, head_arch=head_arch, num_heads=4).eval()
    # flat cost: trees as big as the heads' 2 children of 2 nodes per depth allow, and the context's
    model.dynamic_tree = DynamicTreePolicy(tuple(1.0 + 0.02 * m for m in range(32)), children=2, width=2)
    return model


def speculative_first_three(
    model: HydraForCausalLM, speculative: bool | str, tree: object, samples: int, seed: int, **sampling
) -> torch.Tensor:
    """(V, V, V) counts of the first three tokens of `samples` speculative sampling calls."""
    counts = torch.zeros(STAT_VOCAB, STAT_VOCAB, STAT_VOCAB)
    torch.manual_seed(seed)  # the assisted loop draws from the global RNG
    options = _speculative_options(speculative, tree, seed)
    for _ in range(samples):
        out = model.generate(STAT_PROMPT, do_sample=True, max_new_tokens=3, **options, **sampling)
        counts[tuple(out[0, STAT_PROMPT.shape[1] :].tolist())] += 1
    return counts


def _speculative_options(speculative: bool | str, tree: object, seed: int) -> dict:
    if speculative == "assisted":
        return {"speculative": "assisted"}
    options = {"speculative": speculative, "generator": torch.Generator().manual_seed(seed)}
    if speculative == "heads":
        options |= {"speculative": True, "sources": "heads"}
    return options | ({"tree": tree} if tree is not None else {})


@pytest.mark.parametrize("speculative,tree", [(True, "chain-2"), (True, "dynamic"), ("context", None)])
def test_context_candidates_are_accepted_in_the_statistical_setting(tiny_model_factory, speculative, tree) -> None:
    """The merged and context-only cases above do verify context candidates: some are accepted."""
    model = _stat_model(tiny_model_factory, "hydra++")
    options = _speculative_options(speculative, tree, seed=2)
    accepted = 0
    for _ in range(100):
        out = model.generate(
            STAT_PROMPT, do_sample=True, max_new_tokens=6, return_dict_in_generate=True, **options
        )
        accepted += out.speculation.context_tokens
    assert accepted >= 5  # seeded: 28 (chain-2), 8 (dynamic: the heads' wider trees hold most context tokens too)


def test_the_reference_is_plain_sampling(tiny_model_factory) -> None:
    """Harness check: plain sampling (batched) passes the test against the exact reference, and the
    reference is a distribution."""
    base = _stat_model(tiny_model_factory).base_lm
    for sampling in ({}, {"temperature": 0.6, "top_k": 3}, {"repetition_penalty": 1.5, "min_p": 0.05}):
        exact = exact_first_three(base, STAT_PROMPT, **sampling)
        assert float(exact.sum()) == pytest.approx(1.0, abs=1e-5)
        torch.manual_seed(0)
        plain = base.generate(
            STAT_PROMPT, do_sample=True, max_new_tokens=3, num_return_sequences=4000, **sampling
        )[:, STAT_PROMPT.shape[1] :]
        counts = torch.zeros_like(exact).index_put_(tuple(plain.T), torch.ones(len(plain)), accumulate=True)
        assert chi_square_p_value(counts, exact) > P_VALUE_PASS, sampling


@pytest.mark.parametrize("case", STAT_CASES)
def test_lossless_sampling_matches_plain_sampling(tiny_model_factory, case: str) -> None:
    """See the module docstring for the design. Trees with several children per node, several
    temperatures, top-k, top-p, min-p and repetition penalty; the tree loop and the assisted loop (whose
    proposals, from heads with a reduced draft vocabulary, are 0 outside it)."""
    head_arch, speculative, tree, sampling = STAT_CASES[case]
    model = _stat_model(tiny_model_factory, head_arch)
    exact = exact_first_three(model.base_lm, STAT_PROMPT, **sampling)
    counts = speculative_first_three(model, speculative, tree, STAT_SAMPLES, seed=1, **sampling)
    assert chi_square_p_value(counts, exact) > P_VALUE_PASS


@pytest.mark.parametrize("case", ["temperature_1-wide_tree", "merged-temperature_0.9-dynamic"])
def test_lossless_sampling_on_a_bfloat16_base_matches_its_plain_sampling(tiny_model_factory, case: str) -> None:
    """The same test on a bfloat16 base and heads: the reference is that base's own plain sampling (its bfloat16
    scores); the tree's forward rounds its logits differently, far below what 800 samples can see."""
    head_arch, speculative, tree, sampling = STAT_CASES[case]
    model = _stat_model(tiny_model_factory, head_arch, dtype=torch.bfloat16)
    assert model.base_lm.dtype == torch.bfloat16 and {p.dtype for p in model.heads.parameters()} == {torch.bfloat16}
    exact = exact_first_three(model.base_lm, STAT_PROMPT, **sampling)
    counts = speculative_first_three(model, speculative, tree, STAT_SAMPLES, seed=1, **sampling)
    assert chi_square_p_value(counts, exact.float()) > P_VALUE_PASS


def _no_renormalisation(probs: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return probs.scatter(1, rejected[:, None], 0.0)


def _no_zeroing(probs: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return probs


@pytest.mark.parametrize(("wrong_residual", "samples"), [(_no_renormalisation, 1000), (_no_zeroing, 600)])
def test_a_wrong_residual_fails_the_statistical_test(tiny_model_factory, monkeypatch, wrong_residual, samples) -> None:
    """The statistical test above detects a wrong rejection rule (patched in here, in the test only), on its
    first case with fewer samples."""
    monkeypatch.setattr(acceptance, "rejection_residual", wrong_residual)
    model = _stat_model(tiny_model_factory)
    exact = exact_first_three(model.base_lm, STAT_PROMPT)
    counts = speculative_first_three(model, True, WIDE_TREE, samples, seed=1)
    assert chi_square_p_value(counts, exact) < P_VALUE_FAIL


# ------------------------------------------------------------------------------------------------------
# Limits, reproducibility, defaults, stopping

SMALL_VOCAB = 16
NEW_TOKENS = 24
# Every token at depth 1 and every pair at depth 2: exercises multi-token acceptance on every step.
FULL_TREE = [[r] for r in range(SMALL_VOCAB)] + [[r, s] for r in range(SMALL_VOCAB) for s in range(SMALL_VOCAB)]


def _model(factory: Callable[..., PreTrainedModel], head_arch: str = "hydra", arch: str = "llama") -> HydraForCausalLM:
    base = factory(arch, seed=0, vocab_size=SMALL_VOCAB)
    torch.manual_seed(100)
    model = HydraForCausalLM.from_base(base, head_arch=head_arch, num_heads=4).eval()
    # flat cost: trees as big as the heads' 2 children of 2 nodes per depth allow, and the context's
    model.dynamic_tree = DynamicTreePolicy(tuple(1.0 + 0.02 * m for m in range(32)), children=2, width=2)
    return model


def _prompts(lengths: tuple[int, ...] = (3, 8)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(0, SMALL_VOCAB, (1, n), generator=generator) for n in lengths]


@pytest.mark.parametrize("head_arch", ["medusa", "hydra", "hydra++"])
@pytest.mark.parametrize("acceptance_rule", ["typical", "lossless"])
def test_sampling_reduces_to_greedy_at_vanishing_temperature(tiny_model_factory, head_arch, acceptance_rule) -> None:
    """p a point mass on the argmax (top_k=1, or temperature -> 0): typical acceptance's threshold becomes
    eps and only argmax drafts pass, lossless sampling samples the argmax: both are greedy decoding."""
    model = _model(tiny_model_factory, head_arch)
    for prompt in _prompts():
        greedy = model.base_lm.generate(prompt, do_sample=False, max_new_tokens=NEW_TOKENS)
        for sampling in ({"top_k": 1}, {"temperature": 1e-4}):
            for tree in ("cpu_small_11", FULL_TREE):
                out = model.generate(
                    prompt, speculative=True, do_sample=True, acceptance=acceptance_rule, tree=tree,
                    max_new_tokens=NEW_TOKENS, return_dict_in_generate=True, **sampling,
                )  # fmt: skip
                assert torch.equal(out.sequences, greedy), (sampling, tree)
                if tree is FULL_TREE:
                    assert min(out.speculation.accepted_lengths[:-1]) >= 3  # multi-token steps were taken


@pytest.mark.parametrize("acceptance_rule", ["lossless", "typical"])
def test_runs_are_reproducible(tiny_model_factory, acceptance_rule: str) -> None:
    model = _model(tiny_model_factory, "hydra++")
    prompt = _prompts((5,))[0]
    kwargs = {"do_sample": True, "acceptance": acceptance_rule, "max_new_tokens": NEW_TOKENS, "temperature": 1.2}

    def with_seed(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return model.generate(prompt, speculative=True, **kwargs)

    def with_generator(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)  # irrelevant: every draw comes from the generator
        return model.generate(prompt, speculative=True, generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(with_seed(3), with_seed(3))
    assert not torch.equal(with_seed(3), with_seed(4))
    assert torch.equal(with_generator(3, global_seed=0), with_generator(3, global_seed=1))
    assert not torch.equal(with_generator(3, global_seed=0), with_generator(4, global_seed=0))


def test_assisted_sampling_is_reproducible_with_a_seed(tiny_model_factory) -> None:
    model = _model(tiny_model_factory)
    prompt = _prompts((5,))[0]
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(model.generate(prompt, speculative="assisted", do_sample=True, max_new_tokens=NEW_TOKENS))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert runs[0].shape[1] == prompt.shape[1] + NEW_TOKENS


def test_acceptance_default_comes_from_the_generation_config(tiny_model_factory) -> None:
    model = _model(tiny_model_factory)
    prompt = _prompts((5,))[0]
    assert model.config.acceptance == "lossless" and model.generation_config.hydra_acceptance == "lossless"

    def run(**kwargs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(11)
        return model.generate(
            prompt, speculative=True, do_sample=True, generator=generator, max_new_tokens=NEW_TOKENS, **kwargs
        )

    lossless, typical = run(acceptance="lossless"), run(acceptance="typical")
    assert torch.equal(run(), lossless) and not torch.equal(lossless, typical)
    model.generation_config.hydra_acceptance = "typical"
    assert torch.equal(run(), typical)
    # A GenerationConfig passed to generate (sampling on, the model's hydra_* defaults kept).
    config = GenerationConfig(do_sample=True, max_new_tokens=NEW_TOKENS, hydra_acceptance="lossless")
    generated = model.generate(
        prompt, speculative=True, generation_config=config, generator=torch.Generator().manual_seed(11)
    )
    assert torch.equal(generated, lossless)


def test_typical_accepts_more_than_lossless_with_random_heads(tiny_model_factory) -> None:
    """Typical acceptance trades exactness for acceptance: with the same heads and tree it keeps more
    drafts per step than lossless sampling (here summed over prompts and seeds)."""
    model = _model(tiny_model_factory)
    totals = {"lossless": [0, 0], "typical": [0, 0]}
    for prompt in _prompts((3, 6, 9)):
        for seed in range(3):
            for rule in totals:
                out = model.generate(
                    prompt, speculative=True, do_sample=True, acceptance=rule, tree="cpu_small_11",
                    generator=torch.Generator().manual_seed(seed), max_new_tokens=NEW_TOKENS,
                    return_dict_in_generate=True,
                )  # fmt: skip
                assert isinstance(out, HydraGenerateOutput)
                totals[rule][0] += sum(out.speculation.accepted_lengths)
                totals[rule][1] += out.speculation.steps
    tau = {rule: tokens / steps for rule, (tokens, steps) in totals.items()}
    assert tau["typical"] > tau["lossless"] >= 1.0, tau


@pytest.mark.parametrize("acceptance_rule", ["lossless", "typical"])
def test_sampling_stops_at_eos_and_length(tiny_model_factory, acceptance_rule: str) -> None:
    model = _model(tiny_model_factory)
    prompt = _prompts((4,))[0]
    stopped_early = 0
    for seed in range(6):
        out = model.generate(
            prompt, speculative=True, do_sample=True, acceptance=acceptance_rule, tree=FULL_TREE, eos_token_id=3,
            max_new_tokens=NEW_TOKENS, generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        generated = out[0, prompt.shape[1] :].tolist()
        assert len(generated) <= NEW_TOKENS
        assert 3 not in generated[:-1]  # nothing after the first EOS
        if len(generated) < NEW_TOKENS:
            assert generated[-1] == 3
            stopped_early += 1
    assert stopped_early >= 1


def test_sampling_option_errors(tiny_model_factory) -> None:
    model = _model(tiny_model_factory)
    prompt = _prompts((4,))[0]
    cases = [
        ({"acceptance": "nucleus"}, ValueError, "acceptance"),
        ({"acceptance": "lossless", "posterior_threshold": 0.1}, ValueError, "typical"),
        ({"acceptance": "typical", "posterior_threshold": 1.5}, ValueError, "posterior_threshold"),
        ({"generator": 3}, TypeError, "generator"),
        ({"speculative": "assisted", "acceptance": "typical"}, ValueError, "assisted"),
        ({"speculative": "assisted", "generator": torch.Generator()}, ValueError, "manual_seed"),
        ({"speculative": "assisted", "tree": "chain"}, ValueError, "drafts a chain, not a tree"),
    ]
    for kwargs, error, match in cases:
        kwargs = {"speculative": True} | kwargs
        with pytest.raises(error, match=match):
            model.generate(prompt, do_sample=True, max_new_tokens=4, **kwargs)
