"""tune-tree and calibrate on a tiny model: rank accuracies against a direct computation, a valid and stored tree,
the stored calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_model

from hf_hydra import HydraForCausalLM
from hf_hydra.cli import main
from hf_hydra.dynamic_tree import HeadCalibration
from hf_hydra.training.features import FeatureStore, TokenizedSequence
from hf_hydra.training.preparation import prepare_features
from hf_hydra.tree_tuning import (
    measure_calibration,
    measure_rank_accuracy,
    measure_verify_seconds,
    stored_rank_accuracy,
    tune_tree,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base():
    return make_tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def store(base, tmp_path_factory) -> FeatureStore:
    rng = np.random.default_rng(0)
    sequences = [
        TokenizedSequence(rng.integers(0, TINY_VOCAB, size=20).tolist(), [0] * 4 + [1] * 16) for _ in range(6)
    ]
    out = tmp_path_factory.mktemp("features")
    prepare_features(base, sequences, out, base_model_id="tiny", teacher_topk=4)
    return FeatureStore(out)


@pytest.mark.parametrize("head_arch", ["medusa", "hydra", "hydra++"])
def test_rank_accuracy_matches_a_direct_computation(base, store, head_arch):
    torch.manual_seed(0)
    model = HydraForCausalLM.from_base(base, head_arch=head_arch, num_heads=2)
    accuracy = measure_rank_accuracy(model, store, [0, 1, 2], max_rank=5)
    embed = base.get_input_embeddings()
    for head in range(2):
        shift = head + 2
        hits, total = torch.zeros(5), 0
        for index in [0, 1, 2]:
            f = store.sequence(index)
            positions = torch.arange(f.hidden.shape[0])[None]
            context = model.heads.encode_context(f.hidden[None], positions, None)[0]  # (T, d)
            for t in range(f.hidden.shape[0] - shift):
                if not f.loss_mask[t + shift]:
                    continue
                path = embed(f.input_ids[t + 1 : t + head + 2])  # E(x_{t+1}) .. E(x_{t+head+1})
                logits = model.heads(head, context[t], path if model.heads.sequential else None)
                rank = int((logits > logits[f.teacher_ids[t + shift - 1, 0]]).sum())
                total += 1
                if rank < 5:
                    hits[rank] += 1
        assert accuracy[head] == pytest.approx((hits / total).tolist(), abs=1e-6)


def test_tune_tree_returns_a_valid_fast_tree(base, store):
    model = HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=3)
    report = tune_tree(model, measure_rank_accuracy(model, store, [0, 1], max_rank=3), max_tokens=6)
    assert len(report.verify_seconds) == 6 and all(s > 0 for s in report.verify_seconds)
    assert 1 <= len(report.choice.paths) <= 5 and max(len(p) for p in report.choice.paths) <= 3
    assert report.choice.expected_tau >= 1.0
    ids = torch.tensor([[1, 2, 3, 4]])
    plain = base.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=10, speculative=True, tree=report.choice.paths), plain)


def test_verify_latency_is_measured_per_size(base):
    model = HydraForCausalLM.from_base(base, head_arch="medusa", num_heads=2)
    seconds = measure_verify_seconds(model, max_tokens=3, context_length=16, repeats=2)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)


def test_cli_stores_the_tuned_tree_with_the_heads(base, store, tmp_path):
    base_dir, heads_dir = tmp_path / "base", tmp_path / "heads"
    base.save_pretrained(base_dir)
    loaded = type(base).from_pretrained(base_dir)
    fresh = HydraForCausalLM.from_base(loaded, head_arch="hydra", num_heads=2)
    fresh.heads.half()
    fresh.save_pretrained(heads_dir)  # heads saved in float16, as `hf-hydra train --save-dtype float16` does
    weights = (heads_dir / "model.safetensors").read_bytes()
    code = main(
        ["tune-tree", "--heads", str(heads_dir), "--features", str(store.folder), "--validation-fraction", "0.5",
         "--max-tokens", "5"]
    )  # fmt: skip
    assert code == 0
    report = json.loads((heads_dir / "tree_tuning.json").read_text())
    tuned = [list(p) for p in report["choice"]["paths"]]
    reloaded = HydraForCausalLM.from_pretrained(heads_dir)
    assert reloaded.generation_config.hydra_tree == "dynamic"  # the default: dynamic on the measured curve
    assert reloaded.config.tree == tuned  # the static tree
    verify = report["verify_seconds"]
    assert reloaded.dynamic_tree.verify_cost == pytest.approx([t / verify[0] for t in verify])
    assert reloaded.dynamic_tree.calibration.rates is not None  # measured on the held-out split as well
    assert report["calibration_command"] == report["command"]
    assert (heads_dir / "model.safetensors").read_bytes() == weights  # the weights are left as they were
    expected = report["choice"]["expected_tau"]
    card = (heads_dir / "README.md").read_text()
    assert f"expected tau {expected:.2f}" in card  # the card shows the prediction
    assert report["command"].startswith("hf-hydra tune-tree --heads heads/ --features ")
    assert "--validation-fraction 0.5" in report["command"] and "--max-tokens 5" in report["command"]


def _saved_heads(base, tmp_path, head_arch):
    """Fresh heads on the base saved in tmp_path/base, saved in tmp_path/heads (their folder is returned)."""
    base_dir, heads_dir = tmp_path / "base", tmp_path / "heads"
    base.save_pretrained(base_dir)
    HydraForCausalLM.from_base(type(base).from_pretrained(base_dir), head_arch=head_arch, num_heads=2).save_pretrained(
        heads_dir
    )
    return heads_dir


def test_cli_prepack_measures_with_prepacked_kernels_and_says_so(base, store, tmp_path):
    heads_dir = _saved_heads(base, tmp_path, "medusa")
    args = ["tune-tree", "--heads", str(heads_dir), "--features", str(store.folder), "--validation-fraction", "0.5"]
    assert main([*args, "--max-tokens", "4", "--prepack"]) == 0
    report = json.loads((heads_dir / "tree_tuning.json").read_text())
    assert report["prepacked"] is True and report["command"].endswith(" --prepack")
    assert len(report["verify_seconds"]) == 4
    assert "prepacked for CPU" in (heads_dir / "README.md").read_text()


def _tuned_heads(base, store, tmp_path):
    heads_dir = _saved_heads(base, tmp_path, "hydra")
    args = ["tune-tree", "--heads", str(heads_dir), "--features", str(store.folder), "--validation-fraction", "0.5"]
    assert main([*args, "--max-tokens", "4"]) == 0
    return heads_dir


def test_cli_retunes_for_this_machine_from_the_stored_accuracy(base, store, tmp_path):
    heads_dir = _tuned_heads(base, store, tmp_path)
    first = json.loads((heads_dir / "tree_tuning.json").read_text())
    assert first["accuracy_command"] == first["command"] and len(first["heads_sha256"]) == 64

    (heads_dir / "training_args.json").write_text(json.dumps({"features_dir": "features/", "head_arch": "hydra"}))
    assert main(["tune-tree", "--heads", str(heads_dir), "--max-tokens", "6"]) == 0  # no features
    again = json.loads((heads_dir / "tree_tuning.json").read_text())
    assert again["rank_accuracy"] == first["rank_accuracy"]  # the heads' accuracy, kept
    assert len(again["verify_seconds"]) == 6  # the machine, measured anew
    assert again["command"] == "hf-hydra tune-tree --heads heads/ --max-tokens 6"
    assert again["accuracy_command"] == first["command"] and again["heads_sha256"] == first["heads_sha256"]
    assert again["calibration"] == first["calibration"]  # the heads' calibration, kept
    tuned = [list(p) for p in again["choice"]["paths"]]
    assert HydraForCausalLM.from_pretrained(heads_dir).config.tree == tuned
    card = (heads_dir / "README.md").read_text()
    assert first["command"] in card and again["command"] not in card  # the card reproduces the run on features


def test_retuning_without_features_refuses_what_it_cannot_trust(base, store, tmp_path):
    heads_dir = _tuned_heads(base, store, tmp_path)
    tuning = heads_dir / "tree_tuning.json"
    record = json.loads(tuning.read_text())
    assert stored_rank_accuracy(heads_dir, 2).rank_accuracy == record["rank_accuracy"]
    with pytest.raises(ValueError, match="no rank accuracy for 3 heads: pass --features"):
        stored_rank_accuracy(heads_dir, 3)
    tuning.write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON .*pass --features"):
        stored_rank_accuracy(heads_dir, 2)
    tuning.write_text(json.dumps({**record, "heads_sha256": "0" * 64}))  # tuned before the heads were retrained
    with pytest.raises(ValueError, match="measured other heads .*pass --features"):
        main(["tune-tree", "--heads", str(heads_dir)])
    tuning.unlink()
    with pytest.raises(FileNotFoundError, match="no tree_tuning.json from an earlier tuning: pass --features"):
        main(["tune-tree", "--heads", str(heads_dir)])


def test_cli_calibrate_stores_the_heads_calibration_beside_their_tuning(base, store, tmp_path, capsys):
    heads_dir = _tuned_heads(base, store, tmp_path)
    tuned = json.loads((heads_dir / "tree_tuning.json").read_text())
    assert main(["calibrate", "--heads", str(heads_dir), "--features", str(store.folder), "--max-sequences", "4"]) == 0
    record = json.loads((heads_dir / "tree_tuning.json").read_text())
    model = HydraForCausalLM.from_pretrained(heads_dir)
    expected = measure_calibration(model, store, range(4))
    assert HeadCalibration.from_record(record["calibration"]) == expected
    assert record["calibration_command"].startswith("hf-hydra calibrate --heads heads/ --features ")
    assert {k: v for k, v in record.items() if not k.startswith("calibration")} == {
        k: v for k, v in tuned.items() if not k.startswith("calibration")
    }  # the tuning is left as it was
    assert model.dynamic_tree.calibration == expected
    assert "head 1: accepted share by probability bin" in capsys.readouterr().out
