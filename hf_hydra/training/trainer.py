"""`hf-hydra train`: train draft heads on cached base features, under `accelerate`.

The frozen base model's transformer layers never run here: every input comes from the feature
cache (`features.py`: post-norm hidden states, token ids, loss masks, the base's top-k next-token
distribution). Of the base only the input embedding (the Hydra heads read E(x)) and the lm_head
weight (initial head projections) are used.

One optimizer step:

    for each of `gradient_accumulation_steps` micro-batches (B sequences, padded to T):
        context  = heads.encode_context(h + noise)                          (B, T, d)
        head i   : rows (b, t) with a target at t + i + 2  -> logits         (N_i, K)
        loss     = sum_i decay^i (lm_weight * CE(x_{t+i+2}) + teacher_weight * CE(teacher))
        backward (gradients all-reduced across processes on the last micro-batch)
    clip, AdamW step, lr schedule step (linear warm-up, cosine to min_lr_ratio x peak)

Multi-process: `accelerate launch --multi_gpu --num_processes N -m hf_hydra.cli train ...` (on a
CPU-only machine the processes talk over gloo: `accelerate launch --cpu` starts one process unless
an MPI host file is given). Every process reads its own share of each global batch; only the main
process logs and writes files.

Outputs in `output_dir`: the heads (`save_pretrained`), `metrics.jsonl` (one line per step and per
validation), `training_curves.png`, `training_summary.json`, `training_args.json`, and
`checkpoints/step-NNNNNNNN` (accelerate state + step counter) for `resume=True`, written every `save_every` steps,
every `save_every_minutes` and at the last step. A stopped run continues with one line, logged when it starts and
when it stops: `hf-hydra train --output-dir DIR --resume` (the arguments come from DIR/training_args.json; a larger
`--max-steps` or `--epochs` beside it extends a finished run, on the new, longer learning-rate schedule).

This module builds a run and drives the loop; the parts live beside it: `arguments.py` (what a run
is asked to do), `batching.py` (split, order, padded batches), `objective.py` (the loss on a batch,
validation metrics), `schedule.py` (step count, optimizer, learning rate), `checkpoints.py` (resume
state), `metrics.py` (`metrics.jsonl` and its plot).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from .. import assets
from ..configuration_hydra import DRAFT_VOCAB_PROJECTIONS
from ..modeling_hydra import HydraForCausalLM
from .arguments import ARGS_FILE, SAVE_DTYPES, TrainingArguments
from .batching import collate, micro_batch_stream, split_sequences
from .checkpoints import Progress, SaveTimer, checkpoint_dirs, checkpoint_due, save_checkpoint
from .features import PREPARATION_FILE, FeatureCollection, FeatureStore, read_preparation
from .metrics import METRICS_FILE, PLOT_FILE, MetricsLog, plot_metrics
from .objective import HeadsObjective, evaluate
from .schedule import follow_schedule, make_optimizer, make_scheduler, total_steps

logger = logging.getLogger(__name__)

SUMMARY_FILE = "training_summary.json"
GLOO_SETTLE_SECONDS = 0.5  # pause before destroying a multi-process run's process group (see _end_process_group)


@dataclass(frozen=True)
class TrainingReport:
    """What a run did and cost; also written to `training_summary.json`."""

    output_dir: str
    head_arch: str
    steps: int  # optimizer steps done in total (over resumes)
    tokens: int  # training tokens seen in total, all processes together
    train_seconds: float  # time in training steps (no validation, no checkpointing), over resumes
    wall_seconds: float  # wall-clock of this call, everything included
    tokens_per_second: float  # tokens / train_seconds
    num_processes: int
    train_sequences: int
    validation_sequences: int
    draft_vocab_coverage: float | None  # share of the features' targets inside the draft vocabulary
    final_train_loss: float | None  # last step: sum over heads of lm_weight * lm + teacher_weight * teacher
    validation: dict = field(default_factory=dict)  # last validation: per-head top1 / top5 / losses


# --------------------------------------------------------------------------------------------------
# Setup


def load_base(path: str) -> PreTrainedModel:
    """The frozen base, in float32 (only its embedding and lm_head weight are ever used here)."""
    return AutoModelForCausalLM.from_pretrained(assets.local_model_source(path), dtype=torch.float32).eval()


def build_model(
    args: TrainingArguments, base: PreTrainedModel, store: FeatureStore, train_split: Sequence[int]
) -> HydraForCausalLM:
    """Fresh heads on the base, checked against the features' hidden size and vocabulary; a draft vocabulary
    is the most frequent targets of the store's training split (the validation split stays unseen)."""
    d, vocab = base.config.get_text_config().hidden_size, base.get_output_embeddings().weight.shape[0]
    if (store.meta.hidden_size, store.meta.vocab_size) != (d, vocab):
        raise ValueError(
            f"The features in {args.features_dir} come from a model with hidden size {store.meta.hidden_size} and "
            f"vocabulary {store.meta.vocab_size}, but {args.base_model} has {d} and {vocab}: train on features "
            "prepared with this base model."
        )
    draft_ids = None
    if args.vocab_projection in DRAFT_VOCAB_PROJECTIONS:
        if args.draft_vocab_size > vocab:
            raise ValueError(f"draft_vocab_size={args.draft_vocab_size} exceeds the vocabulary ({vocab}).")
        draft_ids = store.most_frequent_targets(args.draft_vocab_size, train_split)
    return HydraForCausalLM.from_base(
        base,
        head_arch=args.head_arch,
        num_heads=args.num_heads,
        draft_token_ids=draft_ids,
        num_layers=args.num_layers,
        dropout=args.dropout,
        vocab_projection=args.vocab_projection,
        tree=args.tree,
    )


def draft_coverage(store: FeatureStore, draft_token_ids: torch.Tensor | None) -> float | None:
    """Share of the features' training targets (assistant tokens) inside the draft vocabulary."""
    if draft_token_ids is None:
        return None
    counts = store.target_token_counts()  # (V,)
    return float(counts[draft_token_ids.cpu()].sum() / counts.sum().clamp(min=1))


def make_accelerator(args: TrainingArguments) -> Accelerator:
    cpu = not torch.cuda.is_available() if args.cpu is None else args.cpu
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)  # buffers (draft ids, shared lm_head) are constant
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=cpu,
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[ddp],
    )


def save_heads(model: HydraForCausalLM, output_dir: Path, dtype: torch.dtype) -> None:
    """Final heads in `dtype` (`from_pretrained` loads them into the base's dtype); the trained heads in
    memory keep their own dtype (a converted copy is saved)."""
    trained = model.heads
    model.heads = copy.deepcopy(trained).to(dtype)
    try:
        model.save_pretrained(output_dir)
    finally:
        model.heads = trained


# --------------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Run:
    """What the loop needs, built once by `_setup`."""

    args: TrainingArguments
    accelerator: Accelerator
    model: HydraForCausalLM
    objective: nn.Module  # HeadsObjective, wrapped by accelerate
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: Progress
    store: FeatureStore  # features_dir: validation, draft vocabulary
    train_data: FeatureCollection  # features_dir's training split, then every extra folder
    embed: nn.Module
    train_indices: list[int]
    val_indices: list[int]
    total: int
    output_dir: Path


def _setup(args: TrainingArguments) -> _Run:
    accelerator = make_accelerator(args)
    output_dir = Path(args.output_dir)
    store = FeatureStore(args.features_dir)
    if int(store.target_token_counts().sum()) == 0:
        raise ValueError(
            f"The features in {args.features_dir} hold no target (assistant) tokens: every answer was cut off by "
            "prepare's --max-length. Prepare again with a larger --max-length."
        )
    train_data = FeatureCollection([store, *(FeatureStore(folder) for folder in args.extra_features_dirs)])
    train_split, val_indices = split_sequences(len(store), args.validation_fraction, args.seed)
    train_indices = train_split + list(range(len(store), len(train_data)))
    set_seed(args.seed)  # identical head initialisation on every process
    base = load_base(args.base_model)
    model = build_model(args, base, store, train_split)
    objective = HeadsObjective(model.heads, store.meta.vocab_size, args).train()
    optimizer = make_optimizer(objective, args)
    total = total_steps(args, len(train_indices), accelerator.num_processes)
    scheduler = make_scheduler(optimizer, args, total)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    progress = Progress()
    accelerator.register_for_checkpointing(scheduler, progress)
    set_seed(args.seed + accelerator.process_index)  # noise and dropout differ across processes
    embed = base.get_input_embeddings().to(accelerator.device)
    return _Run(
        args=args,
        accelerator=accelerator,
        model=model,
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=progress,
        store=store,
        train_data=train_data,
        embed=embed,
        train_indices=train_indices,
        val_indices=val_indices,
        total=total,
        output_dir=output_dir,
    )


def _maybe_resume(run: _Run) -> int | None:
    """Load the newest checkpoint when `resume` asks for one; the step it holds (None: fresh start)."""
    found = checkpoint_dirs(run.output_dir)
    if found and not run.args.resume:
        raise ValueError(
            f"{run.output_dir} holds checkpoints of an earlier run ({found[-1].name}); pass resume=True to continue "
            "it, or choose a new output_dir."
        )
    if not found:
        if run.args.resume:
            logger.warning("resume=True but %s has no checkpoint; starting from scratch", run.output_dir)
        return None
    run.accelerator.load_state(str(found[-1]))
    follow_schedule(run.scheduler, run.args.lr)  # this run's schedule: longer when max_steps / epochs grew
    logger.info("Resumed from %s (step %d of %d)", found[-1], run.progress.step, run.total)
    if run.progress.step >= run.total:
        logger.warning(
            "The run in %s already reached step %d of its %d: nothing to train. To extend it, resume with a larger "
            "--max-steps or --epochs.",
            run.output_dir,
            run.progress.step,
            run.total,
        )
    return run.progress.step


def _write_args(run: _Run) -> None:
    path = run.output_dir / ARGS_FILE
    if path.is_file() and run.args.resume:
        before, now = json.loads(path.read_text()), json.loads(json.dumps(asdict(run.args)))
        changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v and k != "resume"}
        if changed:
            logger.warning("Resuming with changed arguments (before, now): %s", changed)
    path.write_text(json.dumps(asdict(run.args), indent=2))


def _train_step(run: _Run, micro_batches: Iterator[tuple[int, list[int]]]) -> dict:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; its metrics (all processes)."""
    acc, args = run.accelerator, run.args
    head_loss, lm, teacher, counts = [], [], [], torch.zeros(3, args.num_heads)
    tokens, epoch = 0, 0
    for _ in range(args.gradient_accumulation_steps):
        epoch, indices = next(micro_batches)
        batch = collate([run.train_data.sequence(i) for i in indices]).to(acc.device)
        with acc.accumulate(run.objective):
            with torch.no_grad():
                token_embeds = run.embed(batch.input_ids)  # (B, T, d)
            losses = run.objective(batch, token_embeds).losses
            acc.backward(losses.total)
            if acc.sync_gradients and args.max_grad_norm > 0:
                acc.clip_grad_norm_(run.objective.parameters(), args.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad()
        head_loss.append(args.lm_weight * losses.lm.detach() + args.teacher_weight * losses.teacher.detach())
        lm.append(losses.lm.detach())
        teacher.append(losses.teacher.detach())
        counts += torch.stack([losses.lm_count, losses.lm_excluded, losses.teacher_count]).cpu()
        tokens += batch.num_tokens
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this step used
    run.scheduler.step()
    stats = torch.stack([torch.stack(x).mean(0) for x in (head_loss, lm, teacher)]).to(acc.device)  # (3, H)
    stats = acc.reduce(stats, reduction="mean")
    counts, tokens_all = (acc.reduce(x.to(acc.device), reduction="sum") for x in (counts, torch.tensor(tokens)))
    return {
        "head_loss": stats[0].tolist(),
        "lm_loss": stats[1].tolist(),
        "teacher_loss": stats[2].tolist(),
        "lm_coverage": float(counts[0].sum() / (counts[0].sum() + counts[1].sum()).clamp(min=1)),
        "lr": lr,
        "epoch": epoch,
        "tokens": int(tokens_all),
    }


def _validate(run: _Run, metrics: MetricsLog) -> dict:
    if not run.val_indices:
        return {}
    result = evaluate(
        run.accelerator.unwrap_model(run.objective),
        run.store,
        run.val_indices,
        run.embed,
        run.args.batch_size,
        run.accelerator,
    )
    metrics.write({"kind": "eval", "step": run.progress.step, **result})
    top1 = ", ".join(f"{x:.3f}" for x in result["top1"])
    logger.info("step %d validation top-1 per head: %s", run.progress.step, top1)
    return result


def _loop(run: _Run, metrics: MetricsLog, clock: Callable[[], float]) -> tuple[dict, float | None]:
    args, acc, progress = run.args, run.accelerator, run.progress
    timer = SaveTimer(args.save_every_minutes, acc.is_main_process, clock)
    skip = progress.step * args.gradient_accumulation_steps
    stream = micro_batch_stream(
        run.train_indices, args.batch_size, args.seed, acc.num_processes, acc.process_index, skip=skip
    )
    bar = tqdm(
        total=run.total,
        initial=progress.step,
        desc=f"train {args.head_arch}",
        unit="step",
        disable=not acc.is_local_main_process,
    )
    validation, last_loss = {}, None
    while progress.step < run.total:
        start = time.perf_counter()
        record = _train_step(run, stream)
        progress.train_seconds += time.perf_counter() - start
        progress.step += 1
        progress.tokens += record["tokens"]
        last_loss = sum(record["head_loss"])
        metrics.write({"kind": "train", "step": progress.step, **record})
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{progress.tokens / progress.train_seconds:.0f}")
        if args.eval_every and progress.step % args.eval_every == 0 and progress.step < run.total:
            validation = _validate(run, metrics)
        timer.tick()
        if checkpoint_due(acc, progress.step, run.total, args.save_every, timer):
            save_checkpoint(acc, run.output_dir, progress.step, args.keep_checkpoints)
            timer.saved()
    bar.close()
    return validation, last_loss


def train(args: TrainingArguments, clock: Callable[[], float] = time.monotonic) -> TrainingReport:
    """Train draft heads on a feature folder; write the heads and the run's records to `args.output_dir`.

    `clock` (seconds) times `save_every_minutes` on the main process; tests pass their own. Under
    `accelerate launch` it ends the process group when done: one call per launched process."""
    wall_start = time.perf_counter()
    run = _setup(args)
    acc = run.accelerator
    if acc.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    resumed = _maybe_resume(run)
    metrics = MetricsLog(run.output_dir / METRICS_FILE, acc.is_main_process, resumed)
    if acc.is_main_process:
        _write_args(run)
        logger.info("To continue this run if it stops: %s", continue_command(args.output_dir, acc.num_processes))
    try:
        report = _train_to_end(run, metrics, clock, wall_start)
    except BaseException as stop:  # KeyboardInterrupt included: say how to continue, then stop as asked
        if acc.is_main_process:
            _log_stopped(run, stop)
        raise
    acc.wait_for_everyone()
    _end_process_group(acc)
    return report


def continue_command(output_dir: str, num_processes: int) -> str:
    """The one line that continues the run in `output_dir` from its newest checkpoint, with its stored arguments
    (under `accelerate launch` when the run has several processes)."""
    launcher = ["hf-hydra"]
    if num_processes > 1:
        launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(num_processes), "-m", "hf_hydra.cli"]
    return shlex.join([*launcher, "train", "--output-dir", output_dir, "--resume"])


def _train_to_end(run: _Run, metrics: MetricsLog, clock: Callable[[], float], wall_start: float) -> TrainingReport:
    """The loop, the final validation, the report; the main process writes the heads and the records."""
    validation, last_loss = _loop(run, metrics, clock)
    validation = _validate(run, metrics) or validation
    progress = run.progress
    report = TrainingReport(
        output_dir=str(run.output_dir),
        head_arch=run.args.head_arch,
        steps=progress.step,
        tokens=progress.tokens,
        train_seconds=progress.train_seconds,
        wall_seconds=time.perf_counter() - wall_start,
        tokens_per_second=progress.tokens / progress.train_seconds if progress.train_seconds else 0.0,
        num_processes=run.accelerator.num_processes,
        train_sequences=len(run.train_indices),
        validation_sequences=len(run.val_indices),
        draft_vocab_coverage=draft_coverage(run.store, run.model.heads.draft_token_ids),
        final_train_loss=last_loss,
        validation=validation,
    )
    if run.accelerator.is_main_process:
        _finish(run, report)
    return report


def _log_stopped(run: _Run, stop: BaseException) -> None:
    found = checkpoint_dirs(run.output_dir)
    newest = f"its newest checkpoint is {found[-1].name}" if found else "it has no checkpoint yet (it restarts)"
    logger.warning(
        "Training stopped at step %d (%s); %s. To continue: %s",
        run.progress.step,
        type(stop).__name__,
        newest,
        continue_command(run.args.output_dir, run.accelerator.num_processes),
    )


def _end_process_group(acc: Accelerator) -> None:
    """Multi-process runs: destroy the process group while the interpreter is fully alive. gloo's worker threads
    free the last collectives' tensors after those return, and freeing a tensor that Python holds needs the GIL:
    left to interpreter exit that can abort a process (SIGABRT), and right after the last barrier it can deadlock
    with the process group's destructor (which joins the workers holding the GIL). The pause lets them finish."""
    if acc.num_processes > 1:
        time.sleep(GLOO_SETTLE_SECONDS)  # releases the GIL to the worker threads
        acc.end_training()


def _preparation_record(run: _Run, primary: dict) -> dict:
    """The commands that made the feature folders and their CPU seconds in all (where every folder has them)."""
    extra = [read_preparation(folder) or {} for folder in run.args.extra_features_dirs]
    record = {"command": primary.get("command")}
    if extra:
        record["extra_commands"] = [e.get("command") for e in extra]
    seconds = [r.get("cpu_seconds") for r in (primary, *extra)]
    if all(s is not None for s in seconds):
        record["cpu_seconds"] = sum(seconds)
    return record


def _finish(run: _Run, report: TrainingReport) -> None:
    """Main process: heads in `save_dtype`, summary JSON, plot."""
    summary = {**asdict(report), "args": asdict(run.args)}
    (run.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    primary = read_preparation(run.args.features_dir)
    if primary is not None:  # how the features were made: the model card's reproduce section shows it
        (run.output_dir / PREPARATION_FILE).write_text(json.dumps(_preparation_record(run, primary), indent=2))
    save_heads(run.model, run.output_dir, SAVE_DTYPES[run.args.save_dtype])  # also writes the model card
    with contextlib.suppress(ValueError, KeyError):  # an empty or foreign metrics file: no plot, no failure
        plot_metrics(run.output_dir / METRICS_FILE, run.output_dir / PLOT_FILE)
    logger.info(
        "Trained %s heads: %d steps, %d tokens at %.0f tokens/s; saved to %s",
        report.head_arch,
        report.steps,
        report.tokens,
        report.tokens_per_second,
        run.output_dir,
    )
    if checkpoint_dirs(run.output_dir):  # the last step's checkpoint: the run can be extended
        logger.info(
            "To train it further from step %d (a new, longer learning-rate schedule from there): %s --max-steps N "
            "(or --epochs E)",
            report.steps,
            continue_command(run.args.output_dir, report.num_processes),
        )
