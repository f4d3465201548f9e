"""Half-precision bases (bfloat16, float16) through tree decoding, training and the real model.

Greedy speculative decoding on a half-precision base must give that same base's plain greedy tokens. Ties are
far more frequent than in float32: logits are rounded to 8 (bfloat16) or 11 (float16) significant bits, so the
top-2 logits are often equal or one unit in the last place apart, and the tree's forward (other kernels than
one-token decoding) may round them the other way. Each mismatch is classified by `hf_hydra.divergence`: a first
differing token whose top-2 gap is within two ulps of the top logit in the base's dtype is a tie, reported with
its gap; any other difference fails. (Sampling in bfloat16 is judged by the chi-square tests in test_sampling.py.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARCHS, TINY_VOCAB, make_tiny_model
from ties import assert_same_or_tie
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_hydra import HydraForCausalLM, assets
from hf_hydra.bench import spread_over_categories
from hf_hydra.cli import build_parser, chat_input_ids, prepare_command
from hf_hydra.dynamic_tree import DynamicTreePolicy
from hf_hydra.training.arguments import TrainingArguments
from hf_hydra.training.features import TokenizedSequence
from hf_hydra.training.preparation import prepare_features
from hf_hydra.training.trainer import train

HALF_DTYPES = (torch.bfloat16, torch.float16)
PROMPTS_PER_CASE = 6
NEW_TOKENS = 40


def _prompts(count: int, vocab: int = TINY_VOCAB) -> list[torch.Tensor]:
    """Seeded random prompts of very different lengths (5 to 75 tokens)."""
    lengths = np.linspace(5, 75, count).astype(int)
    generators = [torch.Generator().manual_seed(k) for k in range(count)]
    return [torch.randint(0, vocab, (1, int(n)), generator=g) for n, g in zip(lengths, generators, strict=True)]


def _greedy_ties(model: HydraForCausalLM, prompts: list[torch.Tensor], **generate_options) -> list[str]:
    """Speculative greedy against plain greedy on the same base: the ties found (any other difference fails)."""
    ties = []
    for prompt in prompts:
        plain = model.base_lm.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        fast = model.generate(prompt, max_new_tokens=NEW_TOKENS, speculative=True, **generate_options)
        tie = assert_same_or_tie(model.base_lm, plain, fast, prompt.shape[1])
        if tie is not None:
            ties.append(tie)
    return ties


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("head_arch", ["medusa", "hydra", "hydra++"])
def test_greedy_on_a_half_precision_base_is_its_plain_greedy(arch: str, dtype: torch.dtype, head_arch: str) -> None:
    base = make_tiny_model(arch).to(dtype)
    torch.manual_seed(1)
    model = HydraForCausalLM.from_base(base, head_arch=head_arch, num_heads=4).eval()
    assert {p.dtype for p in model.heads.parameters()} == {dtype}
    model.dynamic_tree = DynamicTreePolicy(tuple(1.0 + 0.05 * m for m in range(32)), children=2, width=2)  # flat cost
    ties = _greedy_ties(model, _prompts(PROMPTS_PER_CASE), tree="cpu_small_11")
    ties += _greedy_ties(model, _prompts(2), tree="dynamic")
    print(f"{arch} {dtype} {head_arch}: {len(ties)} floating-point ties {ties}")


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_training_pipeline_runs_on_a_half_precision_base(tmp_path: Path, dtype: torch.dtype) -> None:
    """Features prepared by the base in half precision, heads trained on them, decoding on that base."""
    make_tiny_model("llama").to(dtype).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert base.dtype == dtype  # the checkpoint's own dtype
    rng = np.random.default_rng(0)
    sequences = [TokenizedSequence(rng.integers(0, TINY_VOCAB, 24).tolist(), [0] * 4 + [1] * 20) for _ in range(8)]
    prepare_features(base, sequences, tmp_path / "features", base_model_id=str(tmp_path / "base"), teacher_topk=8)
    args = TrainingArguments(
        features_dir=str(tmp_path / "features"), output_dir=str(tmp_path / "heads"), base_model=str(tmp_path / "base"),
        head_arch="hydra++", num_heads=3, draft_vocab_size=64, max_steps=3, batch_size=2, gradient_accumulation_steps=1,
        validation_fraction=0.25, eval_every=2, save_every=0, lr=1e-2,
    )  # fmt: skip
    report = train(args)
    assert report.steps == 3 and np.isfinite(report.final_train_loss) and report.validation
    model = HydraForCausalLM.from_pretrained(tmp_path / "heads", base_model=base)
    assert {p.dtype for p in model.heads.parameters()} == {dtype}
    _greedy_ties(model, _prompts(3))


def test_prepare_takes_the_base_dtype_and_records_it() -> None:
    args = build_parser().parse_args(["prepare", "--sharegpt", "10", "--out", "f", "--dtype", "bfloat16"])
    assert args.dtype == "bfloat16" and prepare_command(args).endswith("--dtype bfloat16")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prepare", "--sharegpt", "10", "--out", "f", "--dtype", "int8"])


@pytest.mark.slow
def test_shipped_heads_on_the_real_model_in_bfloat16_match_its_greedy() -> None:
    """SmolLM2 loaded in bfloat16 with the shipped Hydra++ heads (which follow the base's dtype): MT-Bench answers
    equal the bfloat16 base's plain greedy ones up to ties (measured: most answers reach one within 128 tokens)."""
    path = assets.default_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    questions = spread_over_categories(assets.mt_bench_questions())[:4]
    model = HydraForCausalLM.from_pretrained(assets.pretrained_heads_path("hydra++"), dtype=torch.bfloat16)
    assert model.base_lm.dtype == torch.bfloat16 and model.base_prepack is None  # packing is for float32 bases
    assert {p.dtype for p in model.heads.parameters()} == {torch.bfloat16}
    prompts = [chat_input_ids(tokenizer, question["turns"][0]) for question in questions]
    ties = _greedy_ties(model, prompts)
    print(f"SmolLM2 bfloat16, shipped hydra++ heads: {len(ties)} floating-point ties {ties}")
