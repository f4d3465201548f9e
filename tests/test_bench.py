"""The benchmark's own logic on a tiny random model with the real chat tokenizer and MT-Bench prompts."""

from __future__ import annotations

import copy
import dataclasses
import json
import time

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoTokenizer

from hf_hydra import HydraForCausalLM, SpeculationStats, assets, bench, bench_report, bench_table
from hf_hydra.dynamic_tree import DynamicTreePolicy
from hf_hydra.prepack import PrepackedLinear, prepack_linear_layers
from hf_hydra.step_drafts import StepDrafter
from hf_hydra.tree import CPU_SMALL_11

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(assets.default_base_model_path())


@pytest.fixture(scope="module")
def base(tokenizer):
    return make_tiny_model("llama", vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def report(base, tokenizer):
    torch.manual_seed(0)
    heads = {arch: HydraForCausalLM.from_base(base, head_arch=arch, num_heads=3) for arch in bench.TREE_METHODS}
    questions = assets.mt_bench_questions()[:2]
    return bench.run_bench(base, tokenizer, heads, questions, bench.ALL_METHODS, max_new_tokens=NEW_TOKENS)


def test_report_schema_and_lossless_methods(report):
    assert set(report) == {"schema_version", "created", "machine", "settings", "results", "summary"}
    recorded = {"torch", "transformers", "hf_hydra", "torch_threads", "device", "cpu", "cpu_count", "cpu_flags",
                "cpu_vector_level"}
    assert recorded <= set(report["machine"])
    assert report["settings"]["methods"] == list(bench.ALL_METHODS)
    assert len(report["results"]) == 2 * len(bench.ALL_METHODS)
    json.dumps(report)  # serialisable as it is
    for row in report["results"]:
        assert row["new_tokens"] == NEW_TOKENS  # no eos in the tiny model: every method runs to the limit
        assert row["identical"] and row["divergence_gap"] is None
        assert row["seconds"] > 0
        tree_loop = row["method"] in (*bench.TREE_METHODS, bench.CONTEXT)
        assert (row["accepted_lengths"] is not None) == tree_loop == (row["context_tokens"] is not None)
    summary = {s["method"]: s for s in report["summary"]}
    assert summary[bench.CONTEXT]["mismatches"] == 0 and summary[bench.CONTEXT]["tau"] >= 1.0
    assert summary[bench.CONTEXT]["context_share"] in (None, 1.0)  # every accepted draft of it is a copy
    assert summary[bench.AUTOREGRESSIVE]["speedup_median"] == 1.0
    for method in bench.TREE_METHODS:
        assert summary[method]["tau"] >= 1.0
        assert summary[method]["mismatches"] == 0
        assert len(summary[method]["acceptance_by_depth"]) == 3  # the default tree cut to 3 heads
        shares = summary[method]["step_time_shares"]
        assert set(shares) == {"draft", "verify", "accept", "commit"} and sum(shares.values()) == pytest.approx(1.0)
    for row in report["results"]:
        if row["method"] in bench.TREE_METHODS:
            phases = row["phase_seconds"]
            assert sum(phases.values()) <= row["seconds"]  # the phases are inside the timed call


def test_markdown_and_plots_come_from_the_json(report, tmp_path):
    written = bench_report.write_report(report, tmp_path / "bench.json")
    assert [p.name for p in written] == ["bench.json", "bench.md", "speedup_by_category.png", "acceptance_by_depth.png"]
    assert json.loads((tmp_path / "bench.json").read_text()) == report
    table = (tmp_path / "bench.md").read_text()
    for s in report["summary"]:
        assert f"| {s['method']} |" in table
        assert f"{s['speedup_median']:.2f}x" in table


def test_mismatches_are_counted():
    def row(method: str, identical: bool, seconds: float) -> bench.PromptResult:
        return bench.PromptResult(
            1, "writing", method, 5, seconds, None, None, None, identical, None if identical else 0.5
        )

    rows = [row(bench.AUTOREGRESSIVE, True, 2.0), row("hydra", False, 1.0)]
    hydra = bench.summarize(rows, [bench.AUTOREGRESSIVE, "hydra"], {})[1]
    assert hydra.mismatches == 1 and hydra.speedup_median == pytest.approx(2.0)
    assert hydra.speedup_total == pytest.approx(2.0)


def test_speedups_compare_seconds_per_token():
    """Sampled outputs differ in length: 20 tokens in 2 s is twice as fast as 10 tokens in 2 s."""

    def row(question_id: int, method: str, new_tokens: int, seconds: float) -> bench.PromptResult:
        return bench.PromptResult(question_id, "writing", method, new_tokens, seconds, None, None, None, None, None)

    rows = [
        row(1, bench.AUTOREGRESSIVE, 10, 2.0), row(1, "hydra", 20, 2.0),
        row(2, bench.AUTOREGRESSIVE, 30, 3.0), row(2, "hydra", 30, 1.0),
    ]
    hydra = bench.summarize(rows, [bench.AUTOREGRESSIVE, "hydra"], {})[1]
    assert hydra.speedup_median == pytest.approx(2.5)  # median of 2 and 3
    assert hydra.speedup_total == pytest.approx((50 / 3.0) / (40 / 5.0))  # tokens/s over the same prompts
    assert hydra.tokens_per_second == pytest.approx(50 / 3.0) and hydra.mismatches is None


def test_timings_are_taken_around_the_method_they_name(base):
    """Each method's seconds cover its own run only: a runner sleeping 0.3 s is charged >= 0.3 s, and the
    others are not charged for it."""
    input_ids = torch.tensor([[1, 2, 3]])
    sequence = torch.tensor([[1, 2, 3, 4]])

    def quick(ids, n):
        return sequence, None

    def slow(ids, n):
        time.sleep(0.3)
        return sequence, SpeculationStats(steps=1, new_tokens=1, accepted_lengths=(1,))

    runners = {bench.AUTOREGRESSIVE: quick, "hydra": slow, bench.PROMPT_LOOKUP: quick}
    rows = bench._bench_prompt(base, runners, {"question_id": 7, "category": "math"}, input_ids, 1)
    seconds = {r.method: r.seconds for r in rows}
    assert seconds["hydra"] >= 0.3
    assert seconds[bench.AUTOREGRESSIVE] < 0.3 and seconds[bench.PROMPT_LOOKUP] < 0.3


def test_questions_spread_over_categories():
    questions = assets.mt_bench_questions()
    first_eight = bench.spread_over_categories(questions, 8)
    assert len({q["category"] for q in first_eight}) == 8
    everything = bench.spread_over_categories(questions)
    assert sorted(q["question_id"] for q in everything) == sorted(q["question_id"] for q in questions)


def test_acceptance_by_depth():
    # steps appending 1, 2, 3 and 3 tokens accepted drafts at depths {}, {1}, {1, 2}, {1, 2}
    assert bench.acceptance_by_depth([1, 2, 3, 3], 3) == [0.75, 0.5, 0.0]
    assert bench.acceptance_by_depth([], 3) == []


def test_unknown_or_headless_methods_are_refused(base):
    with pytest.raises(ValueError, match="Unknown methods"):
        bench.method_runners(base, {}, ["fastest"])
    with pytest.raises(ValueError, match="Unknown methods"):  # only with a prepacked base
        bench.method_runners(base, {}, [bench.AUTOREGRESSIVE_PREPACKED])
    with pytest.raises(ValueError, match="need heads"):
        bench.method_runners(base, {}, ["hydra"])


def test_heads_under_any_label_are_a_tree_method(base, tokenizer):
    """Ablations compare several heads of one architecture: `--heads hydra-lm=...` benches the method "hydra-lm"."""
    torch.manual_seed(0)
    heads = {"hydra-lm": HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=2)}
    questions = assets.mt_bench_questions()[:1]
    report = bench.run_bench(base, tokenizer, heads, questions, ["hydra-lm"], max_new_tokens=NEW_TOKENS)
    assert report["settings"]["methods"] == [bench.AUTOREGRESSIVE, "hydra-lm"]
    labelled = report["summary"][1]
    assert labelled["method"] == "hydra-lm" and labelled["tau"] >= 1.0 and labelled["mismatches"] == 0
    assert len(labelled["acceptance_by_depth"]) == 2


def test_sampling_bench_reports_log_likelihood_instead_of_mismatches(base, tokenizer, tmp_path):
    torch.manual_seed(0)
    heads = {"hydra": HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=2)}
    questions = assets.mt_bench_questions()[:2]
    methods = ["hydra", "hydra-typical"]
    report = bench.run_bench(base, tokenizer, heads, questions, methods, NEW_TOKENS, temperature=0.7, seed=3)
    again = bench.run_bench(base, tokenizer, heads, questions, methods, NEW_TOKENS, temperature=0.7, seed=3)
    assert report["settings"]["temperature"] == 0.7 and report["settings"]["seed"] == 3
    for row in report["results"]:
        assert row["identical"] is None and row["divergence_gap"] is None
        assert row["log_likelihood"] < 0
    # seeded per question: the same draws again, whatever the timing
    assert [r["log_likelihood"] for r in report["results"]] == [r["log_likelihood"] for r in again["results"]]
    summary = {s["method"]: s for s in report["summary"]}
    assert set(summary) == {bench.AUTOREGRESSIVE, "hydra", "hydra-typical"}
    for s in summary.values():
        assert s["mismatches"] is None and s["mean_log_likelihood"] < 0
    assert summary["hydra-typical"]["tau"] >= 1.0 and len(summary["hydra-typical"]["acceptance_by_depth"]) == 2
    table = bench_table.markdown_table(report)
    assert "sampling at temperature 0.7" in table and "log-likelihood / token" in table
    assert f"{summary['hydra-typical']['mean_log_likelihood']:.3f}" in table


def test_table_names_the_cpu_when_the_report_has_it(report):
    machine = {
        **report["machine"], "device": "cpu", "processor": "x86_64", "cpu": "AMD EPYC", "cpu_count": 2,
        "cpu_vector_level": "AVX-512",
    }
    assert "cpu (AMD EPYC x86_64, 2 cores, AVX-512, " in bench_table.markdown_table({**report, "machine": machine})
    older = {k: v for k, v in machine.items() if k not in ("cpu", "cpu_count", "cpu_vector_level")}  # written before
    assert "cpu (x86_64, " in bench_table.markdown_table({**report, "machine": older})
    assert "cpu (x86_64, " in bench_table.markdown_table({**report, "machine": older})


def test_mean_log_likelihood_by_hand(base):
    sequence = torch.tensor([[3, 1, 4, 1, 5]])
    logits = base(sequence).logits[0]
    by_hand = sum(float((logits[t - 1] / 0.5).log_softmax(-1)[sequence[0, t]]) for t in (3, 4)) / 2
    assert bench.mean_log_likelihood(base, sequence, 3, 0.5) == pytest.approx(by_hand, rel=1e-5)


def test_typical_methods_need_sampling(base):
    heads = {"hydra": HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=2)}
    with pytest.raises(ValueError, match="Unknown methods"):
        bench.method_runners(base, heads, ["hydra-typical"])  # greedy: typical acceptance does not apply


def test_shards_merge_into_the_report_of_all_questions(base, tokenizer, tmp_path):
    torch.manual_seed(0)
    heads = {"medusa": HydraForCausalLM.from_base(base, head_arch="medusa", num_heads=2)}
    questions = bench.spread_over_categories(assets.mt_bench_questions(), 3)
    shards = [
        bench.run_bench(base, tokenizer, heads, bench.shard(questions, i, 2), ["medusa"], max_new_tokens=NEW_TOKENS)
        for i in range(2)
    ]
    assert [len(bench.shard(questions, i, 2)) for i in range(2)] == [2, 1]
    merged = bench_report.merge_reports(shards)
    assert merged["settings"]["num_prompts"] == 3 and merged["settings"]["shards"] == 2
    results = [bench.PromptResult(**row) for shard in shards for row in shard["results"]]
    expected = bench.summarize(results, [bench.AUTOREGRESSIVE, "medusa"], {"medusa": 2})
    assert merged["summary"] == [dataclasses.asdict(s) for s in expected]
    assert "2 processes side by side" in bench_table.markdown_table(merged)
    with pytest.raises(ValueError, match="share questions"):
        bench_report.merge_reports([shards[0], shards[0]])
    other = {**shards[1], "settings": {**shards[1]["settings"], "max_new_tokens": 99}}
    with pytest.raises(ValueError, match="max_new_tokens"):
        bench_report.merge_reports([shards[0], other])


def test_prepacked_bench_keeps_the_stock_reference(base, tokenizer, tmp_path):
    """--prepack: the heads, prompt lookup and autoregressive_prepacked run on a prepacked copy of the base;
    the reference stays plain generate on the stock base, and every output still equals it."""
    fast_base = copy.deepcopy(base)
    torch.manual_seed(0)
    heads = {"hydra": HydraForCausalLM.from_base(fast_base, head_arch="hydra", num_heads=3)}
    prepack_linear_layers(fast_base)
    methods = [bench.AUTOREGRESSIVE, bench.AUTOREGRESSIVE_PREPACKED, bench.PROMPT_LOOKUP, "hydra"]
    questions = assets.mt_bench_questions()[:2]
    report = bench.run_bench(
        base, tokenizer, heads, questions, methods, max_new_tokens=NEW_TOKENS, prepacked_base=fast_base
    )
    assert not any(isinstance(m, PrepackedLinear) for m in base.modules())  # the reference base is untouched
    assert report["settings"]["prepacked"] is True and report["settings"]["methods"] == methods
    assert all(row["identical"] for row in report["results"])
    kernel = report["settings"]["kernel"]
    assert kernel in ("onednn", "panel")
    assert {"onednn": "oneDNN-prepacked", "panel": "panel-packed"}[kernel] in bench_table.markdown_table(report)
    unpacked = bench_table.markdown_table({**report, "settings": {**report["settings"], "prepacked": False}})
    assert "oneDNN" not in unpacked and "panel" not in unpacked


def test_use_tree_sets_one_tree_for_every_heads_set(base):
    torch.manual_seed(0)
    heads = {arch: HydraForCausalLM.from_base(base, head_arch=arch, num_heads=4) for arch in ("medusa", "hydra")}
    bench.use_tree(heads, "cpu_small_11")
    assert all(m.generation_config.hydra_tree == [list(p) for p in CPU_SMALL_11] for m in heads.values())
    with pytest.raises(ValueError, match="Unknown tree name"):
        bench.use_tree(heads, "largest")
    with pytest.raises(ValueError, match="only 4 draft heads"):
        bench.use_tree(heads, "chain-5")


def test_variants_run_the_static_tree_and_the_default_the_dynamic_one(base, tokenizer):
    """`<label>` runs the heads' default (dynamic here), `<label>-static` their static tree merged with context
    candidates, `<label>-heads` the static tree alone; the report records both trees and each method's depth."""
    torch.manual_seed(0)
    model = HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=3, tree=[[0], [1]])
    model.dynamic_tree = DynamicTreePolicy(tuple(1.0 + 0.02 * m for m in range(16)))
    model.generation_config.hydra_tree = "dynamic"
    trees = []
    real = StepDrafter.__init__

    def record(self, sources, heads, tree, *args):
        trees.append((sources, tree if isinstance(tree, DynamicTreePolicy) else tree.paths))
        real(self, sources, heads, tree, *args)

    methods = ["hydra", "hydra-static", "hydra-heads"]
    runners = bench.method_runners(base, {"hydra": model}, methods)
    prompt = torch.tensor([[1, 2, 3, 4]])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StepDrafter, "__init__", record)
        for method in methods:
            runners[method](prompt, 4)
    assert trees == [("heads+context", model.dynamic_tree), ("heads+context", ((0,), (1,))), ("heads", ((0,), (1,)))]
    report = bench.run_bench(base, tokenizer, {"hydra": model}, assets.mt_bench_questions()[:1], methods, 4)
    assert report["settings"]["trees"] == {"hydra": "dynamic"}
    assert report["settings"]["static_trees"] == {"hydra": [[0], [1]]}
    assert report["settings"]["tree_depths"] == {"hydra": 3, "hydra-static": 1, "hydra-heads": 1}


def test_stock_variant_runs_the_default_tree_on_the_stock_base(base, tokenizer):
    """`<label>-stock`: the same heads on the stock base, their default tree asked for by name (so it
    speculates even where no tree pays), beside the packed base's methods; every output equals the reference."""
    fast_base = copy.deepcopy(base)
    torch.manual_seed(0)
    packed = HydraForCausalLM.from_base(fast_base, head_arch="hydra", num_heads=3)
    prepack_linear_layers(fast_base)
    stock = HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=3)
    stock.heads.load_state_dict(packed.heads.state_dict())
    methods = [bench.AUTOREGRESSIVE, "hydra", "hydra" + bench.STOCK_SUFFIX]
    with pytest.raises(ValueError, match="Unknown methods"):
        bench.method_runners(base, {"hydra": packed}, methods, prepacked_base=fast_base)  # no stock heads given
    report = bench.run_bench(
        base, tokenizer, {"hydra": packed}, assets.mt_bench_questions()[:1], methods, max_new_tokens=NEW_TOKENS,
        prepacked_base=fast_base, stock_heads={"hydra": stock},
    )
    rows = {row["method"]: row for row in report["results"]}
    assert rows["hydra-stock"]["steps"] > 0 and all(row["identical"] for row in rows.values())
    assert stock.base_lm is base and any(type(m) is torch.nn.Linear for m in base.modules())  # still stock
