"""Tests for hf_hydra.prepack: packed linear layers (oneDNN's, or the AVX2 panel kernels) for CPU inference.

A prepacked base must compute what the stock one computes (up to float rounding), prepacked heads what the
stock heads compute (up to bfloat16 rounding), and speculative decoding on them must still give plain
greedy's tokens exactly, on every tiny architecture and head arch, with either kernel.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from hf_hydra import HydraForCausalLM
from hf_hydra.cpu_kernels import PanelCopyLinear, PanelLinear, kernel_library
from hf_hydra.heads import DraftHeads
from hf_hydra.prepack import PrepackedLinear, PrepackReport, bfloat16_supported, prepack_linear_layers

ARCHS = ("llama", "qwen2", "mistral", "gemma")  # qwen2's q/k/v projections have biases
HEAD_ARCHS = ("medusa", "hydra", "hydra++")
VOCAB = 16
DRAFT_IDS = torch.tensor([3, 1, 4, 15, 9, 2, 6, 5])

needs_bfloat16 = pytest.mark.skipif(not bfloat16_supported(), reason="oneDNN has no bfloat16 kernels on this CPU")
KERNELS = ["onednn", pytest.param("panel", marks=pytest.mark.skipif(
    kernel_library().library is None, reason=f"no panel kernels here: {kernel_library().reason}"
))]
PACKED_TYPES = {"onednn": PrepackedLinear, "panel": PanelLinear}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hydra(factory: Callable[..., PreTrainedModel], arch: str = "llama", head_arch: str = "hydra") -> HydraForCausalLM:
    overrides = {"tie_word_embeddings": False} if arch == "gemma" else {}  # as in test_decoding: untied Gemma
    base = factory(arch, seed=0, vocab_size=VOCAB, **overrides)
    torch.manual_seed(100)
    return HydraForCausalLM.from_base(base, head_arch=head_arch, num_heads=4).eval()


def _trained_looking(model: HydraForCausalLM) -> HydraForCausalLM:
    """Random non-zero head weights (fresh blocks start at zero), so prepacking changes real arithmetic."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.heads.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def _prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (1, n), generator=generator) for n in (1, 5, 11)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 64), (1, 7, 64), (2, 1, 64)])
def test_prepacked_linear_computes_the_linear(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 40, bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = linear(x)
        got = PrepackedLinear.from_linear(linear)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_bfloat16
@pytest.mark.parametrize("shape", [(3, 64), (1, 7, 64)])
def test_bfloat16_prepacked_linear_computes_the_bfloat16_rounded_linear(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    x = torch.randn(shape)
    with torch.no_grad():
        rounded = [t.bfloat16().float() for t in (x, linear.weight, linear.bias)]
        expected = nn.functional.linear(*rounded)  # float32 arithmetic on bfloat16-rounded operands
        got = PrepackedLinear.from_linear(linear, compute_dtype=torch.bfloat16)(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)  # the output itself is rounded to bfloat16


@pytest.mark.parametrize("kernel", KERNELS)
def test_report_counts_every_linear_and_replaces_them_all(tiny_model_factory, kernel: str) -> None:
    model = _hydra(tiny_model_factory, "qwen2")
    linears = [m for m in model.base_lm.modules() if type(m) is nn.Linear]
    head_parameters = dict(model.heads.named_parameters())
    report = model.prepack_base(kernel=kernel)
    parameters = sum(m.weight.numel() for m in linears)
    assert report == PrepackReport(layers=len(linears), parameters=parameters, kernel=kernel)
    assert model.base_prepack == report
    assert not any(type(m) is nn.Linear for m in model.base_lm.modules())
    assert sum(isinstance(m, PACKED_TYPES[kernel]) for m in model.base_lm.modules()) == len(linears)
    # the heads keep their parameters (the very tensors: they train and save as before), as nn.Linear layers
    after = dict(model.heads.named_parameters())
    assert after.keys() == head_parameters.keys()
    assert all(after[name] is parameter for name, parameter in head_parameters.items())
    assert all(type(m) is not PrepackedLinear for m in model.heads.heads.modules())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("tree", ["chain", "cpu_small_11", "mc_sim_7b_63"])
@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
@pytest.mark.parametrize("arch", ARCHS)
def test_speculative_on_a_prepacked_base_equals_stock_greedy(tiny_model_factory, arch, head_arch, tree, kernel):
    model = _hydra(tiny_model_factory, arch, head_arch)
    stock = copy.deepcopy(model.base_lm)
    model.prepack_base(kernel=kernel)
    for prompt in _prompts():
        expected = stock.generate(prompt, do_sample=False, max_new_tokens=24)
        fast = model.generate(prompt, speculative=True, tree=tree, do_sample=False, max_new_tokens=24)
        plain = model.generate(prompt, do_sample=False, max_new_tokens=24)
        assert torch.equal(fast, expected)
        assert torch.equal(plain, expected)


@pytest.mark.parametrize("kernel", KERNELS)
def test_assisted_mode_on_a_prepacked_base_equals_stock_greedy(tiny_model_factory, kernel: str) -> None:
    model = _hydra(tiny_model_factory)
    stock = copy.deepcopy(model.base_lm)
    model.prepack_base(kernel=kernel)
    for prompt in _prompts():
        expected = stock.generate(prompt, do_sample=False, max_new_tokens=24)
        assert torch.equal(model.generate(prompt, speculative="assisted", do_sample=False, max_new_tokens=24), expected)


def test_heads_save_the_same_after_prepacking(tiny_model_factory, tmp_path: Path) -> None:
    model = _hydra(tiny_model_factory, head_arch="hydra++")
    model.save_pretrained(tmp_path / "before")
    model.prepack_base()
    model.save_pretrained(tmp_path / "after")
    before, after = (tmp_path / folder / "model.safetensors" for folder in ("before", "after"))
    assert before.read_bytes() == after.read_bytes()


def _heads_logits(model: HydraForCausalLM, heads: DraftHeads | None = None) -> torch.Tensor:
    """Every head's logits (of `heads`, default the model's) at a few random context vectors and paths:
    (H, 3, V or K)."""
    heads = model.heads if heads is None else heads
    generator = torch.Generator().manual_seed(3)
    d = model.config.base_hidden_size
    context = torch.randn(3, d, generator=generator)
    with torch.no_grad():
        paths = [torch.randn(3, i + 1, d, generator=generator) for i in range(model.config.num_heads)]
        return torch.stack([heads(i, context, path) for i, path in enumerate(paths)])


def _with_bfloat16_weights(heads: DraftHeads) -> DraftHeads:
    """A float32 copy of `heads` whose linear weights and shared vocabulary rows are rounded to bfloat16: what
    bfloat16 drafting copies compute (their sums and biases stay float32)."""
    rounded = copy.deepcopy(heads)
    with torch.no_grad():
        for module in rounded.modules():
            if type(module) is nn.Linear:
                module.weight.copy_(module.weight.bfloat16().float())
    if rounded.shared_output_weight is not None:
        rounded.shared_output_weight = rounded.shared_output_weight.bfloat16().float()
    return rounded


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("vocab_projection", ["shared", "shared_draft_vocab"])
def test_packing_the_base_packs_the_heads_for_drafting(tiny_model_factory, tmp_path, kernel, vocab_projection):
    """The heads draft through packed copies, save the same bytes, train on the parameters and the buffer
    themselves, and a state dict loaded later (other weights, other draft rows) reaches the copies."""
    model = _shared_projection_heads(tiny_model_factory, vocab_projection, DRAFT_IDS)
    # on the panel kernels the copies hold bfloat16 weights (float32 sums); oneDNN's copy is float32
    expected = _heads_logits(model, _with_bfloat16_weights(model.heads) if kernel == "panel" else None)
    model.save_pretrained(tmp_path / "before")
    model.prepack_base(kernel=kernel)
    assert isinstance(model.heads.packed_shared_output, PACKED_TYPES[kernel])
    assert model.heads.prepacked_dtype is None  # the heads' own layers are not prepacked
    copies = [m for m in model.heads.modules() if isinstance(m, PanelCopyLinear)]
    assert (len(copies) > 0) == (kernel == "panel")  # on the panel kernels the heads draft on packed copies
    torch.testing.assert_close(_heads_logits(model), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "after")
    before, after = (tmp_path / folder / "model.safetensors" for folder in ("before", "after"))
    assert before.read_bytes() == after.read_bytes()

    d = model.config.base_hidden_size
    model.heads.train()
    model.heads(1, torch.randn(2, d), torch.randn(2, 2, d)).square().sum().backward()
    grads = [p.grad for p in model.heads.heads[1].parameters()]
    assert grads and all(g is not None and g.any() for g in grads)
    model.heads.eval()

    other = _shared_projection_heads(tiny_model_factory, vocab_projection, DRAFT_IDS.flip(0), seed=9)
    model.heads.load_state_dict(other.heads.state_dict())
    expected = _heads_logits(other, _with_bfloat16_weights(other.heads) if kernel == "panel" else None)
    torch.testing.assert_close(_heads_logits(model), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(kernel_library().library is None, reason="no panel kernels")
def test_float32_drafting_copies_compute_the_stock_logits(tiny_model_factory):
    model = _shared_projection_heads(tiny_model_factory, "shared_draft_vocab", DRAFT_IDS)
    expected = _heads_logits(model)
    model.heads.pack_for_drafting("panel", torch.float32)
    assert all(m.copy_dtype is torch.float32 for m in model.heads.modules() if isinstance(m, PanelCopyLinear))
    torch.testing.assert_close(_heads_logits(model), expected, rtol=1e-5, atol=1e-5)


def _shared_projection_heads(factory, vocab_projection: str, draft_ids: torch.Tensor, seed: int = 0):
    base = factory("llama", seed=0, vocab_size=VOCAB)
    draft = {"draft_token_ids": draft_ids} if "draft" in vocab_projection else {}
    torch.manual_seed(seed)
    model = HydraForCausalLM.from_base(
        base, head_arch="hydra++", num_heads=3, vocab_projection=vocab_projection, **draft
    )
    return _trained_looking(model).eval()


@pytest.mark.parametrize("compute_dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bfloat16)])
@pytest.mark.parametrize("vocab_projection", ["per_head", "shared", "draft_vocab", "shared_draft_vocab"])
@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_prepacked_heads_compute_the_stock_logits(tiny_model_factory, head_arch, vocab_projection, compute_dtype):
    base = tiny_model_factory("llama", seed=0, vocab_size=VOCAB)
    draft = {"draft_token_ids": DRAFT_IDS} if "draft" in vocab_projection else {}
    model = _trained_looking(
        HydraForCausalLM.from_base(base, head_arch=head_arch, num_heads=3, vocab_projection=vocab_projection, **draft)
    ).eval()
    linears = [m for m in model.heads.modules() if type(m) is nn.Linear]
    shared = model.heads.shared_output_weight.numel() if vocab_projection.startswith("shared") else 0
    expected = _heads_logits(model)
    report = model.prepack_heads(compute_dtype)
    assert report == PrepackReport(
        layers=len(linears) + (shared > 0),
        parameters=sum(m.weight.numel() for m in linears) + shared,
        compute_dtype=compute_dtype,
    )
    assert model.heads.prepacked_dtype == compute_dtype
    assert not any(type(m) is nn.Linear for m in model.heads.modules())
    tolerance = 1e-5 if compute_dtype == torch.float32 else 0.1  # bfloat16: 8-bit mantissas, |logits| ~ 1-10
    torch.testing.assert_close(_heads_logits(model), expected, rtol=tolerance, atol=tolerance)


@needs_bfloat16
@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
@pytest.mark.parametrize("arch", ARCHS)
def test_speculative_with_prepacked_base_and_bfloat16_heads_equals_stock_greedy(tiny_model_factory, arch, head_arch):
    """The CPU fast path of `--prepack`: bfloat16 drafts, float32 verification, plain greedy's tokens."""
    model = _trained_looking(_hydra(tiny_model_factory, arch, head_arch))
    stock = copy.deepcopy(model.base_lm)
    model.prepack_base()
    model.prepack_heads(torch.bfloat16)
    for prompt in _prompts():
        expected = stock.generate(prompt, do_sample=False, max_new_tokens=24)
        tree = model.generate(prompt, speculative=True, tree="cpu_small_11", do_sample=False, max_new_tokens=24)
        chain = model.generate(prompt, speculative="assisted", do_sample=False, max_new_tokens=24)
        assert torch.equal(tree, expected)
        assert torch.equal(chain, expected)


def test_prepacked_heads_refuse_to_save(tiny_model_factory, tmp_path: Path) -> None:
    model = _hydra(tiny_model_factory, head_arch="hydra++")
    model.prepack_heads(torch.float32)
    with pytest.raises(ValueError, match="save them before prepacking"):
        model.save_pretrained(tmp_path / "packed")
    assert not (tmp_path / "packed" / "model.safetensors").exists()


def test_prepacking_heads_in_float16_is_a_value_error(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        model.prepack_heads(torch.float16)
    assert model.heads.prepacked_dtype is None  # nothing was replaced


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes_are_a_value_error(tiny_model_factory, dtype: torch.dtype) -> None:
    model = _hydra(tiny_model_factory).to(dtype)
    with pytest.raises(ValueError, match="float32"):
        model.prepack_base()


@pytest.mark.parametrize("kernel", KERNELS)
def test_prepacking_twice_is_a_value_error(tiny_model_factory, kernel: str) -> None:
    model = _hydra(tiny_model_factory)
    model.prepack_base(kernel=kernel)
    with pytest.raises(ValueError, match="already prepacked"):
        model.prepack_base(kernel=kernel)


def test_an_unknown_kernel_is_a_value_error(tiny_model_factory) -> None:
    with pytest.raises(ValueError, match="kernel must be one of"):
        _hydra(tiny_model_factory).prepack_base(kernel="mkl")


def test_a_module_without_linears_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no nn.Linear"):
        prepack_linear_layers(nn.Sequential(nn.ReLU()))


def test_training_through_a_prepacked_layer_is_a_runtime_error() -> None:
    layer = PrepackedLinear.from_linear(nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match="inference only"):
        layer(torch.randn(2, 8, requires_grad=True))


def test_moving_casting_or_copying_a_prepacked_layer_is_a_clear_error(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory)
    model.prepack_base(kernel="onednn")
    model.to("cpu")  # a no-op is fine
    model.float()
    with pytest.raises(RuntimeError, match="cannot move or change dtype"):
        model.half()
    with pytest.raises(RuntimeError, match="copy the model before prepacking"):
        copy.deepcopy(model.base_lm)


def test_from_pretrained_packs_only_a_base_it_loads_unless_asked(tiny_model_factory, tmp_path: Path) -> None:
    model = _hydra(tiny_model_factory)
    model.base_lm.save_pretrained(tmp_path / "base")
    model.config.base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "heads")
    assert HydraForCausalLM.from_pretrained(tmp_path / "heads").base_prepack is not None  # loaded here: packed
    passed = HydraForCausalLM.from_pretrained(tmp_path / "heads", base_model=model.base_lm)
    assert passed.base_prepack is None  # yours: left as it is
    assert HydraForCausalLM.from_pretrained(tmp_path / "heads", prepack=False).base_prepack is None
    bfloat16 = HydraForCausalLM.from_pretrained(tmp_path / "heads", dtype=torch.bfloat16)
    assert bfloat16.base_prepack is None  # not float32: not packable, not packed
    with pytest.raises(ValueError, match="float32"):
        HydraForCausalLM.from_pretrained(tmp_path / "heads", prepack=True, dtype=torch.bfloat16)
