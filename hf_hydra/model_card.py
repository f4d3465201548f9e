"""The model card (README.md) of a saved artifact, and pushing the artifact with its card to the Hub.

A card states what the heads are, how they were trained and how fast they decode. It is generated from the files
beside the heads (config.json, generation_config.json, training_args.json / training_summary.json, the feature
preparation record, tree_tuning.json, benchmark.json) into the template model_cards/hydra_heads.md, so that it
cannot disagree with them and no number in it is typed by hand. A benchmark report is reduced to its summary
(`benchmark_summary`) before it goes beside the heads: the card needs the per-method table, not the per-prompt
results.

`push_folder` is here, not in hub.py, because a push renders the card for the target repo id and uploads the
benchmark summary the card shows; so this module imports the file names from hub.py and hub.py imports nothing
from here.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shlex
import string
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCardData
from safetensors import safe_open

from .assets import describe_base, hub_model_family
from .bench_table import check_per_prompt_report, markdown_table
from .head_archs import DEFAULT_HEAD_ARCH, HEAD_ARCH_REGISTRY
from .hub import (
    BENCHMARK_NAME,
    CARD_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    TRAINING_ARGS_NAME,
    TRAINING_SUMMARY_NAME,
    TREE_TUNING_NAME,
    WEIGHTS_NAME,
)
from .training.features import PREPARATION_FILE  # copied by `hf-hydra train` from the feature folder
from .tree import DYNAMIC_TREE, resolve_tree, static_default

CARD_TEMPLATE = importlib.resources.files("hf_hydra.model_cards") / "hydra_heads.md"  # model_cards/ in the repo
# Training arguments that say where files were or how the run was operated, not how the heads were trained.
_UNSHOWN_TRAINING_ARGS = {"features_dir", "output_dir", "base_model", "eval_every", "save_every", "save_every_minutes",
                          "keep_checkpoints", "resume", "cpu", "extra_features_dirs"}


def render_model_card(
    folder: str | os.PathLike, repo_id: str | None = None, benchmark: str | os.PathLike | None = None,
    tags: list[str] | None = None,
) -> str:
    """The README.md of the artifact in `folder`: YAML metadata, usage, the heads, the training recipe (from
    training_args.json / training_summary.json when present) and the measured speed (from `benchmark`, or the
    folder's benchmark.json)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    generation = _read_json(folder / GENERATION_CONFIG_NAME) or {}
    report = _read_json(Path(benchmark)) if benchmark is not None else _read_json(folder / BENCHMARK_NAME)
    base_id = _hub_model_id(hub_model_family(config.get("base_model_name_or_path")))
    arch = config.get("head_arch", DEFAULT_HEAD_ARCH)
    metadata = ModelCardData(
        base_model=base_id,
        library_name="hf_hydra",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(["speculative-decoding", "hf_hydra", _arch_tag(arch), *(tags or [])])),
    )
    repo = repo_id or folder.resolve().name
    base = config.get("base_model_name_or_path")
    base_text = describe_base(base) if base else "its base"
    values = {
        "metadata": metadata.to_yaml(),
        "title": repo.split("/")[-1],
        "summary": f"{config.get('num_heads')} {_arch_name(arch)} draft heads for {base_text}.",
        "repo_id": repo,
        "heads_table": _heads_table(config, generation, folder / WEIGHTS_NAME),
        "training": _training_section(config, folder),
        "benchmark": _benchmark_section(report, arch),
    }
    if not CARD_TEMPLATE.is_file():
        raise FileNotFoundError(f"The model card template {CARD_TEMPLATE} is missing from this installation.")
    return string.Template(CARD_TEMPLATE.read_text()).substitute(values)


def write_model_card(
    folder: str | os.PathLike, repo_id: str | None = None, benchmark: str | os.PathLike | None = None
) -> Path:
    """Write README.md into the artifact folder; a given benchmark JSON's summary (`benchmark_summary`) is
    written beside it as benchmark.json."""
    folder = Path(folder)
    if benchmark is not None:
        report = _read_json(Path(benchmark))
        _check_benchmark(report, Path(benchmark))
        (folder / BENCHMARK_NAME).write_text(json.dumps(benchmark_summary(report), indent=1))
    path = folder / CARD_NAME
    path.write_text(render_model_card(folder, repo_id))
    return path


def _arch_name(arch: str) -> str:
    """How the card writes a head architecture (an unknown one as its name)."""
    return HEAD_ARCH_REGISTRY[arch].display_name if arch in HEAD_ARCH_REGISTRY else arch


def _arch_tag(arch: str) -> str:
    """The card's Hub tag of a head architecture (an unknown one as its name)."""
    return HEAD_ARCH_REGISTRY[arch].hub_tag if arch in HEAD_ARCH_REGISTRY else arch


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _hub_model_id(name: str | None) -> str | None:
    """`name` when it looks like a Hub model id (not a local folder), for the card's `base_model`."""
    if not name or os.path.isdir(name) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name):
        return None
    return name


def _heads_table(config: dict, generation: dict, weights: Path) -> str:
    default = generation.get("hydra_tree")
    tree = static_default(default, [list(p) for p in resolve_tree(config.get("tree"), config["num_heads"])])
    tree_text = f"{len(tree)} nodes, depth {max(map(len, tree), default=0)}"
    if default == DYNAMIC_TREE:
        tree_text = f"dynamic (per step: calibrated acceptance, measured verification cost); static: {tree_text}"
    rows = [
        ("architecture", f"{_arch_name(config['head_arch'])} (`{config['head_arch']}`)"),
        ("heads", f"{config['num_heads']} (head i drafts the token i + 2 positions ahead)"),
        ("residual blocks per head", str(config["num_layers"])),
        ("vocabulary projection", _projection_text(config)),
        ("base model", describe_base(base) if (base := config.get("base_model_name_or_path")) else "not recorded"),
        ("base revision", _code_or(config.get("base_model_revision"), "not recorded")),
        ("base tokenizer fingerprint", _code_or(config.get("base_tokenizer_fingerprint"), "not recorded")),
        ("hidden size / vocabulary", f"{config.get('base_hidden_size')} / {config.get('base_vocab_size')}"),
        ("parameters (heads only)", f"{_count_parameters(weights):,}" if weights.is_file() else "-"),
        ("default tree", f"{tree_text} (`generation_config.hydra_tree`)"),
        ("acceptance", f"`{generation.get('hydra_acceptance', config.get('acceptance', 'greedy'))}`"),
    ]
    tuning = _read_json(weights.parent / TREE_TUNING_NAME)
    if tuning and "choice" in tuning:  # written by tune-tree (`hf-hydra calibrate` alone writes no choice)
        choice, one_token = tuning["choice"], tuning["verify_seconds"][0]
        kernels = _tuning_kernels_text(tuning)
        rows.append((
            "tree tuning (predicted)",
            f"`hf-hydra tune-tree` chose the static tree: expected tau {choice['expected_tau']:.2f}, expected speed-up "
            f"{choice['expected_tokens_per_second'] * one_token:.2f}x over one-token decoding forwards{kernels}",
        ))
    reference = config.get("reference_checkpoint")
    if reference:
        rows.append(("converted from", f"`{reference['source']}` ({reference['format']})"))
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


def _code_or(value: str | None, missing: str) -> str:
    return f"`{value}`" if value else missing


def _projection_text(config: dict) -> str:
    projection = config.get("vocab_projection", "per_head")
    if projection == "draft_vocab":
        return f"own projection onto a draft vocabulary of the {config.get('draft_vocab_size')} most frequent tokens"
    if projection == "shared_draft_vocab":
        return (
            f"the base model's own lm_head rows of the {config.get('draft_vocab_size')} most frequent tokens "
            "(shared, frozen)"
        )
    if projection == "shared":
        return "the base model's own lm_head (shared, frozen)"
    return "own projection onto the whole vocabulary"


def _tuning_kernels_text(tuning: dict) -> str:
    if not tuning.get("prepacked"):
        return ""
    heads = tuning.get("heads_prepacked")
    if heads:
        return f", both on the base prepacked for CPU and the heads in {heads} (`--prepack`)"
    return ", both on the base prepacked for CPU (`model.prepack_base()`)"


def _count_parameters(weights: Path) -> int:
    with safe_open(str(weights), framework="pt") as f:
        return sum(_numel(f.get_slice(key).get_shape()) for key in f.keys() if not key.endswith("draft_token_ids"))


def _numel(shape: list[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _training_section(config: dict, folder: Path) -> str:
    args = _read_json(folder / TRAINING_ARGS_NAME)
    summary = _read_json(folder / TRAINING_SUMMARY_NAME)
    if args is None and summary is not None:
        args = summary.get("args")
    if args is None:
        if config.get("reference_checkpoint"):
            reference = config["reference_checkpoint"]
            return (f"Trained by the authors of the reference code and converted from `{reference['source']}` "
                    f"({reference['format']}); see their repository for the recipe.")
        return "Not recorded with these heads."
    lines = ["Frozen base; only the heads trained (`hf-hydra train`).", "", "| argument | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in args.items() if k not in _UNSHOWN_TRAINING_ARGS]
    if summary is not None:
        lines += ["", f"{summary.get('steps')} optimizer steps over {summary.get('tokens'):,} tokens "
                  f"({summary.get('num_processes')} process(es)), {summary.get('train_seconds', 0) / 60:.0f} min "
                  f"of training at {summary.get('tokens_per_second', 0):,.0f} tokens/s."]
        top1 = (summary.get("validation") or {}).get("top1")
        if top1:
            lines += ["", "Validation top-1 accuracy per head: " + ", ".join(f"{x:.3f}" for x in top1) + "."]
    recorded = _read_json(folder / PREPARATION_FILE) or {}
    preparation, extra = recorded.get("command"), [c for c in recorded.get("extra_commands", []) if c]
    if recorded.get("cpu_seconds") is not None:
        hours = recorded["cpu_seconds"] / 3600
        lines += ["", f"Preparing the features took {hours:.2f} CPU hours (`hf-hydra prepare`, all its threads)."]
    lines += ["", "To reproduce:", "", "```bash"]
    lines += [preparation, *extra] if preparation else ["# features: `hf-hydra prepare ... --out features/`"]
    num_processes = (summary or {}).get("num_processes") or 1
    lines += [_train_command(args, _prepared_folder(preparation), [_prepared_folder(c) for c in extra], num_processes)]
    tuning = _read_json(folder / TREE_TUNING_NAME) or {}
    tuning_command = tuning.get("accuracy_command") or tuning.get("command")  # the run on features, not a re-tuning
    commands = dict.fromkeys(c for c in (tuning_command, tuning.get("calibration_command")) if c)  # once each
    lines += [*commands, "```"]
    return "\n".join(lines)


def _prepared_folder(preparation: str | None) -> str:
    words = shlex.split(preparation) if preparation else []
    return words[words.index("--out") + 1] if "--out" in words[:-1] else "features/"


def _train_command(args: dict, features_dir: str, extra_features_dirs: list[str], num_processes: int = 1) -> str:
    """`hf-hydra train` with the recorded arguments (local paths replaced, operational options left out), under
    `accelerate launch` when the run had several processes: the batch size is per process."""
    launcher = ["hf-hydra"] if num_processes == 1 else [
        "accelerate", "launch", "--multi_gpu", "--num_processes", str(num_processes), "-m", "hf_hydra.cli"]
    words = [*launcher, "train", "--features-dir", features_dir, "--output-dir", "heads/"]
    for extra in extra_features_dirs:
        words += ["--extra-features-dir", extra]
    if _hub_model_id(args.get("base_model")):
        words += ["--base-model", args["base_model"]]
    for name, value in args.items():
        if name in _UNSHOWN_TRAINING_ARGS or value is None or isinstance(value, list | dict):
            continue
        flag = "--" + name.replace("_", "-")
        words += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return shlex.join(words)


_BENCHMARK_SUMMARY_KEYS = ("method", "tau", "tokens_per_second", "speedup_median", "speedup_total", "mismatches")


def benchmark_summary(report: dict) -> dict:
    """What a card needs of an `hf-hydra bench` report (settings, machine, per-method summary), without the
    per-prompt results: the heads carry a few kilobytes, the full report stays where the bench wrote it."""
    return {key: value for key, value in report.items() if key != "results"}


def _check_benchmark(report: Any, path: Path) -> None:
    if isinstance(report, dict):
        check_per_prompt_report(report, path)
    if not isinstance(report, dict) or not {"settings", "machine", "summary"} <= report.keys():
        raise ValueError(f"{path} is not a benchmark report of `hf-hydra bench` (needs settings, machine, summary).")
    for row in report["summary"]:
        missing = [k for k in _BENCHMARK_SUMMARY_KEYS if k not in row]
        if missing:
            raise ValueError(f"{path}: a summary row lacks {missing}; regenerate it with `hf-hydra bench`.")


def _benchmark_section(report: Any, arch: str) -> str:
    """The tau / speed-up table, generated from the benchmark JSON (never typed by hand)."""
    if report is None:
        return "Not measured yet: run `hf-hydra bench` and push again with `--benchmark bench.json`."
    _check_benchmark(report, Path(BENCHMARK_NAME))
    return (
        markdown_table(report)
        + "\ntau = tokens appended per base forward, bonus token included; speed-up against plain greedy "
        f"`generate` on the same prompts. These heads are the `{arch}` rows: `{arch}` ran the tree the report's "
        f"settings name (`trees`; `dynamic` or rank paths) merged with context candidates, `{arch}-static` their "
        f"static tree merged with them, `{arch}-heads` their static tree alone (where measured).\n"
    )


# ==================================================================================================
# Pushing


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    benchmark: str | os.PathLike | None = None,
    tags: list[str] | None = None,
) -> CommitInfo:
    """Upload a saved artifact (heads only) to the Hub repo `repo_id` (created when missing) in one commit.

    Only the artifact's files are uploaded (config, generation config, weights, tree_tuning.json: what lets
    `hf-hydra tune-tree` re-tune the tree on another machine without the features, benchmark.json), with a card
    rendered for `repo_id`; anything else in the folder (training checkpoints, metrics, ...) stays local. A
    benchmark.json left in the repo by an earlier push is deleted when this push has none (it measured other
    heads). The folder itself is not modified.
    """
    folder = Path(folder)
    config = _read_json(folder / CONFIG_NAME)
    if not isinstance(config, dict) or config.get("model_type") != "hydra" or not (folder / WEIGHTS_NAME).is_file():
        raise ValueError(
            f"{folder} is not saved hydra heads (it needs config.json with model_type 'hydra' and model.safetensors): "
            "save them with HydraForCausalLM.save_pretrained or convert a reference checkpoint with `hf-hydra convert`."
        )
    if benchmark is not None:
        _check_benchmark(_read_json(Path(benchmark)), Path(benchmark))
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:  # pushing to a new branch creates it (from main)
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    card = render_model_card(folder, repo_id, benchmark, tags)
    operations = [CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode())]
    for name in (CONFIG_NAME, GENERATION_CONFIG_NAME, WEIGHTS_NAME, TREE_TUNING_NAME):
        if (folder / name).is_file():
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)))
    report = Path(benchmark) if benchmark is not None else folder / BENCHMARK_NAME
    if report.is_file():
        summary = json.dumps(benchmark_summary(_read_json(report)), indent=1).encode()
        operations.append(CommitOperationAdd(path_in_repo=BENCHMARK_NAME, path_or_fileobj=summary))
    elif api.file_exists(repo_id, BENCHMARK_NAME, revision=revision):  # measured other heads: not these
        operations.append(CommitOperationDelete(path_in_repo=BENCHMARK_NAME))
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Upload {config['head_arch']} heads with hf_hydra",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )
