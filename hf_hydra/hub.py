"""Hub artifacts: model cards, pushing heads, and loading the heads published with the Hydra and Medusa papers.

An artifact (a folder, or a Hub repo) is

    config.json             HydraConfig: model_type "hydra", the base's id and revision (a commit sha when the
                            base came from the Hub) and its tokenizer's fingerprint, the head configuration
    model.safetensors       the heads only, never base weights
    generation_config.json  the base's generation defaults plus the speculation defaults (hydra_tree, ...)
    README.md               the model card: model_cards/hydra_heads.md filled from the files beside it
    tree_tuning.json        (optional) `hf-hydra tune-tree`'s measurements: the heads' rank accuracy and
                            calibration on held-out text and the tuning machine's latencies (re-tune elsewhere
                            from the accuracy alone; the dynamic tree reads the calibration and latencies)
    benchmark.json          (optional) the summary of the `hf-hydra bench` report whose table the card shows

Reference checkpoints (method.md section 5) are recognised by `read_reference_checkpoint` and mapped onto our
heads by `load_reference_weights`, which refuses anything it cannot map exactly:

    reference                                     ours
    Hydra  "mlp", grounded_heads                  head_arch "hydra"
           hydra_mlp.{i}.{k}.*                    heads.{i}.blocks.{k}.*
           hydra_lm_head.{i}.*                    heads.{i}.output.*
    Hydra  "prefix-mlp", grounded_heads           head_arch "hydra++"
           hydra_mlp.{i}.{2k+1}.*                 heads.{i}.blocks.{k}.*          (even indices are Dropout)
           hydra_lm_head.{i}.1.*                  heads.{i}.output.*
           prefix_embeding_layer.layers.0.*       prefix_layer.layer.*
           prefix_embeding_layer.norm.weight      prefix_layer.norm.weight
    Medusa {i}.{k}.linear.*                       head_arch "medusa": heads.{i}.blocks.{k}.linear.*
           {i}.{L}.weight                         heads.{i}.output.weight
    Medusa "version 2" (no {i}.{L}.weight)        head_arch "medusa", vocab_projection "shared" (the base lm_head)

Keys without a counterpart are checked, not dropped: `input_embed_fn.weight` must equal the base's input
embedding (the reference heads read that copy), `...rotary_emb.inv_freq` must equal our prefix layer's, and
`prefix_embeding_layer.embed_tokens.weight` (never read: the reference prefix layer takes `inputs_embeds`) must
have the shape [V, d]. The reference builds repeated blocks as `[ResBlock] * n` (one module), so those keys hold
identical tensors; differing ones mean the file was not written by the reference code, and are an error.

What the reference code computes, checked against ours (a hand-written forward in tests/test_hub.py):
* Hydra head i reads cat(h_t or the prefix output, E(x_{t+1}), ..., E(x_{t+i+1})); its first block is
  `res_connection(x) + SiLU(linear(x))` (our ProjectedResBlock), later blocks `x + SiLU(linear(x))`, then a
  Linear(d, V) with bias. prefix-mlp adds Dropout before every block and the Linear: ours sits at the same places.
* The prefix layer is a 1-layer LlamaModel fed `inputs_embeds` = the base's post-norm hidden states of verified
  tokens, causal, positions = token positions, output after its final norm (= our PrefixLayer). Its RoPE is
  plain with base 10000 whatever the base config says, hence the inv_freq check (a base with another rope_theta
  or RoPE scaling is refused).
* Medusa heads are `x + SiLU(linear(x))` blocks on h_t and a Linear(d, V) without bias; "version 2" multiplies
  by the base lm_head (our vocab_projection "shared"; a base lm_head with a bias is refused).
* Not carried over: the reference loaders use `load_state_dict(strict=False)`, so missing keys silently stay
  random (here an error); loading Hydra heads there writes `input_embed_fn.weight` into the base's embedding
  (here it must already be equal); its proposal for ungrounded prefix-mlp heads skips the prefix layer they
  were trained with (refused, like all ungrounded and attention-based reference heads).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import re
import shlex
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, RevisionResolutionError
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import cached_file

from .bench_table import markdown_table
from .configuration_hydra import HydraConfig
from .training.features import PREPARATION_FILE  # copied by `hf-hydra train` from the feature folder
from .tree import DYNAMIC_TREE, resolve_tree

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"
CARD_NAME = "README.md"
BENCHMARK_NAME = "benchmark.json"
CARD_TEMPLATE = importlib.resources.files("hf_hydra.model_cards") / "hydra_heads.md"  # model_cards/ in the repo
TRAINING_ARGS_NAME = "training_args.json"  # written by `hf-hydra train` beside the heads
TRAINING_SUMMARY_NAME = "training_summary.json"
TREE_TUNING_NAME = "tree_tuning.json"  # written by `hf-hydra tune-tree` beside the heads
_ARCH_TAGS = {"medusa": "medusa", "hydra": "hydra", "hydra++": "hydra-plus-plus"}
# Training arguments that say where files were or how the run was operated, not how the heads were trained.
_UNSHOWN_TRAINING_ARGS = {"features_dir", "output_dir", "base_model", "eval_every", "save_every",
                          "keep_checkpoints", "resume", "cpu", "extra_features_dirs"}


# ==================================================================================================
# The base model's identity: revision and tokenizer fingerprint


def heads_digest(heads_dir: str | os.PathLike) -> str:
    """sha256 of the saved heads' weights: ties a stored tuning (accuracy, calibration) to the heads it measured."""
    return hashlib.sha256((Path(heads_dir) / WEIGHTS_NAME).read_bytes()).hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """`sha256:<hex>` of the tokenizer's token -> id map (added tokens included). Heads trained with one
    tokenizer predict ids that mean the same strings under any tokenizer with the same fingerprint."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    payload = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def base_tokenizer_fingerprint(base_model: PreTrainedModel, revision: str | None = None) -> str | None:
    """The fingerprint of the tokenizer stored with the base model (local files or the Hub cache only, never a
    download); None when there is none to read (e.g. a base built from a config)."""
    source = base_model.name_or_path
    if not source:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        logger.debug("No tokenizer to fingerprint for %s: %s", source, error)
        return None
    return tokenizer_fingerprint(tokenizer)


def resolve_base_revision(name_or_path: str, revision: str | None = None) -> str | None:
    """The commit sha `revision` (default: the default branch) of a Hub model resolves to, from the local Hub
    cache (the mapping huggingface_hub recorded when the files were downloaded); `revision` unchanged for a local
    folder or when the cache has no such record."""
    if not name_or_path or os.path.isdir(name_or_path):
        return revision
    try:
        resolved = HfApi().resolve_revision(name_or_path, revision=revision, local_files_only=True)
    except (RevisionResolutionError, HfHubHTTPError, OSError, ValueError) as error:
        logger.debug("Could not resolve revision %r of %s: %s", revision, name_or_path, error)
        return revision
    return resolved.resolved


def warn_if_base_differs(config: HydraConfig, base_model: PreTrainedModel) -> None:
    """Warn when a given base model is another revision, or has another tokenizer, than the heads were trained
    with (both best effort: only what can be read locally is compared; sizes are checked elsewhere, strictly)."""
    recorded_revision = config.base_model_revision
    if recorded_revision:
        revision = resolve_base_revision(base_model.name_or_path)
        if revision and revision != recorded_revision:
            logger.warning(
                "These heads were trained on %s at revision %s, but the given base model %s is at revision %s (the "
                "commit the local Hub cache records for its default branch): drafts may be accepted less often. "
                "Load the base with revision=%r to match.",
                config.base_model_name_or_path, recorded_revision, base_model.name_or_path, revision,
                recorded_revision,
            )
    recorded_fingerprint = getattr(config, "base_tokenizer_fingerprint", None)
    if recorded_fingerprint:
        fingerprint = base_tokenizer_fingerprint(base_model)
        if fingerprint and fingerprint != recorded_fingerprint:
            logger.warning(
                "These heads were trained with the tokenizer of %s (fingerprint %s), but the tokenizer of the given "
                "base model %s has fingerprint %s: the heads' token ids may mean other strings.",
                config.base_model_name_or_path, recorded_fingerprint, base_model.name_or_path, fingerprint,
            )


# ==================================================================================================
# Model card


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
    base_id = _hub_model_id(config.get("base_model_name_or_path"))
    arch = config.get("head_arch", "hydra")
    metadata = ModelCardData(
        base_model=base_id,
        library_name="hf_hydra",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(["speculative-decoding", "hf_hydra", _ARCH_TAGS.get(arch, arch), *(tags or [])])),
    )
    repo = repo_id or folder.resolve().name
    base_text = f"`{config.get('base_model_name_or_path')}`" if config.get("base_model_name_or_path") else "its base"
    values = {
        "metadata": metadata.to_yaml(),
        "title": repo.split("/")[-1],
        "summary": f"{config.get('num_heads')} {_ARCH_NAMES.get(arch, arch)} draft heads for {base_text}.",
        "repo_id": repo,
        "base_model_text": base_text,
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


_ARCH_NAMES = {"medusa": "Medusa", "hydra": "Hydra", "hydra++": "Hydra++"}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _hub_model_id(name: str | None) -> str | None:
    """`name` when it looks like a Hub model id (not a local folder), for the card's `base_model`."""
    if not name or os.path.isdir(name) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name):
        return None
    return name


def _heads_table(config: dict, generation: dict, weights: Path) -> str:
    static = [list(p) for p in resolve_tree(config.get("tree"), config["num_heads"])]
    default = generation.get("hydra_tree") or static
    tree = static if default == DYNAMIC_TREE else default
    tree_text = f"{len(tree)} nodes, depth {max(map(len, tree), default=0)}"
    if default == DYNAMIC_TREE:
        tree_text = f"dynamic (per step: calibrated acceptance, measured verification cost); static: {tree_text}"
    rows = [
        ("architecture", f"{_ARCH_NAMES.get(config['head_arch'], config['head_arch'])} (`{config['head_arch']}`)"),
        ("heads", f"{config['num_heads']} (head i drafts the token i + 2 positions ahead)"),
        ("residual blocks per head", str(config["num_layers"])),
        ("vocabulary projection", _projection_text(config)),
        ("base model", f"`{config.get('base_model_name_or_path')}`"),
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


# ==================================================================================================
# Reference checkpoints (Hydra: zankner/Hydra, Medusa: FasterDecoding/Medusa)

HYDRA_WEIGHTS = "hydra_lm_head.pt"
MEDUSA_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
_EMBED_COPY = "input_embed_fn.weight"
_PREFIX_EMBED = "prefix_embeding_layer.embed_tokens.weight"
_PREFIX_INV_FREQ = "prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq"


@dataclass(frozen=True)
class ReferenceCheckpoint:
    """A checkpoint in a reference layout, read but not yet mapped: `config` describes the equivalent heads."""

    format: str  # "hydra-mlp" | "hydra-prefix-mlp" | "medusa" | "medusa-v2"
    source: str
    weights_file: str
    config: HydraConfig  # base sizes may be None where the checkpoint does not tell (filled from the base)
    state: dict[str, torch.Tensor]  # as stored: reference key names

    def reference_key(self, key: str) -> str:
        """Our heads' state-dict key -> the reference key holding that tensor."""
        for pattern, replacement in _key_map(self.format, self.config.num_layers):
            mapped, n = re.subn(pattern, replacement, key)
            if n:
                return mapped
        raise ValueError(f"internal: no reference key for {key!r} in the {self.format} layout")

    def tied_groups(self) -> list[list[str]]:
        """Reference keys that one shared module (`[ResBlock] * n`) wrote, so they must hold equal tensors."""
        heads, layers = self.config.num_heads, self.config.num_layers
        first = 0 if self.format.startswith("medusa") else 1  # Hydra's block 0 is its own module
        groups = []
        for i in range(heads):
            for param in ("weight", "bias"):
                keys = [self.reference_key(f"heads.{i}.blocks.{k}.linear.{param}") for k in range(first, layers)]
                if len(keys) > 1:
                    groups.append(keys)
        return groups


def _key_map(fmt: str, num_layers: int) -> list[tuple[str, str | Callable[[re.Match], str]]]:
    """Our key -> the reference key, as (pattern, replacement) pairs; the first matching pattern wins."""
    if fmt == "hydra-mlp":
        return [
            (r"^heads\.(\d+)\.blocks\.(\d+)\.", r"hydra_mlp.\1.\2."),
            (r"^heads\.(\d+)\.output\.", r"hydra_lm_head.\1."),
        ]
    if fmt == "hydra-prefix-mlp":  # nn.Sequential(Dropout, block 0, Dropout, block 1, ...); lm_head (Dropout, Linear)
        return [
            (r"^heads\.(\d+)\.blocks\.(\d+)\.", lambda m: f"hydra_mlp.{m[1]}.{2 * int(m[2]) + 1}."),
            (r"^heads\.(\d+)\.output\.", r"hydra_lm_head.\1.1."),
            (r"^prefix_layer\.layer\.", "prefix_embeding_layer.layers.0."),
            (r"^prefix_layer\.norm\.", "prefix_embeding_layer.norm."),
        ]
    # Medusa: nn.Sequential(block 0, ..., block L-1, Linear) per head ("version 2": no Linear).
    return [
        (r"^heads\.(\d+)\.blocks\.(\d+)\.", r"\1.\2."),
        (r"^heads\.(\d+)\.output\.", rf"\1.{num_layers}."),
    ]


def read_reference_checkpoint(source: str, hub_kwargs: dict) -> ReferenceCheckpoint | None:
    """The reference checkpoint at `source` (folder or Hub repo), or None when it holds our own format.

    Raises a ValueError that says what to do for a config.json that is neither ours nor a reference layout we can
    load exactly.
    """
    raw = json.loads(Path(_cached_file(source, CONFIG_NAME, hub_kwargs)).read_text())
    model_type = raw.get("model_type")
    if model_type == HydraConfig.model_type:
        return None
    if model_type:
        raise ValueError(
            f"{source} holds a {model_type!r} model, not draft heads: load it as the base model "
            "(HydraForCausalLM.from_base(base) or from_pretrained(heads, base_model=base))."
        )
    if "hydra_head_arch" in raw:
        return _read_hydra(source, raw, hub_kwargs)
    if "medusa_num_heads" in raw:
        return _read_medusa(source, raw, hub_kwargs)
    raise ValueError(
        f"The config.json of {source} has no model_type and is neither a reference Hydra checkpoint "
        "(hydra_head_arch) nor a Medusa one (medusa_num_heads): it is not something hf_hydra can load."
    )


def _cached_file(source: str, filename: str, hub_kwargs: dict) -> str:
    """`cached_file`, with an error that says what to do when offline (HF_HUB_OFFLINE=1 or local_files_only)
    and the cache has no copy: transformers' own message then speaks of connection problems."""
    try:
        return cached_file(source, filename, **hub_kwargs)
    except OSError as error:
        offline = huggingface_hub.constants.is_offline_mode() or hub_kwargs.get("local_files_only")
        if not offline or os.path.isdir(source):
            raise
        switch = "HF_HUB_OFFLINE=1 is set" if huggingface_hub.constants.is_offline_mode() else "local_files_only=True"
        cache = hub_kwargs.get("cache_dir") or huggingface_hub.constants.HF_HUB_CACHE
        raise OSError(
            f"Cannot load {filename} of {source!r}: {switch}, so nothing is downloaded, and the Hub cache {cache} "
            f"holds no copy of it. Download the heads once while online (e.g. `hf download {source}`, or "
            "from_pretrained without offline mode, with the same cache_dir), or pass the path of a local folder."
        ) from error


def _read_hydra(source: str, raw: dict, hub_kwargs: dict) -> ReferenceCheckpoint:
    arch = raw["hydra_head_arch"]
    if arch not in ("mlp", "prefix-mlp"):
        raise ValueError(
            f"{source} uses reference Hydra head arch {arch!r}; only 'mlp' (-> hydra) and 'prefix-mlp' (-> hydra++) "
            "map onto hf_hydra heads (the attention-based heads have no counterpart here)."
        )
    if not raw.get("grounded_heads", False):
        skipped = ", and its proposal skips the prefix layer it was trained with" if arch == "prefix-mlp" else ""
        raise ValueError(
            f"{source} has grounded_heads=false: those reference heads read only h_t (Medusa inputs) but end in a "
            f"biased Linear, which hf_hydra's Medusa heads (no output bias) cannot express{skipped}. Only grounded "
            "(sequentially dependent) Hydra heads load."
        )
    if raw.get("hidden_state_offset", 0) != 0:
        raise ValueError(
            f"{source} has hidden_state_offset={raw['hidden_state_offset']}: its heads read an intermediate layer's "
            "hidden state, but hf_hydra heads read the base's last post-norm hidden state."
        )
    weights_file = cached_file(source, HYDRA_WEIGHTS, **hub_kwargs)
    state = _load_pickle(weights_file)
    output = "hydra_lm_head.0.weight" if arch == "mlp" else "hydra_lm_head.0.1.weight"
    vocab, hidden = state[output].shape if output in state else (None, None)
    fmt = "hydra-mlp" if arch == "mlp" else "hydra-prefix-mlp"
    config = _reference_config(
        raw, fmt, source,
        head_arch="hydra" if arch == "mlp" else "hydra++",
        num_heads=raw["hydra_num_heads"], num_layers=raw["hydra_num_layers"],
        base_hidden_size=hidden, base_vocab_size=vocab,
    )
    return ReferenceCheckpoint(fmt, source, weights_file, config, state)


def _read_medusa(source: str, raw: dict, hub_kwargs: dict) -> ReferenceCheckpoint:
    weights_file = None
    for name in MEDUSA_WEIGHTS:  # safetensors first: no pickle at all
        weights_file = cached_file(source, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if weights_file is not None:
            break
    if weights_file is None:
        raise ValueError(f"{source} has a Medusa config.json but neither {' nor '.join(MEDUSA_WEIGHTS)}.")
    state = load_file(weights_file) if weights_file.endswith(".safetensors") else _load_pickle(weights_file)
    layers = raw.get("medusa_num_layers", 1)
    version2 = str(raw.get("version", "1")) == "2"
    heads_in_file = sorted({int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()})
    if version2:
        num_heads = raw["medusa_num_heads"]  # the reference "version 2" loader builds what the config says
    else:
        # The reference loader builds 5 heads whatever the config says (its uploaded configs say 2); the file
        # is the truth.
        num_heads = max(heads_in_file) + 1 if heads_in_file else 5
        if num_heads != raw["medusa_num_heads"]:
            logger.info("%s: config says %s Medusa heads, the weights hold %d; loading %d.",
                        source, raw["medusa_num_heads"], num_heads, num_heads)
    d = state["0.0.linear.weight"].shape[0] if "0.0.linear.weight" in state else None
    vocab = None if version2 or f"0.{layers}.weight" not in state else state[f"0.{layers}.weight"].shape[0]
    fmt = "medusa-v2" if version2 else "medusa"
    config = _reference_config(
        raw, fmt, source, head_arch="medusa", num_heads=num_heads, num_layers=layers,
        base_hidden_size=d, base_vocab_size=vocab, vocab_projection="shared" if version2 else "per_head",
    )
    return ReferenceCheckpoint(fmt, source, weights_file, config, state)


def _reference_config(raw: dict, fmt: str, source: str, **kwargs) -> HydraConfig:
    base = raw.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"The config.json of {source} names no base model (base_model_name_or_path).")
    return HydraConfig(
        base_model_name_or_path=base,
        dropout=0.0,  # the reference loaders build inference heads without dropout
        reference_checkpoint={"source": source, "format": fmt},
        **kwargs,
    )


def _load_pickle(path: str) -> dict[str, torch.Tensor]:
    """A torch pickle of a plain state dict, read with weights_only=True: never executes code from the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... for anything but plain tensors
        raise ValueError(
            f"{path} could not be read as a plain tensor state dict with torch.load(weights_only=True) ({error}); "
            "hf_hydra never unpickles arbitrary objects."
        ) from error
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return state


def config_for_base(checkpoint: ReferenceCheckpoint, base_model: PreTrainedModel) -> HydraConfig:
    """The checkpoint's config completed from the base: sizes the file does not tell (Medusa version 2 has no
    projection), the base's revision and tokenizer fingerprint (so a converted artifact records them)."""
    config = checkpoint.config
    text_config = base_model.config.get_text_config()
    if config.base_hidden_size is None:
        config.base_hidden_size = text_config.hidden_size
    if config.base_vocab_size is None:
        config.base_vocab_size = base_model.get_output_embeddings().weight.shape[0]
    if config.base_model_revision is None:
        config.base_model_revision = resolve_base_revision(base_model.name_or_path)
    if getattr(config, "base_tokenizer_fingerprint", None) is None:
        config.base_tokenizer_fingerprint = base_tokenizer_fingerprint(base_model)
    return config


def load_reference_weights(model, checkpoint: ReferenceCheckpoint) -> None:
    """Copy a reference checkpoint into `model.heads` (a HydraForCausalLM built from `checkpoint.config`), after
    checking the key set, the shapes, the tied duplicates and the keys without a counterpart."""
    heads, state, where = model.heads, checkpoint.state, checkpoint.weights_file
    ours = heads.state_dict()
    mapping = {key: checkpoint.reference_key(key) for key in ours}  # our key -> reference key
    extras = _extra_checks(checkpoint, model)
    expected = set(mapping.values()) | extras.keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match the {checkpoint.format} layout of {checkpoint.config.num_heads} heads x "
            f"{checkpoint.config.num_layers} layers: missing keys {missing}, unknown keys {unexpected}."
        )
    wrong = [
        f"{ref} {tuple(state[ref].shape)} (expected {tuple(ours[key].shape)})"
        for key, ref in mapping.items()
        if state[ref].shape != ours[key].shape
    ]
    if wrong:
        raise ValueError(f"{where} has tensors of the wrong shape for this base model: {wrong}.")
    for group in checkpoint.tied_groups():
        if not all(torch.equal(state[group[0]], state[key]) for key in group[1:]):
            raise ValueError(
                f"{where}: {group} differ, but the reference code ties them (one module repeated); "
                "this file was not written by it."
            )
    for key, check in extras.items():
        check(state[key])
    with torch.no_grad():
        heads.load_state_dict({key: state[ref] for key, ref in mapping.items()}, strict=True)


def _extra_checks(checkpoint: ReferenceCheckpoint, model) -> dict[str, Callable[[torch.Tensor], None]]:
    """Reference keys with no counterpart in our heads, each with the check it must pass."""
    if checkpoint.format.startswith("medusa"):
        lm_head_bias = getattr(model.base_lm.get_output_embeddings(), "bias", None)
        if checkpoint.format == "medusa-v2" and lm_head_bias is not None:
            raise ValueError("Medusa version 2 heads use the base lm_head, but this base's lm_head has a bias "
                             "that hf_hydra's shared projection does not apply.")
        return {}
    base_embedding = model.base_lm.get_input_embeddings().weight.detach()
    where = checkpoint.weights_file

    def embedding_copy(tensor: torch.Tensor) -> None:
        if not _same_values(tensor, base_embedding):
            raise ValueError(
                f"{where}: {_EMBED_COPY} (the copy of the base embedding the reference heads read) differs from the "
                f"input embedding of the base model {model.base_lm.name_or_path!r}: these heads belong to another base."
            )

    checks = {_EMBED_COPY: embedding_copy}
    if checkpoint.format == "hydra-prefix-mlp":
        rotary = model.heads.prefix_layer.rotary_emb
        d, vocab = checkpoint.config.base_hidden_size, checkpoint.config.base_vocab_size

        def unused_embedding(tensor: torch.Tensor) -> None:
            if tuple(tensor.shape) != (vocab, d):
                raise ValueError(f"{where}: {_PREFIX_EMBED} has shape {tuple(tensor.shape)}, expected {(vocab, d)}.")

        def rope(tensor: torch.Tensor) -> None:
            if getattr(rotary, "rope_type", "default") != "default" or not _same_values(tensor, rotary.inv_freq):
                raise ValueError(
                    f"{where}: the reference prefix layer used plain RoPE with these frequencies ({_PREFIX_INV_FREQ}), "
                    f"but a decoder layer of {model.base_lm.name_or_path!r} computes others "
                    f"(rope type {getattr(rotary, 'rope_type', None)!r}): its prefix layer would not compute the same."
                )

        checks |= {_PREFIX_EMBED: unused_embedding, _PREFIX_INV_FREQ: rope}
    return checks


def _same_values(stored: torch.Tensor, ours: torch.Tensor) -> bool:
    """Equal up to the rounding of the coarser of the two dtypes (a float16 file against a float32 base)."""
    if stored.shape != ours.shape:
        return False
    if stored.dtype == ours.dtype:
        return torch.equal(stored, ours)
    eps = max(torch.finfo(stored.dtype).eps, torch.finfo(ours.dtype).eps)
    return torch.allclose(stored.float(), ours.float(), rtol=eps, atol=eps * float(ours.float().abs().max()))
