"""Tests for hf_hydra._compat: every private transformers / torch thing hf_hydra uses still exists and behaves as
hf_hydra assumes, on the installed versions. A failure names the versions and what changed: fix the seam function
in hf_hydra/_compat.py (or the override named in its docstring), not its callers.

Tiny random models only, no network.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.generation import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.utils import cached_file

from hf_hydra import _compat
from hf_hydra.modeling_hydra import HydraForCausalLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VERSIONS = f"transformers {transformers.__version__}, torch {torch.__version__}"


def changed(what: str) -> str:
    """An assertion message: the installed versions, what no longer holds, where to fix it."""
    return f"{VERSIONS}: {what}. Update the seam in hf_hydra/_compat.py (see its module docstring)."


def _parameters(function: Callable) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(function).parameters)


# ------------------------------------------------------------------------------ the pin: what CI tests


def test_the_transformers_pin_admits_only_the_tested_minor_version() -> None:
    """CI (.ci/run) installs the newest transformers the pin allows and tests nothing else, so the pin must not
    admit another minor version: pip must not install a transformers that no CI run has tested."""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pin = SpecifierSet(re.search(r'^\s*"transformers([^"]*)"', pyproject, re.MULTILINE).group(1))
    installed = Version(transformers.__version__)
    major, minor = installed.major, installed.minor
    assert installed in pin, f"transformers {installed} is installed, outside the pin {pin} in pyproject.toml"
    assert Version(f"{major}.{minor}.0") in pin, f"the pin {pin} refuses transformers {major}.{minor}.0"
    others = [f"{major - 1}.999.0", f"{major}.{minor + 1}.0"] + ([f"{major}.{minor - 1}.99"] if minor else [])
    assert not [version for version in others if Version(version) in pin], (
        f"the pin {pin} admits another minor version than the {major}.{minor} CI tests: narrow it in pyproject.toml "
        "(or make .ci/run test every minor version it admits)"
    )


# ------------------------------------------------------------------------------ attn_implementation


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_is_what_the_model_was_loaded_with(
    tiny_model_factory: Callable[..., PreTrainedModel], implementation: str
) -> None:
    model = tiny_model_factory(attn_implementation=implementation)
    assert _compat.attn_implementation(model.config) == implementation, changed(
        f"config._attn_implementation is {_compat.attn_implementation(model.config)!r} for a model loaded with "
        f"attn_implementation={implementation!r}"
    )


def test_attn_implementation_follows_set_attn_implementation(
    tiny_model_factory: Callable[..., PreTrainedModel],
) -> None:
    model = tiny_model_factory(attn_implementation="sdpa")
    model.set_attn_implementation("eager")
    assert _compat.attn_implementation(model.config) == "eager", changed(
        "config._attn_implementation no longer follows model.set_attn_implementation"
    )


# ------------------------------------------------------------------------------ run_assisted_decoding and the
# _get_candidate_generator override


def test_assisted_decoding_takes_the_arguments_we_pass() -> None:
    assert hasattr(GenerationMixin, "_assisted_decoding"), changed("GenerationMixin._assisted_decoding is gone")
    parameters = _parameters(GenerationMixin._assisted_decoding)
    leading = list(parameters)[:5]
    expected = ["self", "input_ids", "logits_processor", "stopping_criteria", "generation_config"]
    assert leading == expected, changed(
        f"GenerationMixin._assisted_decoding's leading parameters are {leading}, run_assisted_decoding passes "
        f"{expected} positionally"
    )
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()), changed(
        "GenerationMixin._assisted_decoding no longer takes **model_kwargs (the cache, attention mask...)"
    )


def test_get_candidate_generator_hook_takes_the_arguments_the_override_reads() -> None:
    assert hasattr(GenerationMixin, "_get_candidate_generator"), changed(
        "GenerationMixin._get_candidate_generator is gone: HydraForCausalLM's override is never called"
    )
    parameters = _parameters(GenerationMixin._get_candidate_generator)
    for name in ("generation_config", "logits_processor"):
        assert name in parameters, changed(
            f"GenerationMixin._get_candidate_generator has no {name!r} parameter; "
            "HydraForCausalLM._get_candidate_generator reads it from its keyword arguments"
        )
    for name in ("requires_model_outputs",):
        assert hasattr(CandidateGenerator, name), changed(
            f"CandidateGenerator.{name} is gone: HydraCandidateGenerator sets it to get the verifier's outputs"
        )


@torch.no_grad()
def test_run_assisted_decoding_drafts_with_the_heads(
    tiny_model_factory: Callable[..., PreTrainedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The assisted loop asks our override for its drafter (by keyword), hands it the verifier's hidden states,
    and gives plain greedy's tokens."""
    base = tiny_model_factory()
    torch.manual_seed(100)
    model = HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=3).eval()
    generators = []
    hook = HydraForCausalLM._get_candidate_generator

    def recording_hook(self, *args, **kwargs):
        generators.append(hook(self, *args, **kwargs))
        return generators[-1]

    monkeypatch.setattr(HydraForCausalLM, "_get_candidate_generator", recording_hook)
    prompt = torch.tensor([[5, 17, 3, 99, 42, 8]])
    plain = base.generate(prompt, do_sample=False, max_new_tokens=12)
    assisted = model.generate(prompt, speculative="assisted", max_new_tokens=12)
    assert len(generators) == 1, changed(
        "GenerationMixin._assisted_decoding did not call self._get_candidate_generator once: "
        "HydraForCausalLM's override is not the drafter"
    )
    assert generators[0].num_verified > 0, changed(
        "the assisted loop never gave the candidate generator the verifier's hidden states "
        "(CandidateGenerator.requires_model_outputs / model_kwargs_overrides)"
    )
    assert torch.equal(assisted, plain), changed("GenerationMixin._assisted_decoding no longer gives greedy's tokens")


# ------------------------------------------------------------------------------ overrides that stay in their class


def test_init_weights_hook_takes_one_module() -> None:
    assert hasattr(PreTrainedModel, "_init_weights"), changed(
        "PreTrainedModel._init_weights is gone: HydraForCausalLM's no-op override no longer keeps post_init "
        "from re-initialising the heads"
    )
    assert list(_parameters(PreTrainedModel._init_weights)) == ["self", "module"], changed(
        "PreTrainedModel._init_weights no longer takes (self, module), as HydraForCausalLM._init_weights does"
    )


def test_supports_sdpa_flag_exists() -> None:
    assert isinstance(getattr(PreTrainedModel, "_supports_sdpa", None), bool), changed(
        "PreTrainedModel._supports_sdpa is no longer a class flag: HydraForCausalLM._supports_sdpa = True does "
        "nothing"
    )


def test_module_apply_hook_sees_to_and_casts() -> None:
    """PrepackedLinear._apply and PanelLinear._apply refuse moves and casts; torch must route them there."""
    assert "fn" in _parameters(nn.Module._apply) and "recurse" in _parameters(nn.Module._apply), changed(
        "torch.nn.Module._apply no longer takes (fn, recurse), as the packed layers' overrides do"
    )
    seen = []

    class Recording(nn.Linear):
        def _apply(self, fn, recurse: bool = True):
            seen.append(fn(torch.empty(0)).dtype)
            return self

    nn.Sequential(Recording(2, 2)).to(torch.float64)
    assert seen == [torch.float64], changed("Module.to() no longer reaches a child's _apply override")


# ------------------------------------------------------------------------------ keep_hydra_generation_fields


def _reloaded(generation_config: GenerationConfig, folder: Path) -> GenerationConfig:
    generation_config.save_pretrained(folder)
    return GenerationConfig.from_pretrained(folder)


def test_from_model_config_is_what_drops_custom_fields(
    tiny_model_factory: Callable[..., PreTrainedModel], tmp_path: Path
) -> None:
    model = tiny_model_factory()
    derived = GenerationConfig.from_model_config(model.config)
    assert getattr(derived, "_from_model_config", None) is True, changed(
        "GenerationConfig.from_model_config no longer sets _from_model_config=True"
    )
    derived.hydra_tree = [[0], [0, 0]]
    dropped = _reloaded(derived, tmp_path / "derived")
    assert json.loads((tmp_path / "derived" / "generation_config.json").read_text())["hydra_tree"] == [[0], [0, 0]]
    assert getattr(dropped, "hydra_tree", None) is None, changed(
        "a generation config saved with _from_model_config=true keeps its custom fields on loading now: "
        "keep_hydra_generation_fields may no longer be needed"
    )
    _compat.keep_hydra_generation_fields(derived)
    kept = _reloaded(derived, tmp_path / "kept")
    assert getattr(kept, "hydra_tree", None) == [[0], [0, 0]], changed(
        "setting GenerationConfig._from_model_config = False no longer keeps custom fields (hydra_*) on loading"
    )


# ------------------------------------------------------------------------------ cached_file_or_none


def test_cached_file_or_none(tmp_path: Path) -> None:
    (tmp_path / "present.json").write_text("{}")
    found = _compat.cached_file_or_none(str(tmp_path), "present.json")
    assert found is not None and Path(found) == tmp_path / "present.json", changed(
        f"cached_file(..., _raise_exceptions_for_missing_entries=False) returned {found!r} for a present file"
    )
    missing = _compat.cached_file_or_none(str(tmp_path), "missing.json")
    assert missing is None, changed(
        f"cached_file(..., _raise_exceptions_for_missing_entries=False) returned {missing!r}, not None, "
        "for a file the folder lacks"
    )
    with pytest.raises(OSError):  # what the private keyword is for
        cached_file(str(tmp_path), "missing.json")


def test_cached_files_still_takes_the_private_keyword() -> None:
    from transformers.utils.hub import cached_files

    assert "_raise_exceptions_for_missing_entries" in _parameters(cached_files), changed(
        "transformers.utils.hub.cached_files has no _raise_exceptions_for_missing_entries parameter"
    )


# ------------------------------------------------------------------------------ drop_gguf_model_name


def test_gguf_loader_writes_the_name_we_drop(tiny_model_factory: Callable[..., PreTrainedModel]) -> None:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    written = GGUF_CONFIG_MAPPING.get("general", {}).get("name")
    assert written == _compat.GGUF_MODEL_NAME_ATTRIBUTE, changed(
        f"transformers' GGUF loader writes general.name to {written!r}, not "
        f"{_compat.GGUF_MODEL_NAME_ATTRIBUTE!r}: drop_gguf_model_name drops nothing"
    )
    config = tiny_model_factory().config
    setattr(config, _compat.GGUF_MODEL_NAME_ATTRIBUTE, "Smollm2 135M")
    _compat.drop_gguf_model_name(config)
    assert not hasattr(config, _compat.GGUF_MODEL_NAME_ATTRIBUTE)
    assert _compat.GGUF_MODEL_NAME_ATTRIBUTE not in config.to_dict(), changed("a deleted config attribute is saved")
    _compat.drop_gguf_model_name(config)  # nothing to drop: no error


# ------------------------------------------------------------------------------ prompt_ignore_lengths


def _processors_generate_builds(model: PreTrainedModel, prompt: torch.Tensor, **kwargs) -> LogitsProcessorList:
    built = []

    def capture(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        built.append(logits_processor)
        return input_ids

    model.generate(prompt, custom_generate=capture, max_new_tokens=2, **kwargs)
    return built[0]


def test_generate_builds_repetition_penalty_with_per_row_prompt_lengths(
    tiny_model_factory: Callable[..., PreTrainedModel],
) -> None:
    prompt = torch.tensor([[5, 17, 3, 99]])
    padded = torch.tensor([[0, 1, 1, 1]])  # one padding position (with no masked position generate passes None)
    model = tiny_model_factory()
    processors = _processors_generate_builds(model, prompt, attention_mask=padded, repetition_penalty=1.3)
    penalties = [p for p in processors if type(p) is RepetitionPenaltyLogitsProcessor]
    assert len(penalties) == 1, changed(f"generate(repetition_penalty=1.3) built {processors}")
    lengths = _compat.prompt_ignore_lengths(penalties[0])
    assert lengths is not None and lengths.tolist() == [1], changed(
        "generate (prompt with one padding position) no longer builds RepetitionPenaltyLogitsProcessor with the "
        "(batch,) tensor of padding lengths as prompt_ignore_length "
        f"(got {getattr(penalties[0], 'prompt_ignore_length', '<no attribute>')!r})"
    )


def test_with_prompt_ignore_lengths_scores_rows_as_one_at_a_time() -> None:
    processor = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.tensor([2]))
    prefixes = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 3, 3]])
    scores = torch.randn(3, 8)
    with pytest.raises(ValueError):  # what the expansion is for: one row of lengths, three rows of prefixes
        processor(prefixes, scores.clone())
    expanded = _compat.with_prompt_ignore_lengths(processor, _compat.prompt_ignore_lengths(processor).expand(3))
    assert _compat.prompt_ignore_lengths(processor).shape == (1,), changed("the copy shares the original's lengths")
    together = expanded(prefixes, scores.clone())
    one_by_one = torch.cat([processor(prefixes[i : i + 1], scores[i : i + 1].clone()) for i in range(3)])
    assert torch.equal(together, one_by_one), changed(
        "RepetitionPenaltyLogitsProcessor with an expanded prompt_ignore_length no longer scores each row as "
        "the one-row processor does"
    )


# ------------------------------------------------------------------------------ torch: oneDNN ops, Tensor._version

needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_mkldnn
@pytest.mark.parametrize("with_bias", [True, False])
def test_mkldnn_packed_linear_equals_linear(with_bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, bias=with_bias)
    x = torch.randn(3, 32)
    try:
        packed = _compat.mkldnn_reorder_linear_weight(linear.weight.detach(), 8)
        out = _compat.mkldnn_linear(x, packed, None if linear.bias is None else linear.bias.detach())
    except (AttributeError, RuntimeError) as error:
        pytest.fail(changed(f"torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise failed: {error}"))
    torch.testing.assert_close(
        out, linear(x).detach(), msg=lambda m: changed(f"the prepacked oneDNN linear no longer equals nn.Linear: {m}")
    )


def test_mkldnn_bf16_supported_answers_a_bool() -> None:
    try:
        supported = _compat.mkldnn_bf16_supported()
    except (AttributeError, RuntimeError) as error:
        pytest.fail(changed(f"torch.ops.mkldnn._is_mkldnn_bf16_supported failed: {error}"))
    assert isinstance(supported, bool)


@needs_mkldnn
def test_mkldnn_packed_linear_computes_bfloat16_where_supported() -> None:
    if not _compat.mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bfloat16 kernels")
    torch.manual_seed(0)
    weight, bias, x = torch.randn(16, 32), torch.randn(16), torch.randn(3, 32)
    out = _compat.mkldnn_linear(
        x.bfloat16(), _compat.mkldnn_reorder_linear_weight(weight.bfloat16(), 8), bias.bfloat16()
    )
    assert out.dtype == torch.bfloat16, changed(f"a bfloat16 prepacked linear returned {out.dtype}")
    torch.testing.assert_close(out.float(), torch.nn.functional.linear(x, weight, bias), atol=0.5, rtol=0.05)


def test_tensor_version_changes_on_in_place_writes() -> None:
    linear = nn.Linear(4, 4)
    before = _compat.tensor_version(linear.weight)
    assert isinstance(before, int), changed(f"Tensor._version is {before!r}, not an int")
    with torch.no_grad():
        linear.weight.add_(1.0)
    after_add = _compat.tensor_version(linear.weight)
    linear.load_state_dict({"weight": torch.zeros(4, 4), "bias": torch.zeros(4)})
    after_load = _compat.tensor_version(linear.weight)
    assert before < after_add < after_load, changed(
        f"Tensor._version went {before} -> {after_add} (add_) -> {after_load} (load_state_dict): it no longer "
        "tells a packed copy of a weight that the weight changed"
    )
