"""The batch benchmark's own logic on a tiny random model with the real chat tokenizer and MT-Bench prompts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoTokenizer

from hf_hydra import HydraForCausalLM, assets, bench, bench_batch, cli
from hf_hydra.bench_batch import BatchResult
from hf_hydra.prepack import prepack_linear_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW_TOKENS = 12
AUTOREGRESSIVE = bench.AUTOREGRESSIVE


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(assets.default_base_model_path())


@pytest.fixture(scope="module")
def base(tokenizer):
    return make_tiny_model("llama", vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def questions():
    return bench.spread_over_categories(assets.mt_bench_questions(), 2)


@pytest.fixture(scope="module")
def report(base, tokenizer, questions):
    torch.manual_seed(0)
    heads = {"hydra": HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=3)}
    return bench_batch.run_batch_bench(base, tokenizer, heads, questions, [1, 2], max_new_tokens=NEW_TOKENS)


def test_report_structure_and_lossless_rows(report, questions):
    assert set(report) == {"schema_version", "benchmark", "created", "machine", "settings", "results", "summary"}
    assert report["benchmark"] == "batch"
    settings = report["settings"]
    assert settings["methods"] == [AUTOREGRESSIVE, "hydra"] and settings["batch_sizes"] == [1, 2]
    assert settings["num_prompts"] == 2 and settings["pad_token_id"] == 2  # SmolLM2's pad token
    json.dumps(report)  # serialisable as it is
    assert [(r["batch_size"], r["batch_index"], r["method"]) for r in report["results"]] == [
        (1, 0, AUTOREGRESSIVE), (1, 0, "hydra"), (1, 1, AUTOREGRESSIVE), (1, 1, "hydra"),
        (2, 0, AUTOREGRESSIVE), (2, 0, "hydra"),
    ]  # fmt: skip
    ids = [q["question_id"] for q in questions]
    for row in report["results"]:
        size = row["batch_size"]
        assert row["question_ids"] == ids[row["batch_index"] * size : (row["batch_index"] + 1) * size]
        assert row["row_new_tokens"] == [NEW_TOKENS] * size  # no eos in the tiny model: every row runs to the limit
        assert all(row["row_identical"]) and row["seconds"] > 0
        tree = row["method"] == "hydra"
        assert (row["tau"] is not None) == tree and (row["row_tau"] is not None) == tree
    batch = report["results"][-1]
    assert len(set(batch["prompt_lengths"])) == 2  # rows of different lengths: the batch was padded
    assert batch["tau"] == pytest.approx(2 * (NEW_TOKENS - 1) / batch["steps"])  # both rows per batched forward
    assert batch["row_steps"] == [batch["steps"]] * 2  # neither row left the batch early
    summary = {(s["batch_size"], s["method"]): s for s in report["summary"]}
    assert list(summary) == [(1, AUTOREGRESSIVE), (1, "hydra"), (2, AUTOREGRESSIVE), (2, "hydra")]
    for size in (1, 2):
        assert summary[size, AUTOREGRESSIVE]["speedup_median"] == 1.0 and summary[size, AUTOREGRESSIVE]["tau"] is None
        hydra = summary[size, "hydra"]
        assert hydra["mismatches"] == 0 and hydra["new_tokens"] == 2 * NEW_TOKENS and hydra["row_tau"] >= 1.0
    assert summary[1, "hydra"]["tau"] == summary[1, "hydra"]["row_tau"]  # one row: a forward is a row's step
    assert summary[2, "hydra"]["tau"] == pytest.approx(2 * summary[2, "hydra"]["row_tau"])


def test_table_and_json_are_written_from_the_report(report, tmp_path):
    written = bench_batch.write_batch_report(report, tmp_path / "batch" / "bench.json")
    assert [p.name for p in written] == ["bench.json", "bench.md"]
    assert json.loads(written[0].read_text()) == report
    table = written[1].read_text()
    assert "| batch size | method | tokens/s | speed-up (median) | speed-up (overall) | tau | mismatches |" in table
    assert f"{report['machine']['device']} (" in table and f"torch {report['machine']['torch']}" in table
    for s in report["summary"]:
        row = f"| {s['batch_size']} | {s['method']} | {s['tokens_per_second']:.1f} | {s['speedup_median']:.2f}x"
        assert row in table
    hydra = report["summary"][-1]
    assert f"| {hydra['tau']:.2f} ({hydra['row_tau']:.2f} per row) | 0 |" in table


def _result(index: int, method: str, tokens: list[int], seconds: float, identical: list[bool], **tree) -> BatchResult:
    fields = {"steps": None, "tau": None, "row_steps": None, "row_tau": None} | tree
    return BatchResult(2, index, [index, index + 10], [5, 7], method, tokens, seconds, identical, **fields)


def test_merging_or_carding_a_batch_report_is_a_clear_error(report, tmp_path):
    from hf_hydra import bench_report, model_card

    with pytest.raises(ValueError, match="batch benchmark report"):
        bench_report.merge_reports([report, report])
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(report))
    with pytest.raises(ValueError, match="batch benchmark report"):
        model_card.write_model_card(tmp_path, benchmark=path)


def test_summary_arithmetic_on_fixed_numbers():
    results = [
        _result(0, AUTOREGRESSIVE, [10, 10], 4.0, [True, True]),  # 5 tokens/s
        _result(0, "hydra", [10, 10], 2.0, [True, True], steps=5, tau=4.0, row_steps=[5, 5], row_tau=[2.0, 2.0]),
        _result(1, AUTOREGRESSIVE, [30, 10], 8.0, [True, True]),  # 5 tokens/s
        _result(1, "hydra", [30, 6], 1.0, [True, False], steps=10, tau=3.5, row_steps=[10, 3], row_tau=[3.0, 2.0]),
    ]
    reference, hydra = bench_batch.summarize_batches(results, [2], [AUTOREGRESSIVE, "hydra"])
    assert reference.tokens_per_second == pytest.approx(60 / 12) and reference.speedup_total == 1.0
    assert hydra.batches == 2 and hydra.new_tokens == 56
    assert hydra.tokens_per_second == pytest.approx(56 / 3.0)
    assert hydra.speedup_median == pytest.approx((10 / 5 + 36 / 5) / 2)  # batch ratios 2.0 and 7.2
    assert hydra.speedup_total == pytest.approx((56 / 3.0) / (60 / 12))
    assert hydra.tau == pytest.approx((4.0 * 5 + 3.5 * 10) / 15)  # all tokens over all batched forwards
    assert hydra.row_tau == pytest.approx((2.0 * 5 + 2.0 * 5 + 3.0 * 10 + 2.0 * 3) / 23)  # over every row's steps
    assert hydra.mismatches == 1 and reference.mismatches == 0


def test_left_padding_and_lengths_up_to_eos():
    ids, mask = bench_batch.left_pad([torch.tensor([[5, 6, 7]]), torch.tensor([[8]])], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    new_tokens = torch.tensor([[4, 2, 2, 2], [4, 4, 4, 4], [9, 3, 2, 2]])  # padding after EOS is not counted
    assert bench_batch.generated_lengths(new_tokens, [2]) == [2, 4, 3]
    assert bench_batch.generated_lengths(new_tokens, [2, 3]) == [2, 4, 2]
    assert bench_batch.generated_lengths(new_tokens, []) == [4, 4, 4]


def test_rows_ending_at_eos_count_their_own_tokens(base, tokenizer, questions):
    """Rows stopping at different lengths: each counts its tokens up to its EOS, and still equals the reference."""
    prompts = [ids for _, ids in bench.bench_prompts(tokenizer, base, questions, 1, NEW_TOKENS)]
    ids, mask = bench_batch.left_pad(prompts, 2)
    plain = base.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=2)
    new_tokens = plain[:, ids.shape[1] :]
    eos = int(new_tokens[0, 3])  # the first row stops at its 4th token at the latest
    stopping = copy.deepcopy(base)
    stopping.generation_config.eos_token_id = eos
    torch.manual_seed(0)
    heads = {"hydra": HydraForCausalLM.from_base(stopping, head_arch="hydra", num_heads=3)}
    report = bench_batch.run_batch_bench(stopping, tokenizer, heads, questions, [2], max_new_tokens=NEW_TOKENS)
    expected = [row.index(eos) + 1 if eos in row else NEW_TOKENS for row in new_tokens.tolist()]
    assert expected[0] <= 4 and expected[1] > expected[0]
    for row in report["results"]:
        assert row["row_new_tokens"] == expected and all(row["row_identical"])


def test_prepacked_base_runs_beside_the_stock_reference(base, tokenizer, questions):
    fast_base = copy.deepcopy(base)
    torch.manual_seed(0)
    heads = {"hydra": HydraForCausalLM.from_base(fast_base, head_arch="hydra", num_heads=2)}
    prepack_linear_layers(fast_base)
    report = bench_batch.run_batch_bench(
        base, tokenizer, heads, questions, [2], max_new_tokens=NEW_TOKENS, prepacked_base=fast_base
    )
    assert report["settings"]["methods"] == [AUTOREGRESSIVE, bench.AUTOREGRESSIVE_PREPACKED, "hydra"]
    assert report["settings"]["prepacked"] is True
    assert all(all(row["row_identical"]) for row in report["results"])
    assert "Every method but `autoregressive` runs on the base with" in bench_batch.markdown_batch_table(report)


def test_prompts_fill_whole_batches_of_every_size():
    assert bench_batch.common_prompt_count(80, [1, 2, 4, 8]) == 80
    assert bench_batch.common_prompt_count(7, [1, 2, 4]) == 4  # the same 4 prompts at every size
    assert bench_batch.common_prompt_count(13, [3, 4]) == 12
    with pytest.raises(ValueError, match="multiple of 8"):
        bench_batch.common_prompt_count(6, [1, 8])


def test_unknown_methods_are_refused(base):
    with pytest.raises(ValueError, match="Unknown batch methods"):
        bench_batch.batch_runners(base, {}, [AUTOREGRESSIVE, "hydra"], pad_token_id=2)
    with pytest.raises(ValueError, match="Unknown batch methods"):  # only with a prepacked base
        bench_batch.batch_runners(base, {}, [bench.AUTOREGRESSIVE_PREPACKED], pad_token_id=2)


def test_cli_parses_batch_sizes():
    args = cli.build_parser().parse_args(["bench", "--batch-size", "1,2,4", "--limit", "8"])
    assert args.batch_size == [1, 2, 4] and args.out is None
    assert cli.build_parser().parse_args(["bench"]).batch_size is None  # the per-prompt benchmark
    for bad in ("0", "2,x", "1,,2", "2,2"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["bench", "--batch-size", bad])
    with pytest.raises(SystemExit, match="greedy, in one process: drop --temperature"):  # before any model loads
        cli.main(["bench", "--batch-size", "2", "--temperature", "0.7"])


def test_cli_runs_the_batch_benchmark(base, tokenizer, tmp_path):
    """`hf-hydra bench --batch-size` loads base and heads as the per-prompt bench does, then writes the batch report."""
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=2).save_pretrained(tmp_path / "heads")
    out = tmp_path / "batch" / "bench.json"
    argv = ["bench", "--base", str(tmp_path / "base"), "--heads", f"hydra={tmp_path / 'heads'}", "--no-prepack",
            "--batch-size", "1,2", "--limit", "2", "--max-new-tokens", "4", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "batch" and report["settings"]["methods"] == [AUTOREGRESSIVE, "hydra"]
    assert [(s["batch_size"], s["mismatches"]) for s in report["summary"]] == [(1, 0), (1, 0), (2, 0), (2, 0)]
    assert out.with_suffix(".md").is_file()
