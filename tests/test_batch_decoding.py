"""Batches in the tree loop: `generate(input_ids, attention_mask=..., speculative=True)` on left-padded prompts.

Each row must give what plain greedy `generate` gives on that prompt ALONE (unpadded); padding and batching
change reduction orders, so a first difference is allowed only at a floating-point tie (`tests/ties.py`), and
the tiny models here have none. Sampled rows must follow plain sampling's distribution (chi-square, B = 3).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS, TINY_VOCAB, make_tiny_model
from sampling_stats import chi_square_p_value, exact_first_three
from ties import assert_same_or_tie
from transformers import AutoTokenizer, TextStreamer

from hf_hydra import HydraForCausalLM, assets, bench_batch
from hf_hydra.bench import spread_over_categories
from hf_hydra.cli import chat_input_ids
from hf_hydra.dynamic_tree import DynamicTreePolicy
from hf_hydra.verification import keep_accepted_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAD = 0
FLAT_COST = DynamicTreePolicy(tuple(1.0 + 0.05 * m for m in range(32)), children=2, width=2)


def _model(arch: str = "llama", head_arch: str = "hydra++", vocab: int = TINY_VOCAB, seed: int = 1) -> HydraForCausalLM:
    """Fresh heads on a tiny base (Gemma untied: a tiny random tied Gemma repeats one token forever)."""
    base = make_tiny_model(arch, vocab_size=vocab, **({"tie_word_embeddings": False} if arch == "gemma" else {}))
    torch.manual_seed(seed)
    model = HydraForCausalLM.from_base(base, head_arch=head_arch, num_heads=4).eval()
    model.dynamic_tree = FLAT_COST
    return model


def _prompts(lengths: tuple[int, ...], vocab: int = TINY_VOCAB, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=generator) for n in lengths]


def left_pad(prompts: list[torch.Tensor], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask of (n,) prompts left-padded to the longest."""
    return bench_batch.left_pad([prompt[None] for prompt in prompts], pad)


def _assert_rows_match_alone(
    model: HydraForCausalLM, prompts: list[torch.Tensor], batch: torch.Tensor, **options
) -> list[str]:
    """Each row of `batch` (B, L + n), padding stripped, equals plain greedy on its prompt alone (or a tie)."""
    ties = []
    longest = max(p.shape[0] for p in prompts)
    for row, prompt in enumerate(prompts):
        alone = model.base_lm.generate(prompt[None], do_sample=False, **options)  # (1, n_b + new_b)
        got = batch[row : row + 1, longest - prompt.shape[0] :][:, : alone.shape[1]]
        assert torch.all(batch[row, longest - prompt.shape[0] + alone.shape[1] :] == options.get("pad_token_id", PAD))
        tie = assert_same_or_tie(model.base_lm, alone, got, prompt.shape[0])
        if tie is not None:
            ties.append(f"row {row}: {tie}")
    return ties


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("head_arch", ["medusa", "hydra", "hydra++"])
def test_greedy_rows_equal_plain_greedy_on_each_prompt_alone(arch: str, head_arch: str) -> None:
    model = _model(arch, head_arch)
    prompts = _prompts((3, 41, 17, 9))
    ids, mask = left_pad(prompts)
    for tree in ("cpu_small_11", "dynamic"):
        out = model.generate(ids, attention_mask=mask, speculative=True, tree=tree, max_new_tokens=30)
        assert out.shape == (4, ids.shape[1] + 30)
        assert not _assert_rows_match_alone(model, prompts, out, max_new_tokens=30)


@pytest.mark.parametrize("sources", ["heads", "context", "heads+context"])
def test_every_source_decodes_batches(sources: str) -> None:
    model = _model()
    prompts = _prompts((6, 25, 12))
    repeated = [torch.cat([p, p, p]) for p in prompts]  # context candidates find continuations to copy
    ids, mask = left_pad(repeated)
    out = model.generate(
        ids, attention_mask=mask, speculative=True, sources=sources, max_new_tokens=24, return_dict_in_generate=True
    )
    assert not _assert_rows_match_alone(model, repeated, out.sequences, max_new_tokens=24)
    per_row = out.speculation_per_row
    assert len(per_row) == 3 and all(s.new_tokens == 24 for s in per_row)
    assert out.speculation.new_tokens == 72 and out.speculation.steps >= max(s.steps for s in per_row)
    assert out.speculation.context_tokens == sum(s.context_tokens for s in per_row)
    if sources != "heads":
        assert out.speculation.context_tokens > 0


def _eos_after(model: HydraForCausalLM, prompt: torch.Tensor, new_tokens: int) -> int:
    """The token plain greedy produces as its `new_tokens`-th: as EOS, the row stops there."""
    return int(model.base_lm.generate(prompt[None], do_sample=False, max_new_tokens=new_tokens)[0, -1])


def test_rows_stop_at_different_times_and_are_padded_like_plain_generate() -> None:
    """Row 1 stops at its EOS, row 2 at once (EOS as its first token), row 0 runs to the length limit."""
    model = _model()
    prompts = _prompts((7, 19, 11), seed=3)
    eos = [_eos_after(model, prompts[1], 6), _eos_after(model, prompts[2], 1)]
    assert _eos_after(model, prompts[0], 1) not in eos  # row 0 must not stop early by chance
    ids, mask = left_pad(prompts)
    options = {"max_new_tokens": 20, "eos_token_id": eos, "pad_token_id": 5}
    out = model.generate(ids, attention_mask=mask, speculative=True, return_dict_in_generate=True, **options)
    ties = _assert_rows_match_alone(model, prompts, out.sequences, **options)
    assert not ties
    assert [s.new_tokens for s in out.speculation_per_row] == [
        model.base_lm.generate(p[None], do_sample=False, **options).shape[1] - p.shape[0] for p in prompts
    ]
    assert out.speculation_per_row[2].steps == 0  # finished at the prefill: never drafted nor verified
    plain = model.base_lm.generate(ids, attention_mask=mask, do_sample=False, **options)
    assert torch.equal(out.sequences, plain)  # the same padding as plain batched generate


def test_logits_processors_and_stop_strings_apply_per_row_as_in_plain_batched_generate() -> None:
    model = _model()
    prompts = _prompts((5, 23, 14), seed=4)
    ids, mask = left_pad(prompts)
    options = {"max_new_tokens": 24, "repetition_penalty": 1.8, "no_repeat_ngram_size": 3, "pad_token_id": PAD}
    fast = model.generate(ids, attention_mask=mask, speculative=True, **options)
    plain = model.base_lm.generate(ids, attention_mask=mask, do_sample=False, **options)
    assert torch.equal(fast, plain)


def test_a_batch_of_one_is_the_single_prompt_path() -> None:
    model = _model()
    prompt = _prompts((13,))[0][None]
    options = {"speculative": True, "tree": "cpu_small_11", "max_new_tokens": 20, "return_dict_in_generate": True}
    single = model.generate(prompt, **options)
    assert single.speculation_per_row is None
    batched = model.generate(torch.cat([prompt, prompt]), **options)
    assert torch.equal(batched.sequences[0], single.sequences[0])
    assert torch.equal(batched.sequences[1], single.sequences[0])
    assert batched.speculation_per_row[0] == single.speculation


@pytest.mark.parametrize("acceptance", ["lossless", "typical"])
def test_sampled_batches_are_reproducible_and_end_where_plain_would(acceptance: str) -> None:
    model = _model()
    ids, mask = left_pad(_prompts((4, 15, 9)))
    options = {"do_sample": True, "max_new_tokens": 16, "acceptance": acceptance, "speculative": True}
    first = model.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(7), **options)
    again = model.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(7), **options)
    assert torch.equal(first, again) and first.shape == (3, ids.shape[1] + 16)


STAT_VOCAB = 8
STAT_SAMPLES = 700


def test_sampled_rows_follow_plain_sampling() -> None:
    """B = 3 left-padded prompts of different lengths; per row, the joint distribution of its first three
    sampled tokens against the exact one of plain sampling on that prompt alone (see test_sampling.py)."""
    model = _model(vocab=STAT_VOCAB, head_arch="hydra", seed=100)
    prompts = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 2]), torch.tensor([3, 3, 7, 1])]
    ids, mask = left_pad(prompts)
    exact = [exact_first_three(model.base_lm, p[None], temperature=0.9) for p in prompts]
    counts = torch.zeros(len(prompts), STAT_VOCAB, STAT_VOCAB, STAT_VOCAB)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STAT_SAMPLES):
        out = model.generate(
            ids, attention_mask=mask, do_sample=True, temperature=0.9, max_new_tokens=3, speculative=True,
            tree=[[0], [1], [0, 0], [0, 1], [1, 0]], generator=generator,
        )  # fmt: skip
        for row in range(len(prompts)):
            counts[row][tuple(out[row, ids.shape[1] :].tolist())] += 1
    for row in range(len(prompts)):
        assert chi_square_p_value(counts[row], exact[row]) > 1e-3, row


def test_batches_refuse_what_they_cannot_decode_exactly() -> None:
    model = _model()
    ids, mask = left_pad(_prompts((4, 6)))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model.generate(
            inputs_embeds=model.base_lm.get_input_embeddings()(ids), attention_mask=mask, speculative=True,
            max_new_tokens=4,
        )  # fmt: skip
    with pytest.raises(ValueError, match="Streamers take one sequence"):
        tokenizer = AutoTokenizer.from_pretrained(assets.default_base_model_path())
        model.generate(ids, attention_mask=mask, speculative=True, max_new_tokens=4, streamer=TextStreamer(tokenizer))
    dynamic = _model_with_rope({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="dynamic or longrope RoPE"):
        dynamic.generate(ids, attention_mask=mask, speculative=True, max_new_tokens=4)
    with pytest.raises(ValueError, match="assisted"):
        model.generate(ids, attention_mask=mask, speculative="assisted", max_new_tokens=4)


def _model_with_rope(rope: dict) -> HydraForCausalLM:
    base = make_tiny_model("llama", rope_parameters=rope)
    return HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=2, tree=[[0]]).eval()


def test_rows_without_pad_token_that_stop_apart_are_a_clear_error() -> None:
    model = _model()
    prompts = _prompts((7, 19), seed=3)
    ids, mask = left_pad(prompts)
    eos = _eos_after(model, prompts[1], 3)
    model.base_lm.generation_config.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id"):
        model.generate(ids, attention_mask=mask, speculative=True, max_new_tokens=10, eos_token_id=eos)


# --------------------------------------------------------------------------------------------------
# The pieces


def test_cache_compaction_keeps_each_rows_accepted_entries_and_masks_the_holes() -> None:
    from transformers import DynamicCache

    cache = DynamicCache()
    past, tree_tokens = 3, 5
    keys = torch.arange(2 * 1 * (past + tree_tokens) * 2, dtype=torch.float).reshape(2, 1, past + tree_tokens, 2)
    cache.update(keys.clone(), keys.clone() + 100, 0)
    visible = torch.tensor([[True, True, True], [False, True, True]])
    accepted = [torch.tensor([0, 2, 4]), torch.tensor([0])]
    visible = keep_accepted_rows(cache, past, accepted, visible)
    layer = cache.layers[0]
    assert layer.keys.shape == (2, 1, past + 3, 2)
    assert torch.equal(layer.keys[0, 0, past:], keys[0, 0, [past, past + 2, past + 4]])
    assert torch.equal(layer.values[0, 0, past:], keys[0, 0, [past, past + 2, past + 4]] + 100)
    assert torch.equal(layer.keys[1, 0, past], keys[1, 0, past])
    assert torch.equal(layer.keys[:, :, :past], keys[:, :, :past])
    assert visible.tolist() == [[True, True, True, True, True, True], [False, True, True, True, False, False]]


def test_dynamic_trees_are_sized_for_the_rows_sharing_the_forward() -> None:
    policy = DynamicTreePolicy((1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.2, 2.7))
    assert policy.for_rows(1) is policy
    two = policy.for_rows(2)
    assert two.verify_cost == pytest.approx((1.1 / 2, 1.3 / 2, 1.8 / 2, 2.7 / 2))
    eight = policy.for_rows(8)  # one node per row is the whole curve; two extend it linearly
    assert eight.verify_cost == pytest.approx((2.7 / 8, (2.7 + 0.5 * 8) / 8))
    assert (two.children, two.width, two.overhead) == (policy.children, policy.width, policy.overhead)


@pytest.mark.slow
def test_shipped_heads_on_mt_bench_batches_match_each_prompt_alone() -> None:
    """The real model, a batch of 4 MT-Bench questions of different lengths, the heads' dynamic tree (named: by
    default a CPU may decode a batch of 4 plainly, see `plain_is_faster_for`)."""
    model = HydraForCausalLM.from_pretrained(assets.pretrained_heads_path("hydra++"))
    tokenizer = AutoTokenizer.from_pretrained(assets.default_base_model_path())
    questions = spread_over_categories(assets.mt_bench_questions())[:4]
    prompts = [chat_input_ids(tokenizer, q["turns"][0])[0] for q in questions]
    ids, mask = left_pad(prompts, pad=tokenizer.pad_token_id)
    out = model.generate(
        ids, attention_mask=mask, speculative=True, tree="dynamic", max_new_tokens=64, return_dict_in_generate=True
    )
    pad = tokenizer.pad_token_id
    ties = _assert_rows_match_alone(model, prompts, out.sequences, max_new_tokens=64, pad_token_id=pad)
    print(f"batch of 4, shipped hydra++: tau {out.speculation.tau:.2f} tokens per batched forward, "
          f"per row {[round(s.tau, 2) for s in out.speculation_per_row]}, ties {ties}")
