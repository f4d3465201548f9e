"""Dynamic trees (hf_hydra.dynamic_tree): calibration, node selection by expected tokens per second, the
heads' expansion, and greedy output equal to plain `generate` with dynamic trees merged with context
candidates. The statistical (lossless sampling) case is in test_sampling.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_context import _repeating_prompts
from test_decoding import ARCHS, HEAD_ARCHS, NEW_TOKENS, SMALL_VOCAB, _hydra, _plain, _prompts

from hf_hydra import HydraForCausalLM, hub
from hf_hydra.cache_name import output_cache
from hf_hydra.cpu_kernels import kernel_library
from hf_hydra.dynamic_tree import (
    DynamicTreePolicy,
    HeadCalibration,
    ScoredNodes,
    add_context_paths,
    calibrate,
    expand_heads,
)
from hf_hydra.growing_cache import GrowingLayer
from hf_hydra.modeling_hydra import head_call_costs
from hf_hydra.roofline import linear_weight_bytes, machine_forward_seconds, machine_identity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Verifying m tokens costs 1 + 0.02 (m - 1): nearly flat, so big trees pay (many nodes exercised).
FLAT = DynamicTreePolicy(tuple(1.0 + 0.02 * m for m in range(32)))


# ------------------------------------------------------------------------------------------------------
# Calibration


def test_calibration_reads_the_measured_share_per_bin_and_never_decreases() -> None:
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(200_000, generator=generator)
    hits = torch.rand(200_000, generator=generator) < probabilities * 0.5  # the heads are twice too confident
    calibration = calibrate([probabilities], [hits])
    assert calibration(0, torch.tensor([0.05, 0.45, 0.95])).tolist() == pytest.approx([0.031, 0.225, 0.475], abs=0.01)
    rates = calibration.rates[0]
    assert list(rates) == sorted(rates)
    # an inverted measurement is pooled into a non-decreasing one
    inverted = calibrate([torch.tensor([0.05] * 50 + [0.95] * 50)], [torch.tensor([True] * 50 + [False] * 50)])
    assert list(inverted.rates[0]) == sorted(inverted.rates[0])


def test_calibration_round_trips_through_its_record_and_identity_keeps_probabilities() -> None:
    calibration = calibrate([torch.rand(1000), torch.rand(1000)], [torch.rand(1000) < 0.3, torch.rand(1000) < 0.1])
    again = HeadCalibration.from_record(json.loads(json.dumps(calibration.to_record())))
    assert again == calibration
    probabilities = torch.tensor([0.0, 0.3, 1.0])
    assert torch.equal(HeadCalibration.from_record(None)(2, probabilities), probabilities)
    with pytest.raises(ValueError, match="one rate per probability bin"):
        HeadCalibration.from_record({"edges": [0.0, 0.5, 1.0], "rates": [[0.1]]})


# ------------------------------------------------------------------------------------------------------
# Selection


def test_the_size_maximises_expected_tokens_per_cost() -> None:
    scores = [0.9, 0.8, 0.5, 0.2, 0.1]
    assert FLAT.best_size(scores) == 5  # flat cost: every likely node pays
    assert FLAT.best_size([*scores, 0.01]) == 5  # but not one whose chance is below its cost
    steep = DynamicTreePolicy((1.0, 2.0, 3.0, 4.0), overhead=0.0)
    assert steep.best_size(scores) == 0  # each node doubles the cost: the root alone
    middle = DynamicTreePolicy((1.0, 1.1, 1.2, 1.8, 2.0), overhead=0.0)
    # (1 + 0.9) / 1.1, (1 + 1.7) / 1.2 = 2.25 is the best, (1 + 2.2) / 1.8 less
    assert middle.best_size(scores) == 2
    assert DynamicTreePolicy((1.0, 1.0, 1.0)).best_size(scores) == 2  # bounded by the measured curve


def test_the_best_nodes_include_their_ancestors_and_the_tree_keeps_tokens_in_order() -> None:
    nodes = ScoredNodes(root_token=7)
    a = nodes.add(0, 3, 0.6, from_context=False)
    b = nodes.add(0, 5, 0.3, from_context=False)
    a_child = nodes.add(a, 9, 0.5, from_context=False)
    nodes.add(b, 4, 0.02, from_context=False)
    paths = add_context_paths(nodes, [(3, 9, 2, 2), (6,)], [(0.7, 0.5, 0.45, 0.4), (0.1,)], max_depth=3)
    assert paths[0][:2] == [a, a_child] and len(paths[0]) == 3  # shared prefix, cut at depth 3
    assert nodes.scores[a] == 0.7 and not nodes.from_context[a]  # the larger estimate; the heads proposed it
    policy = DynamicTreePolicy((1.0, 1.01, 1.02, 1.03, 1.04, 1.05, 1.5), overhead=0.0)
    chosen = nodes.best(policy)
    assert chosen == [0, a, a_child, paths[0][2], b, paths[1][0]]  # by score; 0.02 is below the floor
    assert policy.floor == pytest.approx(0.5 / 6 / 1.5)
    tree, tokens, from_context = nodes.tree(chosen, torch.device("cpu"))
    assert tree.num_tokens == 6 and int(tokens[0]) == 7

    def token_path(node: int) -> tuple[int, ...]:
        return tuple(tokens[tree.ancestors[node, 1 : int(tree.depths[node]) + 1]].tolist())

    assert {token_path(n) for n in range(1, 6)} == {(3,), (5,), (6,), (3, 9), (3, 9, 2)}
    assert from_context.tolist() == [False] + [token_path(n) in {(6,), (3, 9, 2)} for n in range(1, 6)]
    context_first = ScoredNodes(root_token=7)
    add_context_paths(context_first, [(3, 9)], [(0.7, 0.5)], max_depth=None)
    assert context_first.add(0, 3, 0.6, from_context=False) == 1 and context_first.from_context == [False, False, True]


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
@torch.no_grad()
def test_the_heads_expand_the_most_likely_nodes_with_their_top_candidates(tiny_model_factory, head_arch) -> None:
    model = _hydra(tiny_model_factory, "llama", head_arch)
    heads, embed = model.heads, model.base_lm.get_input_embeddings()
    context = torch.randn(model.config.base_hidden_size)
    policy = DynamicTreePolicy((1.0,) * 32, children=3, width=2, min_score=0.0)  # every node is worth it
    nodes = ScoredNodes(root_token=1)
    expand_heads(nodes, heads, policy, context, embed, max_depth=3)
    depths = torch.tensor(nodes.depths)
    assert [(depths == d).sum().item() for d in range(4)] == [1, 3, 6, 6]  # 3 children of 1, 2, 2 parents
    for node in range(1, len(nodes)):
        parent, depth = nodes.parents[node], nodes.depths[node]
        path = [0, *nodes.path(parent)]
        path_embeds = embed(torch.tensor([nodes.tokens[n] for n in path]))
        probabilities = heads(depth - 1, context, path_embeds if heads.sequential else None).softmax(-1)
        top = probabilities.topk(3)
        assert nodes.tokens[node] in top.indices.tolist()
        assert nodes.scores[node] == pytest.approx(
            nodes.scores[parent] * float(probabilities[nodes.tokens[node]]), rel=1e-5
        )
        if depth < 3 and any(nodes.parents[n] == node for n in range(len(nodes))):  # expanded: among the best 2
            level = sorted((nodes.scores[n] for n in range(len(nodes)) if nodes.depths[n] == depth), reverse=True)
            assert nodes.scores[node] >= level[1]


def test_a_head_is_called_only_where_its_expected_candidates_pay_for_the_call() -> None:
    accuracy = ((0.5, 0.1, 0.05, 0.02),) * 3  # head k's r-th candidate is right this often on a right path
    policy = dataclasses.replace(FLAT, head_call_cost=(0.05,) * 3, rank_accuracy=accuracy)
    assert policy.pays_to_call(0, [], [1.0])  # below the root: 0.5 + 0.1 + ... expected tokens for 0.05
    assert not policy.pays_to_call(2, [0.9, 0.8], [0.05])  # 0.025 + 0.005 ... expected tokens: not worth 0.05
    assert policy.pays_to_call(2, [0.9, 0.8], [0.6, 0.5])
    assert FLAT.pays_to_call(2, [0.9, 0.8], [0.001])  # without costs every head is called
    assert dataclasses.replace(policy, head_call_cost=(0.05,)).pays_to_call(2, [0.9], [0.001])  # nor for a head
    # without its cost


@torch.no_grad()
def test_the_expansion_stops_at_a_head_call_that_cannot_pay(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory, "llama", "hydra")
    heads, embed = model.heads, model.base_lm.get_input_embeddings()
    context = torch.randn(model.config.base_hidden_size)
    accuracy = ((0.5, 0.2, 0.1),) * heads.num_heads
    free = DynamicTreePolicy((1.0,) * 32, children=3, width=2, min_score=0.0, rank_accuracy=accuracy)
    for cost, depths in ((0.0, {0, 1, 2, 3}), (0.5, {0, 1}), (5.0, {0})):
        nodes = ScoredNodes(root_token=1)
        policy = dataclasses.replace(free, head_call_cost=(cost,) * heads.num_heads)
        expand_heads(nodes, heads, policy, context, embed, max_depth=3)
        assert set(nodes.depths) == depths, cost  # 0.5: worth it below the root only (at most 0.8 tokens more)


def test_a_head_call_costs_its_share_of_the_weight_bytes(tiny_model_factory) -> None:
    model = _hydra(
        tiny_model_factory, "llama", "hydra", vocab_projection="shared_draft_vocab", draft_vocab_size=8,
        draft_token_ids=torch.arange(8),
    )  # fmt: skip
    heads, d = model.heads, model.config.base_hidden_size
    for k in range(heads.num_heads):
        layers = 2 * d * (k + 2) * d + (model.config.num_layers - 1) * d * d  # Hydra's first block: two linear
        # layers from the path's k + 2 vectors; then residual blocks
        assert heads.call_weight_bytes(k) == 4 * (layers + 8 * d)  # float32, and the 8 shared draft rows
    costs = head_call_costs(model)
    base_bytes = linear_weight_bytes(model.base_lm)
    assert costs == tuple(heads.call_weight_bytes(k) / base_bytes for k in range(heads.num_heads))
    if kernel_library().library is not None:
        heads.pack_for_drafting("panel", torch.bfloat16)
        assert heads.call_weight_bytes(0) == 2 * (2 * d * 2 * d + (model.config.num_layers - 1) * d * d + 8 * d)
        # what drafting reads: the bfloat16 copies


# ------------------------------------------------------------------------------------------------------
# Greedy output: plain generate's


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_trees_give_plain_greedy_tokens(tiny_model_factory, arch: str, head_arch: str) -> None:
    model = _hydra(tiny_model_factory, arch, head_arch)
    model.dynamic_tree = FLAT
    context_tokens = 0
    for prompt in _repeating_prompts() + _prompts(SMALL_VOCAB):
        plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS)
        for sources in ("heads+context", "heads"):
            out = model.generate(
                prompt, speculative=True, tree="dynamic", sources=sources, max_new_tokens=NEW_TOKENS,
                return_dict_in_generate=True,
            )  # fmt: skip
            assert torch.equal(out.sequences, plain), f"prompt {prompt.tolist()}, {sources}"
            context_tokens += out.speculation.context_tokens
    assert context_tokens > 0


def test_a_long_context_stays_exact_with_dynamic_trees(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory, "qwen2", "hydra++")
    model.dynamic_tree = FLAT
    prompt = torch.cat(_repeating_prompts() * 6, dim=1)
    plain = _plain(model, prompt, max_new_tokens=64)
    out = model.generate(prompt, speculative=True, tree="dynamic", max_new_tokens=64, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.speculation.tau > 1.5


def test_dynamic_trees_stop_at_eos(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory, "llama", "hydra")
    model.dynamic_tree = FLAT
    for prompt in _repeating_prompts():
        plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS)
        eos = int(plain[0, prompt.shape[1] + NEW_TOKENS // 2])
        expected = _plain(model, prompt, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
        out = model.generate(prompt, speculative=True, tree="dynamic", max_new_tokens=NEW_TOKENS, eos_token_id=eos)
        assert torch.equal(out, expected)


def test_the_dynamic_tree_is_loaded_with_the_heads_and_asked_for_by_name(tiny_model_factory, tmp_path) -> None:
    model = _hydra(tiny_model_factory)
    model.save_pretrained(tmp_path)
    prompt = _prompts(SMALL_VOCAB)[1]
    reloaded = HydraForCausalLM.from_pretrained(tmp_path, base_model=model.base_lm)
    assert reloaded.dynamic_tree is None
    with pytest.raises(ValueError, match="hf-hydra tune-tree"):
        reloaded.generate(prompt, speculative=True, tree="dynamic", max_new_tokens=4)
    calibration = calibrate([torch.rand(500)] * 4, [torch.rand(500) < 0.2] * 4)
    accuracy = [[0.5, 0.2, 0.1]] * 4
    tuning = {
        "verify_seconds": [0.02, 0.021, 0.023, 0.03], "calibration": calibration.to_record(), "rank_accuracy": accuracy
    }  # fmt: skip
    (tmp_path / "tree_tuning.json").write_text(json.dumps(tuning))
    reloaded = HydraForCausalLM.from_pretrained(tmp_path, base_model=model.base_lm)
    machine = machine_forward_seconds(model.base_lm)  # on a CPU: sized on this machine's curve, not the record's
    assert reloaded.dynamic_tree.verify_cost == pytest.approx(tuple(t / machine[0] for t in machine))
    assert reloaded.dynamic_tree.calibration == calibration
    assert reloaded.dynamic_tree.rank_accuracy == tuple(map(tuple, accuracy))  # and head calls that must pay
    assert reloaded.dynamic_tree.head_call_cost == head_call_costs(reloaded)
    out = reloaded.generate(prompt, speculative=True, tree="dynamic", max_new_tokens=8, return_dict_in_generate=True)
    assert torch.equal(out.sequences, _plain(reloaded, prompt, max_new_tokens=8))


def test_a_tuning_of_this_machine_keeps_its_own_curve(tiny_model_factory, tmp_path) -> None:
    model = _hydra(tiny_model_factory)
    model.save_pretrained(tmp_path)
    tuning = {"verify_seconds": [0.02, 0.021, 0.023, 0.03], "machine": machine_identity("stock")}
    (tmp_path / "tree_tuning.json").write_text(json.dumps(tuning))
    reloaded = HydraForCausalLM.from_pretrained(tmp_path, base_model=model.base_lm)
    assert reloaded.dynamic_tree.verify_cost == pytest.approx((1.0, 1.05, 1.15, 1.5))
    reloaded.prepack_base(kernel="onednn")  # other kernels: this machine's curve for them
    machine = machine_forward_seconds(reloaded.base_lm)
    assert reloaded.dynamic_tree.verify_cost == pytest.approx(tuple(t / machine[0] for t in machine))


def test_the_tuning_is_saved_with_unchanged_heads_only(tiny_model_factory, tmp_path, caplog) -> None:
    model = _hydra(tiny_model_factory)
    model.save_pretrained(tmp_path / "tuned")
    calibration = calibrate([torch.rand(500)] * 4, [torch.rand(500) < 0.2] * 4)
    tuning = {"verify_seconds": [0.02, 0.021, 0.023], "calibration": calibration.to_record(), "heads_sha256": "x"}
    (tmp_path / "tuned" / "tree_tuning.json").write_text(json.dumps(tuning))
    loaded = HydraForCausalLM.from_pretrained(tmp_path / "tuned", base_model=model.base_lm)
    loaded.save_pretrained(tmp_path / "again")  # e.g. before push_to_hub
    saved = json.loads((tmp_path / "again" / "tree_tuning.json").read_text())
    assert saved == {**tuning, "heads_sha256": hub.heads_digest(tmp_path / "again")}  # renewed for the new file
    again = HydraForCausalLM.from_pretrained(tmp_path / "again", base_model=model.base_lm)
    assert again.dynamic_tree == loaded.dynamic_tree
    with torch.no_grad():
        next(again.heads.parameters()).add_(0.01)  # trained further: the measurement no longer holds
    again.save_pretrained(tmp_path / "changed")
    assert not (tmp_path / "changed" / "tree_tuning.json").exists()
    assert "changed since they were loaded" in caplog.text


def _tuned_copy(model, folder, rank_accuracy, verify_seconds):
    model.save_pretrained(folder)
    record = {"verify_seconds": verify_seconds, "rank_accuracy": rank_accuracy, "machine": machine_identity("stock")}
    (folder / "tree_tuning.json").write_text(json.dumps(record))
    return HydraForCausalLM.from_pretrained(folder, base_model=model.base_lm)


def test_where_no_tree_pays_the_default_call_decodes_plainly_and_says_so(tiny_model_factory, tmp_path, caplog):
    model = _hydra(tiny_model_factory)
    weak = [[0.01, 0.005]] * model.config.num_heads  # heads that are almost never right
    slow = _tuned_copy(model, tmp_path / "weak", weak, [0.01, 0.02, 0.03, 0.04])  # each token costs a forward
    assert "would be 0." in slow.plain_is_faster
    prompt = _prompts(SMALL_VOCAB)[1]
    for _ in range(2):
        out = slow.generate(prompt, speculative=True, max_new_tokens=8, return_dict_in_generate=True)
        assert torch.equal(out.sequences, _plain(slow, prompt, max_new_tokens=8))
        assert getattr(out, "speculation", None) is None  # plain generate's output
        assert all(type(layer) is GrowingLayer for layer in output_cache(out).layers)  # no copy of it per token
    assert caplog.text.count("decodes plainly") == 1  # said once
    asked = slow.generate(prompt, speculative=True, tree="chain", max_new_tokens=8, return_dict_in_generate=True)
    assert asked.speculation.steps > 0  # an explicit tree still speculates
    strong = _tuned_copy(model, tmp_path / "strong", [[0.9, 0.05]] * model.config.num_heads, [0.01, 0.0101, 0.0102])
    assert strong.plain_is_faster is None


def test_a_batch_decodes_plainly_where_its_rows_sharing_a_forward_make_trees_lose(tiny_model_factory, tmp_path):
    """Verifying 4 tokens costs about 1 here, 8 twice as much: trees pay for one prompt, not for four rows, whose
    trees of two tokens each already make the forward 8 tokens long."""
    model = _hydra(tiny_model_factory)
    curve = [0.01, 0.0101, 0.0102, 0.0103, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09]
    tuned = _tuned_copy(model, tmp_path / "tuned", [[0.9, 0.05]] * model.config.num_heads, curve)
    assert tuned.plain_is_faster is None and tuned.plain_is_faster_for(1) is None
    assert "with 4 prompts per forward" in tuned.plain_is_faster_for(4)
    batch = torch.cat([_prompts(SMALL_VOCAB, lengths=(6,), seed=seed)[0] for seed in range(4)])  # (4, 6)
    out = tuned.generate(batch, speculative=True, max_new_tokens=8, return_dict_in_generate=True)
    assert getattr(out, "speculation", None) is None  # plain batched generate's output
    assert torch.equal(out.sequences, tuned.base_lm.generate(batch, do_sample=False, max_new_tokens=8))
    asked = tuned.generate(batch, speculative=True, tree="chain", max_new_tokens=8, return_dict_in_generate=True)
    assert asked.speculation.steps > 0  # an explicit tree still speculates
    single = tuned.generate(batch[:1], speculative=True, max_new_tokens=8, return_dict_in_generate=True)
    assert single.speculation.steps > 0

