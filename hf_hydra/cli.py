"""`hf-hydra` command line: generate (more subcommands arrive with training and benchmarking)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from . import assets
from .dynamic_tree import HeadCalibration
from .head_archs import HEAD_ARCHS, HYDRA_PLUS_PLUS
from .modeling_hydra import HydraForCausalLM
from .prepack import KERNELS, dtype_name, packable_on_cpu, prepack_linear_layers


@dataclass(frozen=True)
class TimedGeneration:
    """One generate call: its new tokens, wall time and (speculative only) tau."""

    new_tokens: torch.Tensor  # (n,)
    seconds: float
    tau: float | None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens.shape[0] / self.seconds


BASE_DTYPES = ("float32", "bfloat16", "float16")
PREPACK_HELP = (
    "CPU, float32: --prepack packs the base's linear layers (the faster of oneDNN's and the panel kernels "
    "here, hf_hydra.prepack), so that verifying a few tokens costs about a stock one-token forward, and the heads' "
    "(bfloat16 where the CPU supports it: cheaper drafting); --no-prepack keeps torch's layers; neither packs the "
    "base only, where it can (as from_pretrained does)"
)


def load_model(
    heads: str | None, arch: str, random_heads: bool, num_heads: int, prepack: bool | None = None
) -> HydraForCausalLM:
    """Saved heads (folder or Hub repo), the shipped `arch` heads of the default base model, or fresh
    untrained heads on it (`random_heads`); packed as `--prepack` / `--no-prepack` / neither say."""
    if random_heads:
        logging.getLogger(__name__).warning(
            "--random-heads: using fresh, untrained %s heads on the default base model (expect tau near 1).", arch
        )
        base = AutoModelForCausalLM.from_pretrained(assets.default_base_model_path())
        model = HydraForCausalLM.from_base(base, head_arch=arch, num_heads=num_heads).eval()
        if prepack is not False and packable_on_cpu(base):
            model.prepack_base()
    else:
        source = heads if heads is not None else assets.pretrained_heads_path(arch)
        model = HydraForCausalLM.from_pretrained(source, prepack=prepack)
    return with_packed_heads(model) if prepack else model


def with_packed_heads(model: HydraForCausalLM) -> HydraForCausalLM:
    """`--prepack` asked for explicitly: the heads packed too, and a clear error where the base cannot be."""
    if model.base_prepack is None:
        model.prepack_base()
    model.prepack_heads()
    return model


def chat_input_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    """The prompt as one user turn in the model's chat template, ready for the answer: (1, L)."""
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


def timed_generate(
    model: PreTrainedModel, input_ids: torch.Tensor, speculative: bool, max_new_tokens: int, streamer=None
) -> TimedGeneration:
    """Greedy generation by `model` (a HydraForCausalLM when `speculative`), timed."""
    start = time.perf_counter()
    out = model.generate(
        input_ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        return_dict_in_generate=True,
        **({"speculative": True} if speculative else {}),
    )
    seconds = time.perf_counter() - start
    speculation = getattr(out, "speculation", None)  # None: plain decoding (no tree pays on this machine)
    tau = speculation.tau if speculation is not None else None
    return TimedGeneration(new_tokens=out.sequences[0, input_ids.shape[1] :], seconds=seconds, tau=tau)


def run_generate(args: argparse.Namespace) -> int:
    model = load_model(args.heads, args.arch, args.random_heads, args.num_heads, args.prepack)
    # --compare measures against plain generate on the stock base
    reference = model.base_lm
    if args.compare and model.base_prepack is not None:
        reference = AutoModelForCausalLM.from_pretrained(model.base_lm.name_or_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model.base_lm.name_or_path)
    input_ids = chat_input_ids(tokenizer, args.prompt)
    torch.manual_seed(0)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    fast = timed_generate(model, input_ids, True, args.max_new_tokens, streamer=streamer)
    tau = f"tau={fast.tau:.2f}" if fast.tau is not None else "decoded plainly"
    print(f"\n[hydra {model.config.head_arch}] {tau}  {fast.new_tokens.shape[0]} tokens  "
          f"{fast.tokens_per_second:.1f} tokens/s")
    if args.compare:
        plain = timed_generate(reference, input_ids, False, args.max_new_tokens)
        identical = torch.equal(plain.new_tokens, fast.new_tokens)
        print(f"[plain generate] {plain.new_tokens.shape[0]} tokens  {plain.tokens_per_second:.1f} tokens/s")
        print(f"speed-up {fast.tokens_per_second / plain.tokens_per_second:.2f}x  identical text: {identical}")
        if not identical:
            return 1
    return 0


def run_distill(args: argparse.Namespace) -> int:
    from .training.data import load_sharegpt, seeded_sample
    from .training.distill import self_distill

    chosen = seeded_sample(load_sharegpt(), args.num_conversations, args.seed, args.skip)
    report = self_distill(
        args.base or assets.default_base_model_path(),
        None,
        chosen,
        args.out,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    print(f"wrote {report.written} answers ({report.already_done} already done), "
          f"{report.generated_tokens_per_second:.1f} generated tokens/s")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from .training.data import load_sharegpt, render, seeded_sample
    from .training.distill import load_distilled
    from .training.features import TokenizedSequence, training_sequences, write_preparation
    from .training.preparation import BaseSource, prepare_features

    if args.data is not None and (args.seed is not None or args.skip is not None):
        raise SystemExit("prepare: --seed and --skip choose ShareGPT conversations; use them with --sharegpt, "
                         "not with --data (a distilled file is prepared whole, or its first --limit).")
    base_path = str(args.base or assets.default_base_model_path())
    source = BaseSource(base_path, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if args.data is not None:
        conversations = load_distilled(args.data)[: args.limit]
    else:  # ShareGPT's own answers: the base reads them, the teacher targets are still its own distribution
        conversations = seeded_sample(load_sharegpt(), args.sharegpt, *sharegpt_order(args))[: args.limit]
    rendered = [render(tokenizer, conversation, max_length=args.max_length) for conversation in conversations]
    sequences = training_sequences([TokenizedSequence(r.input_ids, r.assistant_mask) for r in rendered])
    threads = args.threads_per_worker or max(1, torch.get_num_threads() // args.workers)
    report = prepare_features(
        source if args.workers > 1 else source.load(), sequences, args.out, assets.portable_model_id(base_path),
        teacher_topk=args.teacher_topk, workers=args.workers, threads_per_worker=threads,
    )
    write_preparation(args.out, prepare_command(args), report.cpu_seconds)
    print(f"cached {report.tokens} tokens of {report.sequences} sequences, {report.tokens_per_second:.0f} tokens/s; "
          f"{report.cpu_seconds / 3600:.2f} CPU hours so far; {report.disk.describe()}")
    return 0


def sharegpt_order(args: argparse.Namespace) -> tuple[int, int]:
    """`prepare --sharegpt`'s (seed, skip), 0 where not given."""
    return args.seed or 0, args.skip or 0


def prepare_command(args: argparse.Namespace) -> str:
    """The `hf-hydra prepare` command line equivalent to `args`, every option spelled out."""
    if args.data is not None:
        source = ["--data", args.data]
    else:
        seed, skip = sharegpt_order(args)
        source = ["--sharegpt", str(args.sharegpt), "--seed", str(seed), "--skip", str(skip)]
    words = ["hf-hydra", "prepare", *source, "--out", args.out, "--max-length", str(args.max_length),
             "--teacher-topk", str(args.teacher_topk)]
    if args.limit is not None:
        words += ["--limit", str(args.limit)]
    if args.base is not None:
        words += ["--base", args.base]
    if args.dtype is not None:
        words += ["--dtype", args.dtype]
    return shlex.join(words)


def run_train(args: argparse.Namespace) -> int:
    """A run from the options given; with --resume, the options stored in --output-dir's training_args.json fill
    in the ones not given (`continued_options`)."""
    from .training.arguments import TrainingArguments, continued_options
    from .training.trainer import train

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    given = {name: value for name, value in vars(args).items() if name in names and value is not None}
    options = continued_options(given)
    options.setdefault("base_model", assets.PROVISIONED_BASE_ID)
    report = train(TrainingArguments(**options))
    print(f"trained {report.steps} steps, {report.tokens_per_second:.0f} tokens/s; heads in {args.output_dir}")
    return 0


BENCH_OUT = "bench/bench.json"
BATCH_BENCH_OUT = "bench/batch/bench.json"


def run_bench(args: argparse.Namespace) -> int:
    from . import bench, bench_report, bench_table

    if args.batch_size:
        _check_batch_bench_options(args)
    base_path = args.base or assets.default_base_model_path()
    device = torch.device(args.device)
    base = AutoModelForCausalLM.from_pretrained(base_path).to(device).eval()
    # packed (see PREPACK_HELP): a second copy of the base for every method but the autoregressive reference
    packed = args.prepack if args.prepack is not None else packable_on_cpu(base)
    fast_base = copy.deepcopy(base) if packed else None
    paths = dict(_label_and_path(spec, "--heads") for spec in args.heads)
    if not paths and args.base is None:  # the default model: the shipped heads of every arch
        paths = {arch: str(assets.pretrained_heads_path(arch)) for arch in assets.PRETRAINED_HEAD_ARCHS}
    # every heads set on the same base object: one base in memory (two with --prepack)
    heads_base = fast_base if fast_base is not None else base
    heads = {label: HydraForCausalLM.from_pretrained(p, base_model=heads_base).to(device) for label, p in paths.items()}
    if fast_base is not None:  # after the heads took their shared rows of the base lm_head
        report = prepack_linear_layers(fast_base)
        for model in heads.values():
            model.use_packed_base(report)  # drafting on the same kernel, the trees on the packed base's curve
    if args.prepack:
        for model in heads.values():
            model.prepack_heads()
    if args.tree:
        bench.use_tree(heads, args.tree)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if args.batch_size:
        return _run_batch_bench(args, base, tokenizer, heads, fast_base)
    typical = [label + bench.TYPICAL_SUFFIX for label in heads] if args.temperature is not None else []
    prepacked = [bench.AUTOREGRESSIVE_PREPACKED] if fast_base is not None else []
    peers = [m for m in bench.ALL_METHODS if m not in (bench.AUTOREGRESSIVE, *bench.TREE_METHODS)]
    variants = [label + suffix for label in heads for suffix in bench.VARIANT_SUFFIXES]
    default_methods = [bench.AUTOREGRESSIVE, *prepacked, *peers, *heads, *variants, *typical]
    methods = args.methods.split(",") if args.methods else default_methods
    stock_labels = [m.removesuffix(bench.STOCK_SUFFIX) for m in methods if m.endswith(bench.STOCK_SUFFIX)]
    stock_heads = {label: HydraForCausalLM.from_pretrained(paths[label], base_model=base).to(device)
                   for label in stock_labels if label in paths and fast_base is not None}
    if bench.ASSISTED in methods and not heads:
        methods.remove(bench.ASSISTED)
    questions = bench.spread_over_categories(assets.mt_bench_questions(), args.limit)
    if args.shard:
        index, _, count = args.shard.partition("/")
        if not (index.isdigit() and count.isdigit()):
            raise SystemExit(f"--shard takes I/N, e.g. 0/2; got {args.shard!r}")
        questions = bench.shard(questions, int(index), int(count))
    report = bench.run_bench(
        base, tokenizer, heads, questions, methods, args.max_new_tokens, args.turn, args.temperature, args.seed,
        prepacked_base=fast_base, stock_heads=stock_heads,
    )
    written = bench_report.write_report(report, args.out or BENCH_OUT)
    print(bench_table.markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def batch_sizes(text: str) -> list[int]:
    """`--batch-size 1,2,4,8`: distinct positive batch sizes, in the order given."""
    words = text.split(",")
    if not all(word.strip().isdigit() and int(word) > 0 for word in words):
        raise argparse.ArgumentTypeError(f"--batch-size takes positive integers separated by commas; got {text!r}")
    sizes = [int(word) for word in words]
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"--batch-size lists a size twice: {text!r}")
    return sizes


def _check_batch_bench_options(args: argparse.Namespace) -> None:
    """Refuse, before any model loads, the per-prompt benchmark's options the batch benchmark has no use for."""
    unused = [flag for flag, value in (("--temperature", args.temperature), ("--shard", args.shard)) if value]
    if unused:
        raise SystemExit(f"bench --batch-size is greedy, in one process: drop {', '.join(unused)}.")


def _run_batch_bench(
    args: argparse.Namespace,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    heads: dict[str, HydraForCausalLM],
    fast_base: PreTrainedModel | None,
) -> int:
    """`bench --batch-size`: plain batched generate against each heads set's, per batch size (`bench_batch`)."""
    from . import bench, bench_batch

    questions = bench.spread_over_categories(assets.mt_bench_questions(), args.limit)
    methods = args.methods.split(",") if args.methods else None
    report = bench_batch.run_batch_bench(
        base, tokenizer, heads, questions, args.batch_size, methods, args.max_new_tokens, args.turn,
        prepacked_base=fast_base,
    )
    written = bench_batch.write_batch_report(report, args.out or BATCH_BENCH_OUT)
    print(bench_batch.markdown_batch_table(report))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run_bench_merge(args: argparse.Namespace) -> int:
    import json

    from . import bench_report, bench_table

    report = bench_report.merge_reports([json.loads(Path(path).read_text()) for path in args.reports])
    written = bench_report.write_report(report, args.out)
    print(bench_table.markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run_ablation(args: argparse.Namespace) -> int:
    import json

    from .training.ablation import ablation_rows, markdown_ablation

    runs = dict(_label_and_path(spec, "--run") for spec in args.run)
    report = json.loads(Path(args.bench).read_text())
    table = markdown_ablation(ablation_rows(runs, report), report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    print(table + f"wrote {args.out}")
    return 0


def _label_and_path(spec: str, option: str) -> tuple[str, str]:
    label, sep, path = spec.partition("=")
    if not sep or not label or "," in label:
        raise SystemExit(f"{option} takes LABEL=PATH (e.g. hydra++=heads/); got {spec!r}")
    return label, path


def run_tune_tree(args: argparse.Namespace) -> int:
    import json

    from . import hub, model_card
    from .roofline import machine_identity
    from .tree_tuning import stored_rank_accuracy, tune_tree

    # latencies measured on the kernels decoding will run (the drafts too, with --prepack)
    model = HydraForCausalLM.from_pretrained(args.heads, prepack=args.prepack)
    model = with_packed_heads(model) if args.prepack else model
    digest = hub.heads_digest(args.heads)
    stored = None if args.features else stored_rank_accuracy(args.heads, model.config.num_heads)
    calibration = None
    if stored is None:
        (accuracy, calibration), accuracy_command = _held_out_accuracy(model, args), None
    else:  # the heads' accuracy from their earlier tuning: only this machine is measured
        accuracy, accuracy_command = stored.rank_accuracy, stored.command
    report = tune_tree(model, accuracy, max_tokens=args.max_tokens)
    paths = [list(p) for p in report.choice.paths]
    model.set_tree(paths, dynamic_default=True)  # the static tree; by default, the dynamic tree on the measured curve
    command = _tune_tree_command(args)
    record = {
        "command": command,
        "accuracy_command": accuracy_command or command,  # the run that measured rank_accuracy on features
        "heads_sha256": digest,
        "prepacked": model.base_prepack is not None,
        "machine": machine_identity(model.base_prepack.kernel if model.base_prepack is not None else "stock"),
        "heads_prepacked": dtype_name(model.heads.prepacked_dtype),
        **dataclasses.asdict(report),
    }
    previous = Path(args.heads) / hub.TREE_TUNING_NAME
    if calibration is not None:
        record |= {"calibration": calibration.to_record(), "calibration_command": command}
    elif previous.is_file():  # the heads' calibration (`hf-hydra calibrate`) stays theirs
        kept = json.loads(previous.read_text())
        record |= {key: kept[key] for key in ("calibration", "calibration_command") if key in kept}
    previous.write_text(json.dumps(record, indent=1))
    model.config.save_pretrained(args.heads)  # the weights stay as they were saved (dtype included)
    model.generation_config.save_pretrained(args.heads)
    model_card.write_model_card(args.heads)  # the card shows the tuning's prediction
    print(f"static tree of {len(paths)} nodes: expected tau {report.choice.expected_tau:.2f}, "
          f"expected {report.choice.expected_tokens_per_second:.1f} tokens/s; the default of {args.heads} is now "
          "the dynamic tree on this machine's verification curve")
    return 0


def _held_out_accuracy(
    model: HydraForCausalLM, args: argparse.Namespace
) -> tuple[list[list[float]], HeadCalibration]:
    """The heads' rank accuracy and calibration on the held-out split of --features."""
    from .training.batching import split_sequences
    from .training.features import FeatureStore
    from .tree_tuning import measure_heads

    store = FeatureStore(args.features)
    _, held_out = split_sequences(len(store), args.validation_fraction, args.seed)
    measured = measure_heads(model, store, held_out[: args.max_sequences])
    return measured.rank_accuracy, measured.calibration


def run_profile(args: argparse.Namespace) -> int:
    import json

    from .roofline import measure_roofline, roofline_table

    base_path = args.base or assets.default_base_model_path()
    stock = AutoModelForCausalLM.from_pretrained(base_path).eval()
    packed = copy.deepcopy(stock)
    report = prepack_linear_layers(packed, kernel=args.kernel)
    bases = {report.kernel: packed, "stock": stock}
    reports = measure_roofline(bases, max_tokens=args.max_tokens, repeats=args.repeats)
    first = reports[0]
    print(f"{first.cpu.model} ({' '.join(first.cpu.flags)}), {first.threads} thread(s)")
    print(f"weights {first.weight_bytes / 1e6:.0f} MB, bandwidth {first.bandwidth_bytes_per_second / 1e9:.1f} GB/s "
          f"(limit {first.limit_seconds[0] * 1e3:.1f} ms per forward), peak {first.peak_flops_per_second / 1e9:.1f} "
          "GFLOP/s")
    print(roofline_table(reports))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps([r.to_record() for r in reports], indent=1))
        print(f"wrote {args.out}")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    import json

    from . import hub
    from .training.features import FeatureStore
    from .tree_tuning import measure_calibration

    model = HydraForCausalLM.from_pretrained(args.heads).eval()
    store = FeatureStore(args.features)
    calibration = measure_calibration(model, store, range(min(len(store), args.max_sequences)))
    path = Path(args.heads) / hub.TREE_TUNING_NAME
    record = json.loads(path.read_text()) if path.is_file() else {}
    record["calibration"] = calibration.to_record()
    record["calibration_command"] = shlex.join(
        ["hf-hydra", "calibrate", "--heads", "heads/", "--features", args.features, "--max-sequences",
         str(args.max_sequences)]
    )
    path.write_text(json.dumps(record, indent=1))
    for head, rates in enumerate(calibration.rates):
        pairs = ", ".join(f"{edge:g}: {rate:.2f}" for edge, rate in zip(calibration.edges, rates, strict=False))
        print(f"head {head}: accepted share by probability bin (from) {pairs}")
    print(f"calibration stored in {path}; tree=\"dynamic\" uses it")
    return 0


def _tune_tree_command(args: argparse.Namespace) -> str:
    features = ["--features", args.features, "--validation-fraction", str(args.validation_fraction),
                "--seed", str(args.seed), "--max-sequences", str(args.max_sequences)] if args.features else []
    return shlex.join(["hf-hydra", "tune-tree", "--heads", "heads/", *features, "--max-tokens", str(args.max_tokens),
                       *({True: ["--prepack"], False: ["--no-prepack"]}.get(args.prepack, []))])


def run_push(args: argparse.Namespace) -> int:
    from . import model_card

    commit = model_card.push_folder(
        args.folder, args.repo, token=args.token, private=args.private or None, revision=args.revision,
        commit_message=args.message, benchmark=args.benchmark,
    )
    print(f"pushed the heads in {args.folder} with their model card: {commit.commit_url}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from . import hub

    base = AutoModelForCausalLM.from_pretrained(args.base) if args.base else None
    model = HydraForCausalLM.from_pretrained(args.source, base_model=base)
    if model.config.base_tokenizer_fingerprint is None:  # not in the cache yet: an artifact should record it
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                args.base or assets.local_model_source(model.config.base_model_name_or_path)
            )
            model.config.base_tokenizer_fingerprint = hub.tokenizer_fingerprint(tokenizer)
        except (OSError, ValueError) as error:
            logging.getLogger(__name__).warning("No tokenizer for the base (%s): fingerprint not recorded.", error)
    model.save_pretrained(args.out)
    print(f"converted {model.config.reference_checkpoint['format']} checkpoint {args.source} to {args.out} "
          f"({model.config.num_heads} {model.config.head_arch} heads on {model.config.base_model_name_or_path})")
    return 0


_TRAINING_HELP = {
    "features_dir": "folder written by `hf-hydra prepare` (not needed with --resume: the run's stored one)",
    "output_dir": "folder for the heads, records and checkpoints; with --resume, the run to continue",
    "resume": "continue the run in --output-dir from its newest checkpoint, with the arguments stored in its "
    "training_args.json; options given here override them: a larger --max-steps or --epochs extends a finished "
    "run, and the learning-rate schedule is then the new, longer one from the step reached",
    "save_every_minutes": "also checkpoint when this much wall time has passed since the last checkpoint "
    "(0: only by --save-every); default 10",
}


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """One --option per TrainingArguments field, typed from its default. Only --output-dir is required here:
    --resume takes the rest from the run's training_args.json (`run_train` checks what is missing)."""
    from .training.arguments import TrainingArguments

    for field in dataclasses.fields(TrainingArguments):
        flag = "--" + field.name.replace("_", "-")
        described = _TRAINING_HELP.get(field.name)
        if isinstance(field.default, tuple):  # repeatable: --extra-features-dir A --extra-features-dir B
            parser.add_argument(flag.removesuffix("s"), dest=field.name, action="append", default=None)
        elif isinstance(field.default, bool) or field.name == "cpu":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=described)
        elif isinstance(field.default, int | float):
            parser.add_argument(
                flag, type=type(field.default), default=None, help=described or f"default {field.default}"
            )
        else:
            parser.add_argument(flag, required=field.name == "output_dir", default=None, help=described)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-hydra", description="Hydra speculative decoding for HF causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer one prompt with speculative decoding, streaming the text")
    gen.add_argument("prompt", help="the user message (the model's chat template is applied)")
    gen.add_argument("--heads", help="folder or Hub repo of saved heads (default: the shipped heads of --arch)")
    gen.add_argument("--arch", choices=HEAD_ARCHS, default=HYDRA_PLUS_PLUS.name, help="shipped (or fresh) heads to use")
    gen.add_argument("--random-heads", action="store_true", help="fresh untrained heads instead of shipped ones")
    gen.add_argument("--num-heads", type=int, default=4, help="number of fresh heads (with --random-heads)")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--compare", action="store_true", help="also run plain generate; print speed-up and equality")
    gen.add_argument("--prepack", action=argparse.BooleanOptionalAction, help=PREPACK_HELP)
    gen.set_defaults(func=run_generate)

    distill = commands.add_parser("distill", help="answer ShareGPT first turns with the base model (resumable)")
    distill.add_argument("--out", required=True, help="JSONL file to append to (a rerun resumes)")
    distill.add_argument("--num-conversations", type=int, default=2000, help="seeded sample of ShareGPT")
    distill.add_argument("--max-new-tokens", type=int, default=256)
    distill.add_argument("--batch-size", type=int, default=16)
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--skip", type=int, default=0, help="start after this many of the seeded order (more data)")
    distill.add_argument("--base", help="base model folder or Hub id (default: SmolLM2-135M-Instruct)")
    distill.set_defaults(func=run_distill)

    prepare = commands.add_parser("prepare", help="cache the base model's hidden states and teacher top-k")
    source = prepare.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="JSONL conversations written by `hf-hydra distill`")
    source.add_argument(
        "--sharegpt", type=int, metavar="N", help="N ShareGPT conversations with their own answers (seeded sample)"
    )
    prepare.add_argument("--seed", type=int, help="with --sharegpt: the seeded order, as in distill (default 0)")
    prepare.add_argument("--skip", type=int, help="with --sharegpt: start after this many of the order (default 0)")
    prepare.add_argument("--out", required=True, help="feature folder (a rerun resumes)")
    prepare.add_argument("--max-length", type=int, default=512)
    prepare.add_argument("--teacher-topk", type=int, default=32)
    prepare.add_argument("--limit", type=int, help="use only the first N conversations")
    prepare.add_argument("--base", help="base model folder or Hub id (default: SmolLM2-135M-Instruct)")
    prepare.add_argument("--dtype", choices=BASE_DTYPES,
                         help="the base's dtype while it computes the features (default: the checkpoint's own)")
    prepare.add_argument("--workers", type=int, default=1,
                         help="processes computing features side by side, each loading the base (default 1)")
    prepare.add_argument("--threads-per-worker", type=int,
                         help="torch threads of each worker when --workers > 1 (default: this process's / workers)")
    prepare.set_defaults(func=run_prepare)

    train = commands.add_parser("train", help="train heads on a feature folder (runs under accelerate launch too)")
    _add_training_options(train)
    train.set_defaults(func=run_train)

    bench_parser = commands.add_parser("bench", help="MT-Bench: tau, tokens/s, speed-up of each method vs greedy")
    bench_parser.add_argument(
        "--heads", action="append", default=[],
        help="LABEL=PATH, e.g. hydra++=heads/: tree decoding with these heads is the method LABEL "
        "(default on the default model: the shipped heads of every arch, labelled by arch)",
    )
    bench_parser.add_argument("--methods", help="comma-separated subset of the methods (default: all available)")
    bench_parser.add_argument("--limit", type=int, help="N questions only, spread over the 8 categories")
    bench_parser.add_argument("--max-new-tokens", type=int, default=256)
    bench_parser.add_argument("--turn", type=int, default=1, choices=(1, 2))
    bench_parser.add_argument(
        "--temperature", type=float,
        help="sample at this temperature (tree methods: lossless, and typical as LABEL-typical); default greedy",
    )
    bench_parser.add_argument("--seed", type=int, default=0, help="with --temperature: seed + question id per run")
    bench_parser.add_argument(
        "--shard", help="I/N: only questions I, I+N, ... (run N processes side by side, then `hf-hydra bench-merge`)"
    )
    bench_parser.add_argument("--device", default="cpu")
    bench_parser.add_argument(
        "--tree", help="one tree for every heads set instead of each set's default (a name such as cpu_small_11)"
    )
    bench_parser.add_argument(
        "--prepack", action=argparse.BooleanOptionalAction,
        help=PREPACK_HELP + "; every method but the autoregressive reference runs on the packed base, plus "
        "autoregressive_prepacked",
    )
    bench_parser.add_argument("--base", help="base model folder (default: SmolLM2-135M-Instruct)")
    bench_parser.add_argument(
        "--batch-size", type=batch_sizes, metavar="B[,B...]",
        help="batch benchmark instead: total tokens/s of each heads set's generate(speculative=True) against plain "
        "batched generate on left-padded batches of B prompts, per B (e.g. 1,2,4,8; greedy, one process); methods: "
        "autoregressive, autoregressive_prepacked and the heads labels",
    )
    bench_parser.add_argument(
        "--out", help=f"JSON path; .md and PNGs go beside it (default {BENCH_OUT}, with --batch-size {BATCH_BENCH_OUT})"
    )
    bench_parser.set_defaults(func=run_bench)

    merge = commands.add_parser("bench-merge", help="one report (JSON, table, plots) from `bench --shard` reports")
    merge.add_argument("reports", nargs="+", help="the JSON of every shard")
    merge.add_argument("--out", default="bench/bench.json", help="JSON path; .md and PNGs go beside it")
    merge.set_defaults(func=run_bench_merge)

    ablation = commands.add_parser("ablation", help="table of trained heads: validation top-1, tau, speed-up")
    ablation.add_argument("--run", action="append", required=True, help="LABEL=FOLDER of `hf-hydra train` output")
    ablation.add_argument("--bench", required=True, help="`hf-hydra bench` JSON with the same heads as --heads LABEL")
    ablation.add_argument("--out", default="bench/ablation.md", help="Markdown file to write")
    ablation.set_defaults(func=run_ablation)

    tune = commands.add_parser("tune-tree", help="measure heads and machine; store the fastest tree with the heads")
    tune.add_argument("--heads", required=True, help="folder of trained heads (the tree is written into it)")
    tune.add_argument(
        "--features",
        help="feature folder the heads were trained on: their accuracy is measured on its held-out split; without "
        "it, the accuracy stored by an earlier tuning (the folder's tree_tuning.json) is reused and only this "
        "machine is measured",
    )
    tune.add_argument("--validation-fraction", type=float, default=0.05, help="with --features, as in training")
    tune.add_argument("--seed", type=int, default=0, help="with --features, as in training: the held-out split")
    tune.add_argument("--max-sequences", type=int, default=200, help="with --features: held-out sequences measured")
    tune.add_argument("--max-tokens", type=int, default=32, help="largest tree (+ root) whose latency is measured")
    tune.add_argument(
        "--prepack", action=argparse.BooleanOptionalAction, help=PREPACK_HELP + " (latencies measured with them)"
    )
    tune.set_defaults(func=run_tune_tree)

    calibrate = commands.add_parser(
        "calibrate", help="measure how often the heads' candidates are accepted at each probability (dynamic trees)"
    )
    calibrate.add_argument("--heads", required=True, help="folder of trained heads (tree_tuning.json gains it)")
    calibrate.add_argument(
        "--features", required=True, help="feature folder of text the heads did not train on (`hf-hydra prepare`)"
    )
    calibrate.add_argument("--max-sequences", type=int, default=200, help="sequences of --features measured")
    calibrate.set_defaults(func=run_calibrate)

    profile = commands.add_parser(
        "profile", help="roofline: forward latency over n tokens against this machine's memory and arithmetic limits"
    )
    profile.add_argument("--base", help="base model folder (default: SmolLM2-135M-Instruct)")
    profile.add_argument("--kernel", choices=KERNELS, default="auto", help="the packed kernel measured beside stock")
    profile.add_argument("--max-tokens", type=int, default=32, help="largest n measured")
    profile.add_argument("--repeats", type=int, default=7, help="rounds (after one warm-up) of the median")
    profile.add_argument("--out", help="JSON file for the reports")
    profile.set_defaults(func=run_profile)

    push = commands.add_parser("push", help="upload saved heads (heads only) with their model card to the Hub")
    push.add_argument("folder", help="folder written by save_pretrained / `hf-hydra train` / `hf-hydra convert`")
    push.add_argument("--repo", required=True, help="Hub repo id, org/name (created when missing)")
    push.add_argument("--benchmark", help="`hf-hydra bench` JSON: its tau / speed-up table goes into the card")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (default: main)")
    push.add_argument("--message", help="commit message")
    push.set_defaults(func=run_push)

    convert = commands.add_parser("convert", help="save published Hydra / Medusa heads in hf_hydra's format")
    convert.add_argument("source", help="folder or Hub repo of a reference checkpoint (e.g. a hydra-vicuna repo)")
    convert.add_argument("out", help="folder to write the converted heads to")
    convert.add_argument("--base", help="base model folder or Hub id (default: the one the checkpoint names)")
    convert.set_defaults(func=run_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
