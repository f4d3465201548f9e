"""Head training: loss offsets and draft-vocabulary mapping against hand computations, a training step
that moves the heads and never the base, exact resume, a 2-process run, and trained heads that load and
decode losslessly. All on a tiny random Llama saved to a temporary folder (offline, seconds)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import TINY_VOCAB, make_tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_hydra import HydraForCausalLM, cli
from hf_hydra.configuration_hydra import DRAFT_VOCAB_PROJECTIONS
from hf_hydra.training import checkpoints, schedule, trainer
from hf_hydra.training.arguments import TrainingArguments
from hf_hydra.training.batching import collate, epoch_batches, micro_batch_stream, split_sequences
from hf_hydra.training.features import (
    FeatureStore,
    TokenizedSequence,
    training_sequences,
    write_preparation,
)
from hf_hydra.training.losses import (
    combine_head_losses,
    draft_vocab_index,
    head_targets,
    lm_loss,
    teacher_loss,
    topk_hits,
)
from hf_hydra.training.objective import HeadsObjective
from hf_hydra.training.preparation import prepare_features
from hf_hydra.training.schedule import lr_factor
from hf_hydra.training.trainer import train

TEACHER_TOPK = 8
DRAFT_VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_base")
    make_tiny_model("llama", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def features_dir(base_dir, tmp_path_factory) -> Path:
    """16 random sequences of 12..30 tokens; the first 3..6 tokens are a 'prompt' (no loss)."""
    rng = np.random.default_rng(0)
    sequences = []
    for _ in range(16):
        length, prompt = int(rng.integers(12, 31)), int(rng.integers(3, 7))
        ids = rng.integers(0, TINY_VOCAB, size=length).tolist()
        sequences.append(TokenizedSequence(ids, [0] * prompt + [1] * (length - prompt)))
    out = tmp_path_factory.mktemp("features")
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    prepare_features(base, sequences, out, base_model_id=str(base_dir), teacher_topk=TEACHER_TOPK)
    return out


def tiny_args(base_dir: Path, features_dir: Path, output_dir: Path, **overrides) -> TrainingArguments:
    defaults = {
        "features_dir": str(features_dir),
        "output_dir": str(output_dir),
        "base_model": str(base_dir),
        "head_arch": "hydra",
        "num_heads": 3,
        "draft_vocab_size": DRAFT_VOCAB,
        "lm_weight": 0.5,
        "teacher_weight": 1.0,
        "lr": 1e-2,
        "warmup_steps": 2,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 3,
        "validation_fraction": 0.25,
        "eval_every": 2,
        "save_every": 0,
    }
    return TrainingArguments(**(defaults | overrides))


# --------------------------------------------------------------------------------------------------
# Losses against hand computations


def test_head_targets_offsets_literal():
    """Head 0 at t targets x_{t+2} with the teacher of t+1; head 1 targets x_{t+3}; masked targets drop."""
    input_ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 1]], dtype=torch.bool)
    teacher_ids = (100 + torch.arange(6))[None, :, None].repeat(1, 1, 2)  # teacher at t: ids 100 + t
    teacher_logprobs = torch.zeros(1, 6, 2)
    head0 = head_targets(input_ids, loss_mask, teacher_ids, teacher_logprobs, head_index=0)
    assert head0.position.tolist() == [0, 1, 3]  # targets at 2, 3, 5 (4 is masked)
    assert head0.target_ids.tolist() == [12, 13, 15]
    assert head0.teacher_ids[:, 0].tolist() == [101, 102, 104]  # the base's distribution at t + 1
    head1 = head_targets(input_ids, loss_mask, teacher_ids, teacher_logprobs, head_index=1)
    assert head1.position.tolist() == [0, 2]  # targets at 3, 5
    assert head1.target_ids.tolist() == [13, 15]
    assert head1.greedy_ids.tolist() == [102, 104]
    assert head_targets(input_ids, loss_mask, teacher_ids, teacher_logprobs, head_index=4).position.numel() == 0


def test_lm_loss_draft_vocab_literal():
    """Targets map to their draft rows; a target outside the draft vocabulary is excluded and counted."""
    draft_ids = torch.tensor([2, 5, 9])
    index = draft_vocab_index(draft_ids, vocab_size=10)
    assert index.tolist() == [-1, -1, 0, -1, -1, 1, -1, -1, -1, 2]
    logq = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]))
    term = lm_loss(logq, torch.tensor([9, 2, 4]), index)  # rows 2, 0, excluded
    assert term.count.item() == 2 and term.excluded.item() == 1
    assert term.mean.item() == pytest.approx(-(math.log(0.5) + math.log(0.6)) / 2)
    full = lm_loss(logq, torch.tensor([1, 0, 2]))  # no draft vocabulary: ids are columns
    assert full.mean.item() == pytest.approx(-(math.log(0.3) + math.log(0.6) + math.log(0.8)) / 3)


def test_teacher_loss_literal():
    """Top-k renormalised over the draft vocabulary: p = (0.5, 0.25) / 0.75 on draft rows (1, 0)."""
    index = draft_vocab_index(torch.tensor([3, 7]), vocab_size=8)
    logq = torch.log(torch.tensor([[0.4, 0.6], [0.5, 0.5]]))
    teacher_ids = torch.tensor([[7, 3, 1], [0, 1, 2]])  # row 1: nothing inside the draft vocabulary
    teacher_logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.2], [0.5, 0.3, 0.1]]))
    term = teacher_loss(logq, teacher_ids, teacher_logprobs, index)
    expected = -(2 / 3 * math.log(0.6) + 1 / 3 * math.log(0.4))
    assert term.count.item() == 1 and term.excluded.item() == 1
    assert term.mean.item() == pytest.approx(expected, rel=1e-6)


def _loop_teacher_loss(logits, input_ids, loss_mask, teacher_ids, teacher_logprobs, head, draft_ids):
    """Independent implementation with Python floats: mean over (b, t) of soft CE at offset t + head + 2."""
    B, _, T, _ = logits.shape
    draft = None if draft_ids is None else {int(tok): row for row, tok in enumerate(draft_ids)}
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            target = t + head + 2
            if target >= T or not loss_mask[b, target]:
                continue
            row = logits[b, head, t].tolist()
            log_z = math.log(sum(math.exp(x) for x in row))
            pairs = [
                (int(j), float(lp))
                for j, lp in zip(teacher_ids[b, target - 1], teacher_logprobs[b, target - 1], strict=True)
            ]
            if draft is not None:
                pairs = [(draft[j], lp) for j, lp in pairs if j in draft]
            if not pairs:
                continue
            mass = sum(math.exp(lp) for _, lp in pairs)
            total += -sum(math.exp(lp) / mass * (row[col] - log_z) for col, lp in pairs)
            count += 1
    return total / count


@pytest.mark.parametrize("use_draft_vocab", [False, True])
def test_teacher_loss_matches_loop(use_draft_vocab):
    torch.manual_seed(0)
    B, H, T, V, k = 2, 3, 9, 20, 4
    draft_ids = torch.tensor([0, 2, 3, 5, 8, 11, 13, 17]) if use_draft_vocab else None
    columns = V if draft_ids is None else draft_ids.numel()
    logits = torch.randn(B, H, T, columns, dtype=torch.float64)
    input_ids = torch.randint(0, V, (B, T))
    loss_mask = torch.rand(B, T) > 0.3
    teacher_ids = torch.stack([torch.randperm(V)[:k] for _ in range(B * T)]).view(B, T, k)
    teacher_logprobs = torch.randn(B, T, V).log_softmax(-1).gather(-1, teacher_ids).double()
    index = None if draft_ids is None else draft_vocab_index(draft_ids, V)
    for head in range(H):
        targets = head_targets(input_ids, loss_mask, teacher_ids, teacher_logprobs, head)
        logq = logits[targets.batch_index, head, targets.position].log_softmax(-1)  # (N, C)
        term = teacher_loss(logq, targets.teacher_ids, targets.teacher_logprobs, index)
        expected = _loop_teacher_loss(logits, input_ids, loss_mask, teacher_ids, teacher_logprobs, head, draft_ids)
        assert term.mean.item() == pytest.approx(expected, rel=1e-5)


def test_combine_and_accuracy():
    terms = [lm_loss(torch.log(torch.tensor([[0.5, 0.5]])), torch.tensor([0])) for _ in range(3)]
    losses = combine_head_losses(terms, terms, lm_weight=1.0, teacher_weight=0.5, decay=0.8)
    assert losses.head_weights.tolist() == pytest.approx([1.0, 0.8, 0.64])
    assert losses.total.item() == pytest.approx(1.5 * math.log(2) * (1 + 0.8 + 0.64))
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.4]])
    draft_ids = torch.tensor([4, 6, 8])
    # rows: top-1 ids 6, 4, 8; greedy 6 (hit), 8 (top-2 only), 5 (outside the draft vocabulary: miss)
    hits = topk_hits(logits, torch.tensor([6, 8, 5]), draft_ids, ks=(1, 2))
    assert hits.tolist() == [1, 2]


def test_schedule_and_data_order():
    assert [round(lr_factor(s, 2, 10, 0.25), 4) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.25]
    train_ids, val_ids = split_sequences(20, 0.25, seed=3)
    assert len(val_ids) == 5 and not set(train_ids) & set(val_ids)
    assert split_sequences(20, 0.25, seed=3) == (train_ids, val_ids)
    epoch = epoch_batches(train_ids, 2, epoch=0, seed=1, num_processes=2)
    halves = [[b for _, b in islice(micro_batch_stream(train_ids, 2, 1, 2, p), len(epoch) // 2)] for p in (0, 1)]
    assert sorted(sum(halves[0] + halves[1], [])) == sorted(sum(epoch, []))  # the processes share an epoch
    stream = list(islice(micro_batch_stream(train_ids, 2, 1, 1, 0), 12))  # 8 batches per epoch: crosses one
    assert [e for e, _ in stream] == [0] * 8 + [1] * 4
    assert list(islice(micro_batch_stream(train_ids, 2, 1, 1, 0, skip=5), 7)) == stream[5:]


# --------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("head_arch", ["medusa", "hydra", "hydra++"])
def test_training_step_moves_heads_only(head_arch, base_dir, features_dir, tmp_path):
    args = tiny_args(base_dir, features_dir, tmp_path, head_arch=head_arch, noise_alpha=5.0, dropout=0.1)
    store = FeatureStore(features_dir)
    base = trainer.load_base(str(base_dir))
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    model = trainer.build_model(args, base, store, range(len(store)))
    objective = HeadsObjective(model.heads, TINY_VOCAB, args).train()
    heads_before = {k: v.clone() for k, v in objective.state_dict().items()}
    optimizer = schedule.make_optimizer(objective, args)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]}.isdisjoint(id(p) for p in base.parameters())
    batch = collate([store.sequence(i) for i in range(4)])
    out = objective(batch, base.get_input_embeddings()(batch.input_ids), with_accuracy=True)
    assert torch.isfinite(out.losses.total) and torch.isfinite(out.losses.lm).all()
    assert (out.losses.teacher_count > 0).all() and out.hits.shape == (3, 2)
    out.losses.total.backward()
    optimizer.step()
    changed = [k for k, v in objective.state_dict().items() if not torch.equal(v, heads_before[k])]
    assert any(".output." in k for k in changed) and any(".blocks." in k for k in changed)
    assert all(torch.equal(v, base_before[k]) for k, v in base.state_dict().items())
    assert all(p.grad is None for p in base.parameters())


def test_train_never_runs_base_layers(base_dir, features_dir, tmp_path, monkeypatch):
    """A full run: base layers would raise if called; base weights unchanged; files written; heads moved."""
    loaded = {}

    def load_base_with_tripwire(path: str):
        base = AutoModelForCausalLM.from_pretrained(path).eval()
        for layer in base.model.layers:
            layer.register_forward_pre_hook(lambda *_: pytest.fail("a base transformer layer ran during training"))
        loaded["base"], loaded["state"] = base, {k: v.clone() for k, v in base.state_dict().items()}
        return base

    monkeypatch.setattr(trainer, "load_base", load_base_with_tripwire)
    args = tiny_args(base_dir, features_dir, tmp_path / "run", head_arch="hydra++", max_steps=4)
    report = train(args)
    assert report.steps == 4 and report.tokens > 0 and report.tokens_per_second > 0
    assert math.isfinite(report.final_train_loss) and 0 < report.draft_vocab_coverage <= 1
    assert all(torch.equal(v, loaded["state"][k]) for k, v in loaded["base"].state_dict().items())
    out = Path(args.output_dir)
    assert {"config.json", "model.safetensors", "metrics.jsonl", "training_curves.png", "training_summary.json"} <= {
        p.name for p in out.iterdir()
    }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4]
    assert all(
        len(r["head_loss"]) == 3 and all(map(math.isfinite, r["head_loss"])) for r in records if "head_loss" in r
    )
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["args"]["head_arch"] == "hydra++"
    saved = load_file(out / "model.safetensors")
    store = FeatureStore(features_dir)
    train_split = split_sequences(len(store), args.validation_fraction, args.seed)[0]
    fresh = trainer.build_model(args, trainer.load_base(str(base_dir)), store, train_split)
    assert not all(torch.equal(saved[f"heads.{k}"], v) for k, v in fresh.heads.state_dict().items())
    assert not any(k.startswith(("base_lm", "heads.base")) for k in saved)


def test_resume_matches_straight_run(base_dir, features_dir, tmp_path):
    """4 steps straight == 2 steps + resume for 2: optimizer, scheduler (warm-up), RNG (noise, dropout), data."""
    common = {
        "head_arch": "hydra++",
        "noise_alpha": 5.0,
        "dropout": 0.2,
        "max_steps": 4,
        "save_every": 2,
        "warmup_steps": 3,
        "min_lr_ratio": 1.0,
        "eval_every": 1,
    }
    straight = train(tiny_args(base_dir, features_dir, tmp_path / "straight", **common))
    first = tiny_args(base_dir, features_dir, tmp_path / "resumed", **(common | {"max_steps": 2}))
    train(first)
    with pytest.raises(ValueError, match="resume=True"):
        train(replace(first, max_steps=4))  # a fresh run must not mix with an earlier run's checkpoints
    resumed = train(replace(first, max_steps=4, resume=True))
    assert resumed.steps == straight.steps == 4 and resumed.tokens == straight.tokens
    a = load_file(Path(straight.output_dir) / "model.safetensors")
    b = load_file(Path(resumed.output_dir) / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    steps = [json.loads(line)["step"] for line in (Path(resumed.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(4) == 2  # train + eval, no duplicates
    assert resumed.validation["top1"] == pytest.approx(straight.validation["top1"])


class SteppedClock:
    """A clock for `train(clock=...)`: `minutes` more at every reading (train reads it at the start and after each
    step); at reading number `interrupt_at` it raises KeyboardInterrupt instead, as a Ctrl-C after that step."""

    def __init__(self, minutes: float, interrupt_at: int | None = None) -> None:
        self.minutes, self.interrupt_at, self.readings = minutes, interrupt_at, 0

    def __call__(self) -> float:
        if self.readings == self.interrupt_at:
            raise KeyboardInterrupt
        self.readings += 1
        return (self.readings - 1) * self.minutes * 60


def checkpoint_steps(output_dir: str | Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in checkpoints.checkpoint_dirs(Path(output_dir))]


def test_checkpoints_every_few_minutes_or_every_n_steps_whichever_first(base_dir, features_dir, tmp_path):
    """4 minutes a step, save_every_minutes=10, save_every=5: step 3 by time (12 min), 5 by steps, which restarts
    the clock (so not 6), 8 as the last step. Both off: no checkpoint at all."""
    args = tiny_args(
        base_dir,
        features_dir,
        tmp_path / "timed",
        max_steps=8,
        save_every=5,
        save_every_minutes=10.0,
        keep_checkpoints=8,
        eval_every=0,
    )
    clock = SteppedClock(minutes=4.0)
    train(args, clock=clock)
    assert checkpoint_steps(args.output_dir) == [3, 5, 8]
    assert clock.readings == 1 + 8  # the start, then once per step
    off = tiny_args(base_dir, features_dir, tmp_path / "off", max_steps=2, save_every=0, save_every_minutes=0.0)
    train(off, clock=SteppedClock(minutes=60.0))
    assert checkpoint_steps(off.output_dir) == []
    with pytest.raises(ValueError, match="save_every_minutes"):
        tiny_args(base_dir, features_dir, tmp_path, save_every_minutes=-1.0)


def _logged_command(caplog, prefix: str) -> str:
    """The command at the end of the one log message that starts with `prefix`."""
    found = [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]
    assert len(found) == 1, [r.getMessage() for r in caplog.records]
    return found[0].split(": ")[-1]


def test_stopped_run_continues_with_the_logged_one_line_command(base_dir, features_dir, tmp_path, caplog):
    """Ctrl-C after step 3 (checkpoint at 2); the command logged at the start and at the stop,
    `hf-hydra train --output-dir DIR --resume` and nothing else, finishes it exactly as a straight 4-step run."""
    common = {
        "head_arch": "hydra++",
        "noise_alpha": 5.0,
        "dropout": 0.2,
        "max_steps": 4,
        "save_every": 2,
        "warmup_steps": 1,
        "min_lr_ratio": 0.5,
        "eval_every": 1,
    }
    straight = train(tiny_args(base_dir, features_dir, tmp_path / "straight", **common))
    out = tmp_path / "stopped"
    caplog.set_level(logging.INFO, logger=trainer.__name__)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_args(base_dir, features_dir, out, **common), clock=SteppedClock(minutes=0.0, interrupt_at=3))
    command = _logged_command(caplog, "To continue this run if it stops")
    assert command == f"hf-hydra train --output-dir {out} --resume"
    assert (
        _logged_command(
            caplog, "Training stopped at step 3 (KeyboardInterrupt); its newest checkpoint is step-00000002"
        )
        == command
    )
    assert checkpoint_steps(out) == [2]

    assert cli.main(shlex.split(command)[1:]) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert (summary["steps"], summary["tokens"]) == (straight.steps, straight.tokens) == (4, straight.tokens)
    a, b = load_file(Path(straight.output_dir) / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert summary["validation"]["top1"] == pytest.approx(straight.validation["top1"])
    assert checkpoint_steps(out) == [2, 4]  # the last step too: the run can be extended


def test_finished_run_is_extended_by_more_epochs(base_dir, features_dir, tmp_path):
    """One epoch (3 steps), then `--resume --epochs 2`: steps 4-6 continue from the last step's checkpoint over the
    second epoch, with the learning rate of the new 6-step schedule from step 4 on."""
    args = tiny_args(
        base_dir,
        features_dir,
        tmp_path / "run",
        epochs=1.0,
        max_steps=0,
        warmup_steps=1,
        min_lr_ratio=0.2,
        eval_every=0,
    )
    assert cli.main(["train", *cli_options(args)]) == 0
    out = Path(args.output_dir)
    assert checkpoint_steps(out) == [3]
    assert cli.main(["train", "--output-dir", str(out), "--resume", "--epochs", "2"]) == 0
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in steps] == [0, 0, 0, 1, 1, 1]
    old = [lr_factor(s, 1, 3, 0.2) for s in range(3)]
    new = [lr_factor(s, 1, 6, 0.2) for s in range(3, 6)]
    assert [r["lr"] for r in steps] == pytest.approx([args.lr * f for f in old + new])
    store = FeatureStore(features_dir)
    epoch_tokens = sum(len(store.sequence(i).input_ids) for i in split_sequences(len(store), 0.25, 0)[0])
    summary = json.loads((out / "training_summary.json").read_text())
    assert (summary["steps"], summary["tokens"]) == (6, 2 * epoch_tokens)
    stored = json.loads((out / "training_args.json").read_text())
    assert (stored["epochs"], stored["max_steps"], stored["resume"], stored["head_arch"]) == (2.0, 0, True, "hydra")


def test_train_without_features_or_a_run_to_resume_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match=r"no training_args.json in .*empty.*--features-dir FOLDER"):
        cli.main(["train", "--output-dir", str(tmp_path / "empty"), "--resume"])
    with pytest.raises(ValueError, match=r"Pass --features-dir FOLDER .* or --resume"):
        cli.main(["train", "--output-dir", str(tmp_path / "new")])
    assert not (tmp_path / "empty").exists() and not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("head_arch", "projection"),
    [
        ("medusa", "draft_vocab"),
        ("hydra", "draft_vocab"),
        ("hydra++", "draft_vocab"),
        ("hydra", "per_head"),
        ("medusa", "shared"),
        ("hydra++", "shared_draft_vocab"),
    ],
)
def test_trained_heads_load_and_decode_losslessly(head_arch, projection, base_dir, features_dir, tmp_path):
    args = tiny_args(
        base_dir, features_dir, tmp_path, head_arch=head_arch, vocab_projection=projection, save_dtype="float16"
    )
    report = train(args)
    assert (report.draft_vocab_coverage is None) == (projection not in DRAFT_VOCAB_PROJECTIONS)
    saved = load_file(Path(args.output_dir) / "model.safetensors")
    assert all(v.dtype == torch.float16 for k, v in saved.items() if k != "heads.draft_token_ids")
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model = HydraForCausalLM.from_pretrained(args.output_dir, base_model=base)
    assert model.config.head_arch == head_arch and model.config.vocab_projection == projection
    prompt = torch.randint(0, TINY_VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    plain = base.generate(prompt, max_new_tokens=24, do_sample=False)
    fast = model.generate(prompt, max_new_tokens=24, do_sample=False, speculative=True)
    assert torch.equal(plain, fast)
    if projection in DRAFT_VOCAB_PROJECTIONS:
        store = FeatureStore(features_dir)
        train_split = split_sequences(len(store), args.validation_fraction, args.seed)[0]
        expected_ids = store.most_frequent_targets(DRAFT_VOCAB, train_split)
        assert model.config.draft_vocab_size == DRAFT_VOCAB
        assert model.heads.draft_token_ids.tolist() == expected_ids.tolist()


def cli_options(args: TrainingArguments) -> list[str]:
    """`hf-hydra train` options equal to `args` (the non-default ones)."""
    options = []
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if value == field.default:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            options.append(flag if value else "--no-" + flag[2:])
        else:
            options += [flag, str(value)]
    return options


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_two_process_accelerate_launch(mixed_precision, base_dir, features_dir, tmp_path):
    """The documented command, `accelerate launch --multi_gpu --num_processes 2 -m hf_hydra.cli train ...`, on a
    CPU-only machine: 2 gloo processes (also under bf16 autocast). A tiny save_every_minutes makes the main
    process's clock ask for a checkpoint at every step: both processes save (else the run would hang)."""
    args = tiny_args(
        base_dir,
        features_dir,
        tmp_path / "ddp",
        max_steps=3,
        save_every=2,
        save_every_minutes=1e-9,
        keep_checkpoints=3,
        mixed_precision=mixed_precision,
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "hf_hydra.cli",
        "train",
        *cli_options(args),
    ]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((Path(args.output_dir) / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 3
    assert checkpoint_steps(args.output_dir) == [1, 2, 3]  # 1 by time, 2 by steps (and time), 3 the last
    continue_line = (
        f"accelerate launch --multi_gpu --num_processes 2 -m hf_hydra.cli train --output-dir {args.output_dir}"
    )
    assert f"To continue this run if it stops: {continue_line} --resume" in result.stderr
    train_lines = [
        r
        for r in map(json.loads, (Path(args.output_dir) / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    ]
    assert [r["step"] for r in train_lines] == [1, 2, 3]  # one writer
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    HydraForCausalLM.from_pretrained(args.output_dir, base_model=base)


def test_answers_cut_off_by_truncation_are_dropped_and_never_trained_on(base_dir, tmp_path):
    prompt_only = TokenizedSequence([1, 2, 3, 4], [0, 0, 0, 0])
    answered = TokenizedSequence([1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1])
    assert training_sequences([prompt_only, answered, prompt_only]) == [answered]

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    features = tmp_path / "features"
    prepare_features(base, [prompt_only] * 4, features, base_model_id=str(base_dir), teacher_topk=TEACHER_TOPK)
    with pytest.raises(ValueError, match="no target"):
        train(tiny_args(base_dir, features, tmp_path / "out", max_steps=1))


def _random_features(base_dir: Path, out: Path, count: int, seed: int, teacher_topk: int = TEACHER_TOPK) -> Path:
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(count):
        length = int(rng.integers(10, 20))
        ids = rng.integers(0, TINY_VOCAB, size=length).tolist()
        sequences.append(TokenizedSequence(ids, [0, 0] + [1] * (length - 2)))
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    prepare_features(base, sequences, out, base_model_id=str(base_dir), teacher_topk=teacher_topk)
    return out


def test_draft_vocabulary_counts_the_training_split_only(features_dir):
    """The draft vocabulary is the most frequent assistant tokens of the training sequences, counted by hand
    here; the validation split never shapes it."""
    store = FeatureStore(features_dir)
    train_split, val_split = split_sequences(len(store), 0.25, 0)
    by_hand = torch.zeros(TINY_VOCAB, dtype=torch.int64)
    for index in train_split:
        sequence = store.sequence(index)
        by_hand += torch.bincount(sequence.input_ids[sequence.loss_mask], minlength=TINY_VOCAB)
    assert torch.equal(store.target_token_counts(train_split), by_hand)
    validation = store.target_token_counts(val_split)
    assert validation.sum() > 0 and torch.equal(by_hand + validation, store.target_token_counts())
    expected = by_hand.topk(DRAFT_VOCAB).indices.sort().values
    assert torch.equal(store.most_frequent_targets(DRAFT_VOCAB, train_split), expected)


def test_extra_feature_folders_are_training_data_only(base_dir, features_dir, tmp_path):
    """One epoch over features_dir's training split plus every sequence of the extra folder; validation,
    its rows and the draft vocabulary from features_dir alone; the card shows both prepare commands."""
    primary = tmp_path / "primary"
    shutil.copytree(features_dir, primary)
    write_preparation(primary, "hf-hydra prepare --data distilled.jsonl --out features/distilled")
    extra = _random_features(base_dir, tmp_path / "extra", count=8, seed=1)
    write_preparation(extra, "hf-hydra prepare --sharegpt 8 --out features/sharegpt")
    one_epoch = {"epochs": 1.0, "max_steps": 0}  # 12 + 8 training sequences: 10 micro-batches, 5 steps
    alone = train(tiny_args(base_dir, primary, tmp_path / "alone", **one_epoch))
    both = train(tiny_args(base_dir, primary, tmp_path / "both", extra_features_dirs=(str(extra),), **one_epoch))

    store, extra_store = FeatureStore(primary), FeatureStore(extra)
    train_indices, val_indices = split_sequences(len(store), 0.25, 0)
    tokens = sum(len(store.sequence(i).input_ids) for i in train_indices)
    extra_tokens = sum(len(extra_store.sequence(i).input_ids) for i in range(len(extra_store)))
    assert (alone.train_sequences, alone.tokens) == (12, tokens)
    assert (both.train_sequences, both.tokens) == (12 + 8, tokens + extra_tokens)
    assert both.validation_sequences == alone.validation_sequences == len(val_indices)
    assert both.validation["rows"] == alone.validation["rows"]
    assert both.draft_vocab_coverage == alone.draft_vocab_coverage
    recorded = json.loads((tmp_path / "both" / "preparation.json").read_text())
    assert recorded["extra_commands"] == ["hf-hydra prepare --sharegpt 8 --out features/sharegpt"]
    card = (tmp_path / "both" / "README.md").read_text()
    assert "hf-hydra prepare --sharegpt 8 --out features/sharegpt" in card
    assert "--features-dir features/distilled --output-dir heads/ --extra-features-dir features/sharegpt" in card
    saved = json.loads((tmp_path / "both" / "training_args.json").read_text())
    assert TrainingArguments(**saved).extra_features_dirs == (str(extra),)


def test_bf16_mixed_precision_autocasts_training_steps_only(base_dir, features_dir, tmp_path, monkeypatch):
    """--mixed-precision bf16: the heads' layers compute in bfloat16 in training steps and in float32 in
    validation; weights stay float32; the run's losses stay close to a float32 run's."""
    seen = []
    build_model = trainer.build_model

    def build_model_with_probe(*args, **kwargs):
        model = build_model(*args, **kwargs)
        for module in model.heads.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, _, out: seen.append((m.training, out.dtype, m.weight.dtype)))
        return model

    monkeypatch.setattr(trainer, "build_model", build_model_with_probe)
    common = {"head_arch": "hydra++", "max_steps": 2, "eval_every": 1}
    AcceleratorState._reset_state(True)  # accelerate keeps one precision per process
    try:
        mixed = train(tiny_args(base_dir, features_dir, tmp_path / "bf16", mixed_precision="bf16", **common))
    finally:
        AcceleratorState._reset_state(True)
    assert {dtype for training, dtype, _ in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype, _ in seen if not training} == {torch.float32}
    assert {weight for _, _, weight in seen} == {torch.float32}
    full = train(tiny_args(base_dir, features_dir, tmp_path / "fp32", **common))
    assert mixed.final_train_loss == pytest.approx(full.final_train_loss, rel=0.02)
    with pytest.raises(ValueError, match="mixed_precision"):
        tiny_args(base_dir, features_dir, tmp_path, mixed_precision="bf17")


def test_extra_feature_folder_of_another_teacher_is_refused(base_dir, features_dir, tmp_path):
    extra = _random_features(base_dir, tmp_path / "extra", count=4, seed=2, teacher_topk=TEACHER_TOPK // 2)
    with pytest.raises(ValueError, match="teacher top-k.*prepare both with the same base"):
        train(tiny_args(base_dir, features_dir, tmp_path / "out", extra_features_dirs=(str(extra),)))


def test_ablation_table_joins_training_logs_and_benchmark(base_dir, features_dir, tmp_path):
    from hf_hydra.bench import AUTOREGRESSIVE, MethodSummary
    from hf_hydra.training.ablation import ablation_rows, markdown_ablation

    medusa = train(tiny_args(base_dir, features_dir, tmp_path / "m", head_arch="medusa", teacher_weight=0.0))
    hydra = train(tiny_args(base_dir, features_dir, tmp_path / "h", lm_weight=0.0, noise_alpha=5.0))

    def summary(method: str, tau: float | None, speedup: float) -> dict:
        return dataclasses.asdict(MethodSummary(method, tau, 10.0, speedup, speedup, 0))

    report = {
        "settings": {"turn": 1, "num_prompts": 4, "max_new_tokens": 16},
        "summary": [summary(AUTOREGRESSIVE, None, 1.0), summary("hydra-teacher", 1.75, 1.25)],
    }
    rows = ablation_rows({"medusa-lm": medusa.output_dir, "hydra-teacher": hydra.output_dir}, report)
    assert [(r.head_arch, r.losses, r.noise_alpha) for r in rows] == [("medusa", "lm", 0.0), ("hydra", "teacher", 5.0)]
    assert rows[0].validation_top1 == medusa.validation["top1"] and rows[0].tau is None  # not benchmarked
    assert (rows[1].tau, rows[1].speedup_median, rows[1].steps) == (1.75, 1.25, 3)
    table = markdown_ablation(rows, report)
    top1 = " | ".join(f"{x:.3f}" for x in hydra.validation["top1"])
    assert f"| hydra-teacher | hydra | teacher | 5 | 1 | 3 | {top1} | 1.75 | 1.25x |" in table
    assert "4 prompts" in table and "each heads' default tree" in table  # the report names no trees
    one_tree = {**report["settings"], "trees": {"a": [[0], [1]], "b": [[0], [1]]}}
    assert "one 2-node tree for all heads" in markdown_ablation(rows, {**report, "settings": one_tree})
    dynamic = {**report["settings"], "trees": {"a": "dynamic", "b": "dynamic"}}
    assert "dynamic trees for all heads" in markdown_ablation(rows, {**report, "settings": dynamic})
    with pytest.raises(FileNotFoundError, match="hf-hydra train"):
        ablation_rows({"x": tmp_path}, report)
