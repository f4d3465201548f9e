"""Hub artifacts: their file names, and the identity of the base model the heads belong to.

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

Heads are only useful on the base they were trained with (same sizes, same token ids, ideally the same weights),
so an artifact records the base's revision and tokenizer fingerprint, computed here, and loading compares them
with the base it is given (`warn_if_base_differs`). The model card and pushing are in model_card.py, reading the
checkpoints published with the Hydra and Medusa papers in reference_checkpoints.py; both take the file names
from this module, which imports neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RevisionResolutionError
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .configuration_hydra import HydraConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"
CARD_NAME = "README.md"
BENCHMARK_NAME = "benchmark.json"
TRAINING_ARGS_NAME = "training_args.json"  # written by `hf-hydra train` beside the heads
TRAINING_SUMMARY_NAME = "training_summary.json"
TREE_TUNING_NAME = "tree_tuning.json"  # written by `hf-hydra tune-tree` beside the heads


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
