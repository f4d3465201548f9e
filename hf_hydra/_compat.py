"""Every use of PRIVATE transformers / torch API in hf_hydra, behind one small function each.

Private: a leading-underscore name or attribute of transformers or torch, or an attribute transformers sets and
reads for its own bookkeeping. A transformers / torch upgrade may change such a thing in a patch release, without
a deprecation. Each function below touches one, and `tests/test_compat.py` checks each on the installed versions
and fails with a message naming the version and what changed. CI (`.ci/run`) tests torch 2.13.0 and the newest
transformers the pin in pyproject.toml allows (`>=5.24,<5.25`: the pin admits only what CI tests); the code was
last checked against transformers 5.24.0 and torch 2.13.0+cpu.

Private uses, by seam function (function -> what it touches -> who calls it):

* `attn_implementation(config)` -> `PretrainedConfig._attn_implementation` (the attention implementation a
  loaded model runs; there is no public getter) -> support.check_tree_base, attention.use_packed_gqa_attention,
  heads.PrefixLayer.forward.
* `run_assisted_decoding(model, ...)` -> `GenerationMixin._assisted_decoding` (transformers' assisted loop; no
  public entry point runs it with a custom candidate generator) -> assisted.assisted_decoding.
* `keep_hydra_generation_fields(generation_config)` -> `GenerationConfig._from_model_config` (a generation config
  saved with it true is rebuilt from its model-config fields on loading, which drops custom `hydra_*` fields) ->
  modeling_hydra.speculative_generation_config, modeling_hydra._load_generation_config.
* `cached_file_or_none(source, name, **hub_kwargs)` -> `transformers.utils.cached_file(...,
  _raise_exceptions_for_missing_entries=False)` (None for an optional file a local folder or repo lacks) ->
  modeling_hydra._load_tree_tuning, modeling_hydra._load_generation_config,
  reference_checkpoints.read_reference_checkpoint.
* `drop_gguf_model_name(config)` -> the `_model_name_or_path` attribute transformers' GGUF loader puts on a config
  (`integrations.ggml.GGUF_CONFIG_MAPPING["general"]["name"]`) -> assets._plain_model.
* `prompt_ignore_lengths(processor)` / `with_prompt_ignore_lengths(processor, lengths)` -> the per-row tensor that
  `generate` (not the user) stores in `RepetitionPenaltyLogitsProcessor.prompt_ignore_length`, and the processor's
  check that it has one row per input row -> processors._expanded_repetition_penalty.
* `mkldnn_reorder_linear_weight(weight, batch_size_hint)` -> `torch.ops.mkldnn._reorder_linear_weight`;
  `mkldnn_linear(x, packed_weight, bias)` -> `torch.ops.mkldnn._linear_pointwise`; `mkldnn_bf16_supported()` ->
  `torch.ops.mkldnn._is_mkldnn_bf16_supported` (the ops torch.compile's CPU backend emits for frozen linear
  weights; no public API prepacks a weight) -> prepack.PrepackedLinear, prepack.bfloat16_supported.
* `tensor_version(tensor)` -> `torch.Tensor._version` (the counter torch bumps at every in-place write: tells a
  cached packed copy of a weight that the weight changed) -> cpu_kernels.PanelCopyLinear.forward.
* `from_pretrained_allowing(model_class, source, extra_key, **kwargs)` -> the `transformers.modeling_utils` logger
  and the "LOAD REPORT" title of the warning `from_pretrained` logs for missing / unexpected keys (held back when
  the only findings are keys the caller reads itself) -> reference_checkpoints.load_base_model.

Overrides that stay in their class (a subclass must define the private name itself; tests/test_compat.py checks
that the hooked name still exists, with the parameters the override relies on):

* `HydraForCausalLM._get_candidate_generator` (modeling_hydra.py) overrides `GenerationMixin._get_candidate_generator`,
  which `_assisted_decoding` calls with keyword arguments; it reads `generation_config` and `logits_processor`.
  `HydraCandidateGenerator` (assisted.py) sets `requires_model_outputs` / `model_kwargs_overrides`, which
  `_assisted_decoding` reads from the candidate generator (public `CandidateGenerator` attributes, checked too).
* `HydraForCausalLM._init_weights(module)` (modeling_hydra.py) overrides `PreTrainedModel._init_weights`, which
  `post_init` and loading call per module: a no-op, the heads initialise themselves.
* `HydraForCausalLM._supports_sdpa = True` (modeling_hydra.py): `PreTrainedModel`'s class flag that lets the
  wrapper's config run sdpa.
* `PrepackedLinear._apply(fn, recurse)` (prepack.py) and `PanelLinear._apply(fn, recurse)` (cpu_kernels.py)
  override `torch.nn.Module._apply`, through which `.to()`, `.half()`, `.cuda()` ... reach every module.

Not here: `hf_hydra.cache_name` handles a PUBLIC rename (the cache's forward argument and output field,
`past_key_values` -> `cache` in 5.24); it stays its own module with its own test (tests/test_cache_name.py).
`DynamicCache.layers` and `DynamicLayer.keys` / `.values` (verification.py) are public attributes.

This module imports only the standard library, torch and transformers (no hf_hydra module: no import cycles).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.generation import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteriaList
from transformers.utils import ModelOutput, cached_file

# ------------------------------------------------------------------------------------------------ transformers


def attn_implementation(config: PretrainedConfig) -> str | None:
    """The attention implementation a model built from `config` runs ("eager", "sdpa", a registered name...).

    Reads the private `config._attn_implementation`: transformers resolves `attn_implementation=` (and
    `set_attn_implementation`) into it, and offers no public getter."""
    return config._attn_implementation


def run_assisted_decoding(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    **model_kwargs,
) -> torch.LongTensor | ModelOutput:
    """transformers' own assisted-decoding loop on `model`, with the candidate generator that
    `model._get_candidate_generator` returns (HydraForCausalLM: the heads).

    Calls the private `GenerationMixin._assisted_decoding`: `generate` runs it only for an `assistant_model` or
    prompt lookup, and has no public way to run it with another drafter."""
    return GenerationMixin._assisted_decoding(
        model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs
    )


def keep_hydra_generation_fields(generation_config: GenerationConfig) -> None:
    """Mark `generation_config` (in place) as not derived from a model config, so that it keeps its custom
    fields (`hydra_tree`, `hydra_acceptance`, `hydra_sources`) when saved and loaded again.

    Sets the private `GenerationConfig._from_model_config` to False: a config saved with it true is rebuilt
    from its model-config fields on loading, and custom fields are dropped."""
    generation_config._from_model_config = False


def cached_file_or_none(source: str, name: str, **hub_kwargs) -> str | None:
    """The local path of file `name` of `source` (a folder or Hub repo), downloaded if needed; None when the
    folder or repo has no such file. Other failures (no network, a mirror's 401) raise OSError as before.

    Passes the private keyword `_raise_exceptions_for_missing_entries=False` to `transformers.utils.cached_file`:
    its public form raises for a missing file, and optional files (tree_tuning.json, generation_config.json,
    reference checkpoints' weights) are allowed to be missing."""
    return cached_file(source, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)


# the config attribute transformers' GGUF loader writes GGUF's `general.name` to
GGUF_MODEL_NAME_ATTRIBUTE = "_model_name_or_path"


def drop_gguf_model_name(config: PretrainedConfig) -> None:
    """Remove (in place) the stray name a GGUF file's `general.name` leaves on a config loaded from it
    ("Smollm2 135M 8k Lc100K Mix1 Ep2"), so that a converted model saves a clean config.json.

    Deletes the private `_model_name_or_path` attribute, named by transformers' GGUF loader
    (`transformers.integrations.ggml.GGUF_CONFIG_MAPPING["general"]["name"]`)."""
    if hasattr(config, GGUF_MODEL_NAME_ATTRIBUTE):
        delattr(config, GGUF_MODEL_NAME_ATTRIBUTE)


def prompt_ignore_lengths(processor: RepetitionPenaltyLogitsProcessor) -> torch.Tensor | None:
    """The (B,) tensor of prompt lengths (the prompts' padding) that `generate` builds a repetition-penalty
    processor with, one row per input row; None when the processor has none or an int.

    Reads the processor's `prompt_ignore_length` attribute. `generate` (its own bookkeeping, undocumented) builds
    the processor with the prompts' padding lengths as a (B,) tensor when the attention mask masks a prompt
    position, which the processor then requires to have one row per input row."""
    ignore = getattr(processor, "prompt_ignore_length", None)
    return ignore if isinstance(ignore, torch.Tensor) else None


def with_prompt_ignore_lengths(
    processor: RepetitionPenaltyLogitsProcessor, lengths: torch.Tensor
) -> RepetitionPenaltyLogitsProcessor:
    """A shallow copy of `processor` for a batch of `lengths.shape[0]` rows (`lengths`: (rows,) as
    `prompt_ignore_lengths` returns them, e.g. expanded from one prompt to many prefixes of it).

    Writes `prompt_ignore_length` on the copy: the processor stores the value given to its constructor there
    and reads it on every call."""
    expanded = copy.copy(processor)
    expanded.prompt_ignore_length = lengths
    return expanded


# ------------------------------------------------------------------------------------------------ torch


def mkldnn_reorder_linear_weight(weight: torch.Tensor, batch_size_hint: int) -> torch.Tensor:
    """A linear layer's weight (out, in) reordered into oneDNN's blocked layout for inputs of about
    `batch_size_hint` rows: an opaque tensor for `mkldnn_linear` only.

    Calls the private op `torch.ops.mkldnn._reorder_linear_weight` (what torch.compile's CPU backend emits for
    frozen linear weights): no public torch API prepacks a weight."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size_hint)


def mkldnn_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T + bias` with a weight from `mkldnn_reorder_linear_weight`; x: (..., in) -> (..., out), all in
    the weight's dtype.

    Calls the private op `torch.ops.mkldnn._linear_pointwise` with no fused pointwise op ("none")."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


def mkldnn_bf16_supported() -> bool:
    """Whether torch has oneDNN and oneDNN computes bfloat16 on this CPU (AVX-512 or newer).

    Calls the private op `torch.ops.mkldnn._is_mkldnn_bf16_supported` (after the public
    `torch.backends.mkldnn.is_available()`)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def tensor_version(tensor: torch.Tensor) -> int:
    """A counter that changes whenever `tensor`'s data is written in place (optimizer steps, `copy_`,
    `load_state_dict`); with `data_ptr()` it tells whether a copy made from the tensor is stale.

    Reads the private `Tensor._version` (autograd's version counter; no public equivalent)."""
    return tensor._version


# ------------------------------------------------------------------------------------------------ load reports

# the logger transformers' `from_pretrained` writes its load report (missing / unexpected / mismatched keys) to,
# and the title that starts the report
LOAD_REPORT_LOGGER = "transformers.modeling_utils"
LOAD_REPORT_TITLE = "LOAD REPORT"


def from_pretrained_allowing(
    model_class: type[PreTrainedModel], source: str, extra_key: Callable[[str], bool], **kwargs
) -> PreTrainedModel:
    """`model_class.from_pretrained(source, **kwargs)` without transformers' load-report warning when all it
    reports is checkpoint keys the model has no place for and `extra_key(key)` accepts (tensors the caller reads
    itself); any other finding (a missing, mismatched or other unexpected key, an error) logs the report as usual.

    Holds the report back with a filter on transformers' private `transformers.modeling_utils` logger, recognised
    by its "LOAD REPORT" title: no public option silences it for chosen keys (the class attribute
    `_keys_to_ignore_on_load_unexpected` would need a subclass). The findings come from the public
    `output_loading_info=True`."""
    report_logger = logging.getLogger(LOAD_REPORT_LOGGER)
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if LOAD_REPORT_TITLE in record.getMessage():
            held.append(record)
            return False
        return True

    info = None
    report_logger.addFilter(hold)
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        report_logger.removeFilter(hold)
        only_extra = (
            info is not None and not info["missing_keys"] and not info["mismatched_keys"]
            and not info["error_msgs"] and all(extra_key(key) for key in info["unexpected_keys"])
        )
        for record in () if only_extra else held:
            report_logger.handle(record)
    return model
