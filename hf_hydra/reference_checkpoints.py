"""Loading the draft heads published with the Hydra and Medusa papers (the reference checkpoints).

Those checkpoints (Hydra: zankner/Hydra, Medusa: FasterDecoding/Medusa) have their own config.json and their
own state-dict layout. Mapping them onto hf_hydra's heads lets the published heads be loaded with
`HydraForCausalLM.from_pretrained`, saved in our format (`hf-hydra convert`) and compared with heads trained
here, without the reference code. A mapping that is only approximately right would decode with heads that
compute something else than they were trained to, so every mismatch is an error that says why.

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
    Medusa-1.0 / Medusa-2 (heads in the model)    head_arch "medusa", the base loaded from the same repo
           medusa_head.{i}.{k}.linear.*           heads.{i}.blocks.{k}.linear.*
           medusa_head.{i}.{L}.weight             heads.{i}.output.weight
           model.*, lm_head.weight                the base model's own weights

Medusa-1.0 / Medusa-2 repos (FasterDecoding/medusa-1.0-*) are full models: a base config.json (with a model_type)
that also carries `medusa_num_heads`, and the heads stored in the model weights beside the base's (one file,
sharded safetensors or pytorch_model.bin). Their base is that repo (for Medusa-2 a base fine-tuned with the heads,
so no other copy will do); `load_base_model` loads it without the `medusa_head.*` keys. A config with a model_type
and `medusa_num_heads` but no such keys is a heads-only Medusa checkpoint (`medusa_lm_head.*`, the base named by
`base_model_name_or_path`); a config with a model_type and no Medusa keys is a base model, not heads.

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

import json
import logging
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import cached_file

from ._compat import cached_file_or_none, from_pretrained_allowing
from .configuration_hydra import HydraConfig
from .head_archs import HYDRA, HYDRA_PLUS_PLUS, MEDUSA
from .hub import CONFIG_NAME, base_tokenizer_fingerprint, resolve_base_revision
from .tree import DEFAULT_TREE_NAME, NAMED_TREES

logger = logging.getLogger(__name__)

HYDRA_WEIGHTS = "hydra_lm_head.pt"
MEDUSA_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
_EMBED_COPY = "input_embed_fn.weight"
_PREFIX_EMBED = "prefix_embeding_layer.embed_tokens.weight"
_PREFIX_INV_FREQ = "prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq"
REFERENCE_TREE_NAME = "mc_sim_7b_63"  # FasterDecoding/Medusa's default tree
MEDUSA_IN_BASE = "medusa-in-base"
MEDUSA_HEAD_PREFIX = "medusa_head."  # the heads' keys in a Medusa-1.0 / Medusa-2 model's weights
# A model's weights, in the order transformers looks for them (an index names the shards).
MODEL_WEIGHTS = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)


@dataclass(frozen=True)
class ReferenceCheckpoint:
    """A checkpoint in a reference layout, read but not yet mapped: `config` describes the equivalent heads."""

    format: str  # "hydra-mlp" | "hydra-prefix-mlp" | "medusa" | "medusa-v2" | "medusa-in-base"
    source: str
    weights_file: str
    config: HydraConfig  # base sizes may be None where the checkpoint does not tell (filled from the base)
    state: dict[str, torch.Tensor]  # as stored: reference key names

    @property
    def base_in_checkpoint(self) -> bool:
        """Whether the base model is the checkpoint's own repo (Medusa-1.0 / Medusa-2: heads inside the model)."""
        return self.format == MEDUSA_IN_BASE

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
    # Medusa: nn.Sequential(block 0, ..., block L-1, Linear) per head ("version 2": no Linear), in the model's
    # weights as the ModuleList `medusa_head`.
    prefix = MEDUSA_HEAD_PREFIX if fmt == MEDUSA_IN_BASE else ""
    return [
        (r"^heads\.(\d+)\.blocks\.(\d+)\.", rf"{prefix}\1.\2."),
        (r"^heads\.(\d+)\.output\.", rf"{prefix}\1.{num_layers}."),
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
        if "medusa_num_heads" not in raw:
            raise ValueError(
                f"{source} holds a {model_type!r} model, not draft heads: load it as the base model "
                "(HydraForCausalLM.from_base(base) or from_pretrained(heads, base_model=base))."
            )
        return _read_medusa_model(source, raw, hub_kwargs)
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
        head_arch=HYDRA.name if arch == "mlp" else HYDRA_PLUS_PLUS.name,
        num_heads=raw["hydra_num_heads"], num_layers=raw["hydra_num_layers"],
        base_hidden_size=hidden, base_vocab_size=vocab,
    )
    return ReferenceCheckpoint(fmt, source, weights_file, config, state)


def _read_medusa_model(source: str, raw: dict, hub_kwargs: dict) -> ReferenceCheckpoint:
    """A Medusa config that is also a base model's config: the heads inside the model's weights (Medusa-1.0 /
    Medusa-2, the base is this repo) or, without such keys, in a heads-only file beside it."""
    found = _medusa_tensors_in_model(source, hub_kwargs)
    if found is not None and found[1]:
        weights_file, state = found
        return _medusa_checkpoint(source, raw, MEDUSA_IN_BASE, weights_file, state, base=source,
                                  base_model_revision=hub_kwargs.get("revision"))
    if _medusa_weights_file(source, hub_kwargs) is not None:
        return _read_medusa(source, raw, hub_kwargs)
    where = f"its model weights ({found[0]}) hold" if found is not None else "it has no model weights and"
    raise ValueError(
        f"The config.json of {source} (a {raw['model_type']!r} model) has medusa_num_heads, but {where} no "
        f"{MEDUSA_HEAD_PREFIX}* tensors, and there is no {' or '.join(MEDUSA_WEIGHTS)}: it holds no Medusa heads to "
        "load. Load it as the base model (HydraForCausalLM.from_base, or from_pretrained(heads, base_model=...))."
    )


def _medusa_tensors_in_model(source: str, hub_kwargs: dict) -> tuple[str, dict[str, torch.Tensor]] | None:
    """The `medusa_head.*` tensors in `source`'s model weights, and the file(s) holding them (the index where none
    does); None where `source` has no model weights. Reads only those tensors (safetensors headers, index files,
    a memory-mapped pytorch_model.bin)."""
    for name in MODEL_WEIGHTS:
        path = cached_file_or_none(source, name, **hub_kwargs)
        if path is not None:
            break
    else:
        return None
    files = [path]
    if name.endswith(".index.json"):
        weight_map = json.loads(Path(path).read_text())["weight_map"]
        shards = sorted({shard for key, shard in weight_map.items() if key.startswith(MEDUSA_HEAD_PREFIX)})
        files = [_cached_file(source, shard, hub_kwargs) for shard in shards]
    state = {}
    for file in files:
        state |= _medusa_tensors(file)
    return ", ".join(files) or path, state


def _medusa_tensors(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as weights:
            return {key: weights.get_tensor(key) for key in weights.keys() if key.startswith(MEDUSA_HEAD_PREFIX)}
    state = _load_pickle(path, mmap=True)  # a whole base model: map it, read only the heads
    return {key: tensor for key, tensor in state.items() if key.startswith(MEDUSA_HEAD_PREFIX)}


def _medusa_weights_file(source: str, hub_kwargs: dict) -> str | None:
    """The heads-only Medusa weights file of `source`, safetensors first (no pickle at all); None without one."""
    for name in MEDUSA_WEIGHTS:
        weights_file = cached_file_or_none(source, name, **hub_kwargs)
        if weights_file is not None:
            return weights_file
    return None


def _read_medusa(source: str, raw: dict, hub_kwargs: dict) -> ReferenceCheckpoint:
    weights_file = _medusa_weights_file(source, hub_kwargs)
    if weights_file is None:
        raise ValueError(f"{source} has a Medusa config.json but neither {' nor '.join(MEDUSA_WEIGHTS)}.")
    state = load_file(weights_file) if weights_file.endswith(".safetensors") else _load_pickle(weights_file)
    fmt = "medusa-v2" if str(raw.get("version", "1")) == "2" else "medusa"
    return _medusa_checkpoint(source, raw, fmt, weights_file, state)


def _medusa_checkpoint(
    source: str, raw: dict, fmt: str, weights_file: str, state: dict[str, torch.Tensor], **config
) -> ReferenceCheckpoint:
    """A Medusa checkpoint (`fmt` "medusa", "medusa-v2" or "medusa-in-base") of the stored `state`."""
    prefix = MEDUSA_HEAD_PREFIX if fmt == MEDUSA_IN_BASE else ""
    heads = {key.removeprefix(prefix): tensor for key, tensor in state.items()}  # keys "{i}.{k}...."
    layers = raw.get("medusa_num_layers", 1)
    version2 = fmt == "medusa-v2"
    heads_in_file = sorted({int(k.split(".")[0]) for k in heads if k.split(".")[0].isdigit()})
    if version2:
        num_heads = raw["medusa_num_heads"]  # the reference "version 2" loader builds what the config says
    else:
        # The stored heads are the truth: the reference's heads-only loader builds 5 whatever the config says (its
        # uploaded configs say 2), and its models with the heads inside keep the stored heads the config counts.
        num_heads = max(heads_in_file) + 1 if heads_in_file else 5
        if num_heads != raw["medusa_num_heads"]:
            logger.info("%s: config says %s Medusa heads, the weights hold %d; loading %d.",
                        source, raw["medusa_num_heads"], num_heads, num_heads)
    d = heads["0.0.linear.weight"].shape[0] if "0.0.linear.weight" in heads else None
    vocab = None if version2 or f"0.{layers}.weight" not in heads else heads[f"0.{layers}.weight"].shape[0]
    config = _reference_config(
        raw, fmt, source, head_arch=MEDUSA.name, num_heads=num_heads, num_layers=layers,
        base_hidden_size=d, base_vocab_size=vocab, vocab_projection="shared" if version2 else "per_head", **config,
    )
    return ReferenceCheckpoint(fmt, source, weights_file, config, state)


def _reference_config(raw: dict, fmt: str, source: str, base: str | None = None, **kwargs) -> HydraConfig:
    base = base or raw.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"The config.json of {source} names no base model (base_model_name_or_path).")
    return HydraConfig(
        base_model_name_or_path=base,
        dropout=0.0,  # the reference loaders build inference heads without dropout
        reference_checkpoint={"source": source, "format": fmt},
        **kwargs,
    )


def _load_pickle(path: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A torch pickle of a plain state dict, read with weights_only=True: never executes code from the file.
    mmap: map the tensors instead of reading them (a file torch.save wrote as a zip; older ones are read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
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
    projection), the base's revision and tokenizer fingerprint (so a converted artifact records them), and the
    default tree for the base's device (`reference_tree`)."""
    config = checkpoint.config
    text_config = base_model.config.get_text_config()
    if config.base_hidden_size is None:
        config.base_hidden_size = text_config.hidden_size
    if config.base_vocab_size is None:
        config.base_vocab_size = base_model.get_output_embeddings().weight.shape[0]
    config.base_model_revision = resolve_base_revision(base_model.name_or_path, config.base_model_revision)
    config.tree = reference_tree(base_model.device, config.num_heads)
    if getattr(config, "base_tokenizer_fingerprint", None) is None:
        config.base_tokenizer_fingerprint = base_tokenizer_fingerprint(base_model)
    return config


def reference_tree(device: torch.device, num_heads: int) -> str | list[list[int]]:
    """The default tree of reference heads on a base on `device`: the references' own `mc_sim_7b_63` (63 nodes,
    what their heads were tuned and measured with) on an accelerator, where verifying 64 tokens costs about one
    token's step; the CPU tree on a CPU, where it costs several. Cut to `num_heads` where the tree is deeper."""
    name = DEFAULT_TREE_NAME if device.type == "cpu" else REFERENCE_TREE_NAME
    paths = NAMED_TREES[name]
    if max(len(path) for path in paths) <= num_heads:
        return name
    return [list(path) for path in paths if len(path) <= num_heads]


def load_base_model(name_or_path: str, **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)`, quiet about Medusa heads stored in the
    model's own weights (`medusa_head.*` of Medusa-1.0 / Medusa-2 repos: `load_reference_weights` reads them, the
    base has no place for them); transformers' load report still appears for anything else. A pickled
    pytorch_model.bin is read with weights_only=True only."""
    if kwargs.get("weights_only") is False:
        raise ValueError("weights_only=False: hf_hydra never unpickles arbitrary objects; leave weights_only at True.")
    return from_pretrained_allowing(
        AutoModelForCausalLM, name_or_path, lambda key: key.startswith(MEDUSA_HEAD_PREFIX),
        **{**kwargs, "weights_only": True},
    )


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
