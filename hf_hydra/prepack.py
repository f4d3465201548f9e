"""Prepacked linear layers: few-token forwards that cost less than a stock one-token forward on CPUs.

torch's stock float32 CPU matmul (MKL) handles a handful of rows badly: a forward over a few tokens costs much
more than a one-token forward, so the verification forward eats what the drafts gain. Reordering every weight
once into oneDNN's blocked layout ("prepacking"; the ops are those torch.compile's CPU backend emits for frozen
weights) brings few-token forwards close to the one-token one. The outputs agree with the stock ones up to float
rounding, like any change of matmul kernel.

The draft heads are prepacked in bfloat16 where the CPU has bfloat16 kernels: their step reads the 8,192-row
draft-vocabulary projection once per head call, and after a base forward has flushed the caches that read is
most of the drafting time. The base stays float32: it decides every token.

Two kernels pack the base, and `prepack_linear_layers` times both on the model's own layers and keeps the faster
(`kernel="auto"`): oneDNN's (this module) and the AVX2 / AVX-512 panel kernels of `hf_hydra.cpu_kernels`, which
stream the weights at the memory bandwidth where oneDNN does not (figures per CPU in `artifacts/README.md`).

Inference only. oneDNN's packed weight is an opaque tensor (no autograd, no moving or casting, no copying; not
saved); panel layers copy, but do not train, move or cast either. Such requests are a RuntimeError saying so.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ._compat import mkldnn_bf16_supported, mkldnn_linear, mkldnn_reorder_linear_weight
from .cpu_kernels import PanelCopyLinear, PanelLinear, kernel_library, refuse_moving

DEFAULT_BATCH_SIZE_HINT = 8  # the row count oneDNN tunes the blocked layout for (a small verification tree)


class PrepackedLinear(nn.Module):
    """`nn.Linear` inference with the weight prepacked for oneDNN; same inputs and outputs.

    compute_dtype bfloat16: weight and bias are rounded to bfloat16 once and each input on every call, the
    output comes back in the input's dtype. Half the memory traffic of float32, for layers whose outputs
    tolerate bfloat16 rounding (draft heads: they only propose tokens that the float32 base verifies).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        batch_size_hint: int = DEFAULT_BATCH_SIZE_HINT,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        _check_compute_dtype(compute_dtype)
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        packed = mkldnn_reorder_linear_weight(weight.detach().to(compute_dtype), batch_size_hint)
        self.register_buffer("packed_weight", packed, persistent=False)  # opaque (out, in) oneDNN tensor
        bias = None if bias is None else bias.detach().to(compute_dtype)  # (out,) shares float32 storage
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        batch_size_hint: int = DEFAULT_BATCH_SIZE_HINT,
        compute_dtype: torch.dtype = torch.float32,
    ) -> PrepackedLinear:
        return cls(linear.weight, linear.bias, batch_size_hint, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out) in x's dtype."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("PrepackedLinear is for inference only: run it under torch.no_grad().")
        x_compute = x.to(self.compute_dtype)
        out = mkldnn_linear(x_compute, self.packed_weight, self.bias)
        return out.to(x.dtype)

    def _apply(self, fn, recurse: bool = True) -> PrepackedLinear:
        refuse_moving(fn, "its weight is an opaque oneDNN tensor")
        return self

    def __deepcopy__(self, memo: dict) -> PrepackedLinear:
        raise RuntimeError(
            "A prepacked layer cannot be copied (opaque oneDNN weight); "
            "copy the model before prepacking."
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )


COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


def bfloat16_supported() -> bool:
    """Whether oneDNN computes bfloat16 on this CPU (AVX-512 or newer)."""
    return mkldnn_bf16_supported()


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """"bfloat16" for torch.bfloat16, for JSON records; None stays None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _check_compute_dtype(compute_dtype: torch.dtype) -> None:
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"Prepacked layers compute in float32 or bfloat16, not {compute_dtype}.")
    if compute_dtype == torch.bfloat16 and not bfloat16_supported():
        raise ValueError("oneDNN has no bfloat16 kernels on this CPU; prepack with compute_dtype=torch.float32.")


@dataclass(frozen=True)
class PrepackReport:
    """What `prepack_linear_layers` replaced."""

    layers: int  # nn.Linear modules (or projections) replaced by packed ones
    parameters: int  # weight elements now served from packed copies
    compute_dtype: torch.dtype = torch.float32
    kernel: str = "onednn"  # "onednn" (PrepackedLinear) or "panel" (hf_hydra.cpu_kernels.PanelLinear)


KERNELS = ("auto", "onednn", "panel")


def check_prepackable(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """The (parent, name, linear) of every plain `nn.Linear` (or `PanelCopyLinear`, an `nn.Linear` drafting on a
    packed copy) in `module`; a ValueError saying what to do when they cannot be prepacked (no oneDNN in this
    torch build, a GPU, a dtype other than float32)."""
    if not torch.backends.mkldnn.is_available():
        raise ValueError("Prepacking needs a torch build with oneDNN (mkldnn); this one has none. Leave prepack off.")
    linears = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) in (nn.Linear, PanelCopyLinear)
    ]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no nn.Linear layers to prepack (already prepacked?).")
    devices = {str(linear.weight.device) for _, _, linear in linears}
    dtypes = {linear.weight.dtype for _, _, linear in linears}
    if devices != {"cpu"}:
        raise ValueError(f"Prepacking is a CPU optimisation; the model is on {sorted(devices)}. Leave it off there.")
    if dtypes != {torch.float32}:
        raise ValueError(
            f"Prepacking supports float32 weights; the model has {sorted(str(d) for d in dtypes)}. "
            "Load it with dtype=torch.float32 or leave prepack off."
        )
    return linears


def packed_kernel(module: nn.Module) -> str | None:
    """The kernel `module`'s linear layers were packed for ("panel" or "onednn"), None while none is packed."""
    for child in module.modules():
        if isinstance(child, PanelLinear):
            return "panel"
        if isinstance(child, PrepackedLinear):
            return "onednn"
    return None


def packable_on_cpu(module: nn.Module) -> bool:
    """Whether `prepack_linear_layers(module)` applies: float32 linear layers on the CPU, oneDNN in torch."""
    try:
        check_prepackable(module)
    except ValueError:
        return False
    return True


def prepack_linear_layers(
    module: nn.Module,
    batch_size_hint: int = DEFAULT_BATCH_SIZE_HINT,
    compute_dtype: torch.dtype = torch.float32,
    kernel: str = "auto",
) -> PrepackReport:
    """Replace every plain `nn.Linear` of `module` (in place) by a packed layer with the same weights.

    kernel: "onednn" (`PrepackedLinear`), "panel" (`PanelLinear`, float32 on AVX2 and AVX-512 CPUs) or "auto":
    the faster of the two on this machine for a sample of `module`'s own layers (`choose_kernel`)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    linears = check_prepackable(module)
    if kernel == "auto":
        kernel = choose_kernel([linear for _, _, linear in linears], compute_dtype)
    if kernel == "panel":
        _check_panel(compute_dtype)
    for parent, name, linear in linears:
        packed = (
            PanelLinear.from_linear(linear)
            if kernel == "panel"
            else PrepackedLinear.from_linear(linear, batch_size_hint, compute_dtype)
        )
        setattr(parent, name, packed)
    parameters = sum(linear.weight.numel() for _, _, linear in linears)
    return PrepackReport(layers=len(linears), parameters=parameters, compute_dtype=compute_dtype, kernel=kernel)


def _check_panel(compute_dtype: torch.dtype) -> None:
    if compute_dtype != torch.float32:
        raise ValueError(f"The panel kernels compute in float32, not {compute_dtype}; use kernel='onednn'.")
    library = kernel_library()
    if library.library is None:
        raise ValueError(f"The panel kernels are unavailable: {library.reason}. Use kernel='onednn'.")


SAMPLE_BYTES = 64 * 2**20  # more than a CPU's last-level cache: the timing streams weights from memory
SAMPLE_ROWS = (1, 4)  # a decoding step and a small verification tree


def choose_kernel(linears: list[nn.Linear], compute_dtype: torch.dtype = torch.float32) -> str:
    """The faster kernel on this machine for these layers: oneDNN's or the panel kernels (float32 only, where
    they build). Both are timed on about 64 MB of the layers (cycled), 1 and 4 rows, interleaved, median of 5;
    the choice is remembered per process for the same layer shapes."""
    if compute_dtype != torch.float32 or kernel_library().library is None:
        return "onednn"
    sample, size = [], 0
    while size < SAMPLE_BYTES:
        linear = linears[len(sample) % len(linears)]
        sample.append(linear)
        size += linear.weight.numel() * 4
    return _timed_choice(tuple(tuple(linear.weight.shape) for linear in sample), torch.get_num_threads())


@functools.lru_cache(maxsize=8)
def _timed_choice(shapes: tuple[tuple[int, int], ...], threads: int) -> str:
    """Time both kernels on random weights of these shapes (the values do not change the cost)."""
    weights = [torch.randn(shape) for shape in shapes]
    candidates = {
        "onednn": [PrepackedLinear(weight) for weight in weights],
        "panel": [PanelLinear(weight) for weight in weights],
    }
    inputs = {rows: [torch.randn(rows, shape[1]) for shape in shapes] for rows in SAMPLE_ROWS}
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for _ in range(6):  # the first round warms up
            for name, layers in candidates.items():
                start = time.perf_counter()
                for rows in SAMPLE_ROWS:
                    for layer, x in zip(layers, inputs[rows], strict=True):
                        layer(x)
                seconds[name].append(time.perf_counter() - start)
    return min(candidates, key=lambda name: statistics.median(seconds[name][1:]))
