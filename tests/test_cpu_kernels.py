"""Tests for hf_hydra.cpu_kernels: the panel kernels compute `nn.Linear` up to float rounding, and the AVX2 and
AVX-512 kernels agree bit for bit (where this CPU runs both).

Odd sizes (partial panels, row counts that split into uneven groups, inner sizes that are not multiples of 8),
biases, batched and non-contiguous inputs, one thread and two, the tied lm_head of a real architecture; and the
build: cached per machine, and a clear reason (with torch's kernels kept) where it cannot be built.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_hydra import cpu_kernels
from hf_hydra.cpu_kernels import PANEL, PanelCopyLinear, PanelLinear, kernel_library, pack_panels
from hf_hydra.prepack import choose_kernel, prepack_linear_layers
from hf_hydra.roofline import describe_cpu

pytestmark = pytest.mark.skipif(kernel_library().library is None, reason=f"no panel kernels: {kernel_library().reason}")


def _check(linear: nn.Linear, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = linear(x)
        got = PanelLinear.from_linear(linear)(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    scale = max(1.0, linear.in_features**0.5)  # an in-order float32 sum against MKL's blocked one
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("out_features", [1, 15, PANEL, 17, 40, 200])
@pytest.mark.parametrize("in_features", [1, 7, 64, 577])
def test_odd_sizes(out_features: int, in_features: int) -> None:
    torch.manual_seed(out_features * 1000 + in_features)
    _check(nn.Linear(in_features, out_features), torch.randn(5, in_features))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 32, 300])
def test_every_row_count(rows: int) -> None:
    torch.manual_seed(rows)
    _check(nn.Linear(96, 48, bias=False), torch.randn(rows, 96))


@pytest.mark.parametrize("rows", [601, 700])
def test_rows_beyond_the_limit_take_torchs_kernels_on_the_panels(rows: int, monkeypatch) -> None:
    """Where the panel kernel has a row limit (AVX2: 600, a long prompt's prefill), more rows go through one matmul
    on the unpacked weight; on this CPU too, with the limit set."""
    torch.manual_seed(rows)
    linear = nn.Linear(96, 45)
    layer = PanelLinear.from_linear(linear)
    layer.max_panel_rows = cpu_kernels.PANEL_ROW_LIMITS["avx2"]
    monkeypatch.setattr(layer, "_panel_rows", lambda *args: pytest.fail("the panel kernel ran"))
    x = torch.randn(rows, 96)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-4)


def test_the_row_limit_is_the_instruction_sets() -> None:
    layer = PanelLinear.from_linear(nn.Linear(8, 8))
    assert layer.max_panel_rows == cpu_kernels.PANEL_ROW_LIMITS[kernel_library().isa]


@pytest.mark.parametrize("shape", [(96,), (2, 3, 96), (1, 7, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_batched_inputs_and_bias(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    _check(nn.Linear(96, 33, bias=bias), torch.randn(shape))


def test_non_contiguous_inputs() -> None:
    torch.manual_seed(0)
    _check(nn.Linear(64, 40), torch.randn(64, 6).t())  # (6, 64), column-major


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_split_the_panels_exactly(threads: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(576, 1536)
    x = torch.randn(4, 576)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            single = PanelLinear.from_linear(layer)(x)
        torch.set_num_threads(threads)
        with torch.no_grad():
            split = PanelLinear.from_linear(layer)(x)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(single, split)  # each output is one sum, whichever thread computes it


def _run_isa(isa: str, layer: PanelLinear, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], layer.out_features)
    bias = None if layer.bias is None else layer.bias.data_ptr()
    kernel_library().linear(isa, layer.weight_dtype)(
        x.data_ptr(), x.shape[0], layer.in_features, layer.panels.data_ptr(), layer.out_features, bias, out.data_ptr()
    )
    return out


@pytest.mark.skipif(not describe_cpu().flags, reason="no /proc/cpuinfo flags to compare with")
def test_the_library_names_this_cpus_instruction_set() -> None:
    assert kernel_library().isa == ("avx512" if "avx512f" in describe_cpu().flags else "avx2")


@pytest.mark.skipif(kernel_library().isa != "avx512", reason="this CPU has no AVX-512")
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 8, 12, 13, 25, 32])
@pytest.mark.parametrize("out_features", [16, 45])
def test_avx512_and_avx2_kernels_agree_bit_for_bit(rows: int, out_features: int) -> None:
    """Both add the same products in the same order with one rounding each, whatever the row groups."""
    torch.manual_seed(rows)
    layer = PanelLinear.from_linear(nn.Linear(577, out_features))
    x = torch.randn(rows, 577)
    avx512 = _run_isa("avx512", layer, x)
    assert torch.equal(avx512, _run_isa("avx2", layer, x))
    with torch.no_grad():
        assert torch.equal(avx512[:1], layer(x[:1]))  # a row's result does not depend on the rows beside it


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [1, 63, 64, 65, 129, 577])
@pytest.mark.parametrize("rows", [2, 6, 7, 8, 12, 13, 49])
def test_a_rows_outputs_do_not_depend_on_the_other_rows(rows: int, in_features: int, weight_dtype) -> None:
    """Whatever the row groups, chunks of the panel (two AVX2 groups) or blocks of 48 rows, each output is the same
    in-order sum as the row alone gives, bit for bit."""
    torch.manual_seed(rows * 1000 + in_features)
    layer = PanelLinear(torch.randn(45, in_features), torch.randn(45), weight_dtype=weight_dtype)
    x = torch.randn(rows, in_features)
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(rows)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("rows", [1, 3, 6, 7, 12, 13, 32, 40, 300, 650])
@pytest.mark.parametrize("out_features", [16, 45])
def test_bfloat16_panels_compute_the_float32_kernel_on_rounded_weights(rows: int, out_features: int) -> None:
    """Widening a bfloat16 weight to float32 is exact, so a bfloat16 panel's outputs are the float32 kernel's on
    the weights rounded to bfloat16, bit for bit, at any row count (where the float32 layer takes torch's kernels,
    beyond 600 rows with AVX2: equal up to rounding there)."""
    torch.manual_seed(rows)
    linear = nn.Linear(577, out_features)
    rounded = nn.Linear(577, out_features)
    with torch.no_grad():
        rounded.weight.copy_(linear.weight.bfloat16().float())
        rounded.bias.copy_(linear.bias)
    x = torch.randn(rows, 577)
    layer = PanelLinear(linear.weight, linear.bias, weight_dtype=torch.bfloat16)
    assert layer.panels.dtype == torch.bfloat16 and "weight_dtype=bfloat16" in repr(layer)
    with torch.no_grad():
        got, expected = layer(x), PanelLinear.from_linear(rounded)(x)
    limit = PanelLinear.from_linear(rounded).max_panel_rows
    if limit is None or rows <= limit:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(kernel_library().isa != "avx512", reason="this CPU has no AVX-512")
@pytest.mark.parametrize("rows", [1, 6, 7, 13])
def test_avx512_and_avx2_bfloat16_kernels_agree_bit_for_bit(rows: int) -> None:
    torch.manual_seed(rows)
    layer = PanelLinear(torch.randn(45, 577), torch.randn(45), weight_dtype=torch.bfloat16)
    x = torch.randn(rows, 577)
    assert torch.equal(_run_isa("avx512", layer, x), _run_isa("avx2", layer, x))


def test_panel_weights_are_float32_or_bfloat16() -> None:
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        PanelLinear(torch.randn(4, 4), weight_dtype=torch.float16)


def test_a_bfloat16_panel_copy_linear_rounds_only_its_copy() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    layer = PanelCopyLinear.from_linear(linear, torch.bfloat16)
    x = torch.randn(3, 40)
    with torch.no_grad():
        expected = nn.functional.linear(x, linear.weight.bfloat16().float(), linear.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert linear.weight.dtype == torch.float32 and layer.weight is linear.weight  # what trains and saves


def test_a_panel_copy_linear_is_the_linear_and_follows_its_weight() -> None:
    """Same parameters and state dict; inference on the packed copy, which follows in-place updates and new
    tensors; training and prefill on torch's kernels."""
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    layer = PanelCopyLinear.from_linear(linear)
    assert layer.weight is linear.weight and list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
        assert "_panel_copy" in layer.__dict__
        linear.weight.mul_(2)  # in place, like an optimizer step
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
        layer.bias = nn.Parameter(torch.randn(24))
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        twin = copy.deepcopy(layer)
        twin.weight.add_(1)
        assert not torch.equal(twin(x), layer(x))
        many = torch.randn(40, 40)  # more rows than the panel kernel takes: torch's kernel
        torch.testing.assert_close(layer(many), nn.functional.linear(many, layer.weight, layer.bias))
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_panels_are_the_weight_columns_padded_with_zeros() -> None:
    weight = torch.arange(17 * 3, dtype=torch.float32).view(17, 3)
    panels = pack_panels(weight)
    assert panels.shape == (2, 3, PANEL)
    assert torch.equal(panels[0].t(), weight[:PANEL])
    assert torch.equal(panels[1, :, 0], weight[PANEL])
    assert not panels[1, :, 1:].any()


def test_tied_lm_head_of_a_real_architecture(tiny_model_factory) -> None:
    """Packing the lm_head copies the tied embedding: the embedding keeps serving lookups, the logits match."""
    model = tiny_model_factory("llama", seed=0, vocab_size=50, tie_word_embeddings=True)
    stock = copy.deepcopy(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = prepack_linear_layers(model, kernel="panel")
    assert report.kernel == "panel" and isinstance(model.lm_head, PanelLinear)
    prompt = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, stock(prompt).logits, rtol=1e-5, atol=1e-5)


def test_training_through_a_panel_layer_is_a_runtime_error() -> None:
    layer = PanelLinear.from_linear(nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match="inference only"):
        layer(torch.randn(2, 8, requires_grad=True))


def test_wrong_inputs_are_clear_errors() -> None:
    layer = PanelLinear.from_linear(nn.Linear(8, 4))
    with torch.no_grad(), pytest.raises(RuntimeError, match="CPU float32 inputs"):
        layer(torch.randn(2, 8, dtype=torch.float64))
    with torch.no_grad(), pytest.raises(RuntimeError, match="inputs of size 8"):
        layer(torch.randn(2, 9))


def test_casting_is_a_clear_error_and_copying_works() -> None:
    layer = nn.Sequential(PanelLinear.from_linear(nn.Linear(8, 4)))
    layer.to("cpu").float()  # no-ops are fine
    with pytest.raises(RuntimeError, match="prepack=False"):
        layer.half()
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(twin(x), layer(x))


def test_auto_choice_is_one_of_the_kernels() -> None:
    layers = [nn.Linear(576, 1536) for _ in range(2)]
    assert choose_kernel(layers) in ("onednn", "panel")
    assert choose_kernel(layers, torch.bfloat16) == "onednn"  # the panel kernels are float32


def test_the_library_is_built_once_per_machine(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HYDRA_CACHE", str(tmp_path))
    kernel_library.cache_clear()
    try:
        assert kernel_library().library is not None
        built = list((tmp_path / "kernels").glob("packed_linear-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        kernel_library.cache_clear()
        assert kernel_library().library is not None
        assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        kernel_library.cache_clear()


def test_no_compiler_keeps_torch_kernels_with_a_reason(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HYDRA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    kernel_library.cache_clear()
    try:
        library = kernel_library()
        assert library.library is None and "building the panel kernels failed" in library.reason
        model = nn.Sequential(nn.Linear(16, 8))
        assert prepack_linear_layers(model).kernel == "onednn"  # auto falls back
        with pytest.raises(ValueError, match="panel kernels are unavailable"):
            prepack_linear_layers(nn.Sequential(nn.Linear(16, 8)), kernel="panel")
    finally:
        monkeypatch.undo()
        kernel_library.cache_clear()
    assert cpu_kernels.kernel_library().library is not None
