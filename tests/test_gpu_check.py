"""The prepared GPU check (gpu_check/): its CPU dry run end to end, and the projection on hand-computed cases.

`gpu_check/profile_gpu.py` runs the same code on the GPU machine with a 7B shape; here a tiny shape on the CPU
checks that every stage runs and writes the report, and that the projection's arithmetic is right.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # gpu_check/ sits at the top of the repository, outside the installed package

from gpu_check import profile_gpu  # noqa: E402
from gpu_check.profile_gpu import PROJECTION, project  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_projection_of_a_hand_computed_case() -> None:
    """tau 2.5 tokens per step; a step costs t(n) 12 ms + loop 3 ms = 15 ms: 2.5 / 0.015 = 166.67 tokens/s; plain
    decoding at 10 ms per token makes 100 tokens/s, so the speed-up is 1.6667x."""
    speed = project(tau=2.5, verify_seconds=0.012, loop_seconds=0.003, plain_seconds=0.010)
    assert speed.tokens_per_step == 2.5
    assert speed.step_seconds == pytest.approx(0.015)
    assert speed.tokens_per_second == pytest.approx(500 / 3)
    assert speed.speedup == pytest.approx(5 / 3)


def test_projection_without_acceptance_is_slower_than_plain_decoding() -> None:
    """tau 1 (only the bonus token) with a step dearer than a plain forward: below 1x, by exactly their ratio."""
    speed = project(tau=1.0, verify_seconds=0.011, loop_seconds=0.001, plain_seconds=0.010)
    assert speed.speedup == pytest.approx(0.010 / 0.012)


@pytest.mark.parametrize(
    "arguments",
    [(0.9, 0.01, 0.0, 0.01), (2.0, 0.0, 0.0, 0.01), (2.0, 0.01, -0.001, 0.01), (2.0, 0.01, 0.0, 0.0)],
)
def test_projection_refuses_impossible_inputs(arguments: tuple[float, float, float, float]) -> None:
    with pytest.raises(ValueError, match="tau >= 1"):
        project(*arguments)


def test_trees_of_every_profiled_size() -> None:
    for n in (1, 2, 4, 8, 16, 32, 64):
        assert profile_gpu.tree_of_size(n).num_tokens == n
    with pytest.raises(ValueError, match="tree sizes"):
        profile_gpu.tree_of_size(65)
    assert profile_gpu.tree_label([[1], [0]]) == "[[0],[1]]"
    assert profile_gpu.tree_label(profile_gpu.MC_SIM_7B_63) == "mc_sim_7b_63"


def test_tau_of_the_shipped_heads_comes_from_the_named_bench() -> None:
    """The default trees' tau is main-1280-retuned's (80 MT-Bench prompts), checked against the tree it ran; a tree
    no bench ran gets the heads' expectation, labelled as such."""
    default = profile_gpu.shipped_heads_tree("hydra++")
    tau = profile_gpu.shipped_tau("hydra++", profile_gpu.DEFAULT_TREE, default)
    report = json.loads((ROOT / "artifacts/bench/main-1280-retuned/bench.json").read_text())
    assert tau.value == next(row["tau"] for row in report["summary"] if row["method"] == "hydra++")
    assert tau.measured and "main-1280-retuned" in tau.source and "80 prompts" in tau.source
    expected = profile_gpu.shipped_tau("hydra++", "mc_sim_7b_63", profile_gpu.MC_SIM_7B_63)
    assert not expected.measured and "rank_accuracy" in expected.source and expected.value > 1.0
    with pytest.raises(ValueError, match="not on"):
        profile_gpu.bench_tau(profile_gpu.MEASURED_TAU[0], [[0]])


def test_dry_run_writes_the_whole_report(tmp_path: Path) -> None:
    report = profile_gpu.run(profile_gpu.DRY_RUN, tmp_path, log=lambda message: None)
    saved = json.loads((tmp_path / profile_gpu.RESULT_JSON).read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved) >= {"settings", "environment", "forward_profile", "plain_generate", "loops", "projections"}
    assert saved["environment"]["base_dtype"] == "torch.float32" and saved["notes"] == list(profile_gpu.NOTES)

    profile = saved["forward_profile"]
    assert profile["sizes"] == list(profile_gpu.DRY_RUN.sizes) and profile["ratios"][0] == 1.0
    assert len(profile["seconds"]) == len(profile["sizes"]) and min(profile["seconds"]) > 0
    assert set(profile["tree_seconds"]) == set(profile_gpu.shipped_trees()) and profile["plain_seconds"] > 0

    archs_and_trees = {(loop["head_arch"], loop["tree"]) for loop in saved["loops"]}
    assert len(archs_and_trees) == len(saved["loops"]) == 3 * len(profile_gpu.SHIPPED_TREES)
    for loop in saved["loops"]:
        assert loop["steps"] > 0 and loop["new_tokens"] == profile_gpu.DRY_RUN.loop_new_tokens
        assert set(loop["phase_seconds_per_step"]) == {"draft", "verify", "accept", "commit"}

    rows = saved["projections"]
    assert {(row["heads"], row["tree"].removesuffix(" (default)")) for row in rows} == archs_and_trees
    plain = profile["plain_seconds"]
    for row in rows:
        assert row["label"] == PROJECTION
        speed = row["versus_forward"]
        assert speed["step_seconds"] == pytest.approx(row["verify_seconds"] + row["loop_seconds"])
        assert speed["speedup"] == pytest.approx(row["tau"]["value"] / speed["step_seconds"] * plain)
    table = (tmp_path / profile_gpu.RESULT_MARKDOWN).read_text()
    assert table.count("(projection)") == 3 and table.count("| hydra++ |") == 2 * len(profile_gpu.SHIPPED_TREES)
