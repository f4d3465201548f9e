"""Panel-packed linear layers for AVX2 and AVX-512 CPUs: few-token forwards at the memory limit.

A decoding step multiplies one to a few rows by every weight matrix of the base, so its cost is reading the
weights. torch's stock CPU kernels (MKL) are far from that limit for a few rows: a forward over a few tokens costs
much more than a one-token one, and the one-token one much more than reading the weights (figures per CPU in
`artifacts/README.md`).
`hf_hydra/csrc/packed_linear.c` streams each weight once, in panels of 16 output columns, while a group of rows
accumulates in registers (up to 6 with AVX2, 12 with AVX-512; see its header). It is plain C with intrinsics,
built on first use with the system C compiler (about a second) into ``<cache_root()>/kernels/`` and loaded with
ctypes; the AVX-512 kernels run where the CPU has AVX-512F, the AVX2 ones elsewhere. Where the CPU lacks
AVX2/FMA, there is no compiler, or the build fails, `kernel_library()` says why and the caller keeps torch's
kernels.

The outputs agree with the stock ones up to float rounding (each output is one in-order float32 sum), like any
change of matmul kernel; the AVX2 and AVX-512 kernels agree bit for bit. Panels may also hold bfloat16 weights
(`weight_dtype`): half the bytes, the same float32 sums over the rounded weights; for layers whose outputs only
propose (the draft heads), never for the base. Inference only: packed layers refuse autograd and dtype or device
changes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from ._compat import tensor_version
from .assets import cache_root

PANEL = 16  # output columns per panel; must match csrc/packed_linear.c
ISAS = ("avx2", "avx512")  # the kernels' instruction sets, as named in csrc/packed_linear.c
# Rows above which torch's kernels beat the panel kernel, per instruction set (None: at no row count measured): a
# prompt's prefill. AVX2 (an AVX2-only EPYC): a SmolLM2 prefill of 33 to 600 tokens through the panel kernel took
# 0.75-0.94x the time of torch's kernels on the panels, on one thread and two; at 1,000 and 2,000 tokens
# it was 0.85x / 0.99x on one thread and 1.07x / 1.04x on two, so longer prompts take torch's kernels. AVX-512 (an
# AVX-512 EPYC, 12-row groups): a SmolLM2 prefill of 33 to 2,000 tokens is faster through the panel kernel than
# stock at every length, 1.14-1.5x on one thread and 1.08-1.8x on two.
PANEL_ROW_LIMITS = {"avx2": 600, "avx512": None}
COPY_MAX_ROWS = 32  # `PanelCopyLinear` (the draft heads) packs the rows of a decoding step, not a prompt
_WEIGHT_SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}  # panel weight dtypes, as the kernels are named
PANEL_WEIGHT_DTYPES = tuple(_WEIGHT_SUFFIX)
_SOURCE = "packed_linear.c"
_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")


@dataclass(frozen=True)
class KernelLibrary:
    """The loaded kernel library and the instruction set its kernels use here ("avx512" or "avx2"), or why there
    is none (library None, reason set)."""

    library: ctypes.CDLL | None
    reason: str | None = None
    isa: str | None = None

    def linear(self, isa: str | None = None, weight_dtype: torch.dtype = torch.float32):
        """The C function computing a packed linear layer with `isa`'s kernels (default: this CPU's best) on
        panels of `weight_dtype` (float32 or bfloat16) weights."""
        return getattr(self.library, f"hh_packed_linear_{isa or self.isa}{_WEIGHT_SUFFIX[weight_dtype]}")


def cpu_has_avx2_fma() -> bool:
    """Whether this CPU runs the AVX2 + FMA kernels (torch's own dispatch level says so)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.lru_cache(maxsize=1)
def kernel_library() -> KernelLibrary:
    """Build (once per machine and source) and load the kernel library; never raises."""
    if not cpu_has_avx2_fma():
        capability = torch.backends.cpu.get_cpu_capability()
        return KernelLibrary(None, f"this CPU has no AVX2 + FMA (torch reports {capability})")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return KernelLibrary(None, "no C compiler found (set CC or install gcc)")
    source = resources.files("hf_hydra").joinpath("csrc", _SOURCE).read_bytes()
    digest = hashlib.sha256(source_digest().encode() + " ".join((compiler, *_FLAGS)).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"packed_linear-{digest}.so"
    try:
        if not target.exists():
            _build(compiler, source, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        return KernelLibrary(None, f"building the panel kernels failed: {str(detail).strip()[:300]}")
    _declare(library)
    return KernelLibrary(library, isa="avx512" if library.hh_has_avx512() else "avx2")


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 of the kernels' C source: what a build, or a curve measured on the kernels, belongs to."""
    return hashlib.sha256(resources.files("hf_hydra").joinpath("csrc", _SOURCE).read_bytes()).hexdigest()


def _build(compiler: str, source: bytes, target: Path) -> None:
    """Compile `source` into `target` atomically under a file lock (concurrent processes build once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():
            return
        with tempfile.TemporaryDirectory(dir=target.parent) as folder:
            source_path = Path(folder) / _SOURCE
            source_path.write_bytes(source)
            built = Path(folder) / target.name
            command = [compiler, *_FLAGS, str(source_path), "-o", str(built)]
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
            built.chmod(0o755)
            os.replace(built, target)


def _declare(library: ctypes.CDLL) -> None:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for isa in ISAS:
        for suffix in _WEIGHT_SUFFIX.values():
            function = getattr(library, f"hh_packed_linear_{isa}{suffix}")
            function.argtypes = [pointer, size, size, pointer, size, pointer, pointer]
            function.restype = None
    library.hh_has_avx512.restype = ctypes.c_int
    library.hh_panel_width.restype = ctypes.c_int
    if library.hh_panel_width() != PANEL:
        raise OSError(f"kernel library panel width {library.hh_panel_width()} != {PANEL}")


@functools.lru_cache(maxsize=len(PANEL_WEIGHT_DTYPES))
def _kernel(weight_dtype: torch.dtype):
    """This CPU's C function for panels of `weight_dtype`, looked up once (a layer calls it at every step)."""
    return kernel_library().linear(weight_dtype=weight_dtype)


def refuse_moving(fn, why: str) -> None:
    """A packed layer's `_apply` (`.to()`, `.half()`, `.cuda()`, ...): a RuntimeError unless `fn` leaves a CPU
    float32 tensor as it is; `why` says what the layer holds."""
    probe = fn(torch.empty(0))
    if probe.device.type != "cpu" or probe.dtype != torch.float32:
        raise RuntimeError(
            f"A packed layer cannot move or change dtype (to {probe.device.type} / {probe.dtype}): {why}. Move or "
            "cast the model before packing, or reload it (from_pretrained(..., prepack=False) keeps torch's own "
            "layers)."
        )


def pack_panels(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, in) -> (ceil(out / 16), in, 16) panels of `dtype` (rounded to nearest), the last one zero-padded;
    a new tensor."""
    out_features, in_features = weight.shape
    padded = torch.zeros(-(-out_features // PANEL) * PANEL, in_features, dtype=dtype)
    padded[:out_features] = weight.detach()
    return padded.view(-1, PANEL, in_features).transpose(1, 2).contiguous()


class PanelLinear(nn.Module):
    """`nn.Linear` inference on panel-packed weights (AVX2 or AVX-512 kernels); same inputs and outputs. The
    weights are float32, or bfloat16 where `weight_dtype` says so: half the bytes to read, sums still float32
    (for layers that tolerate bfloat16 weights: the draft heads)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        library = kernel_library()
        if library.library is None:
            raise RuntimeError(f"The panel linear kernels are unavailable: {library.reason}.")
        if weight_dtype not in PANEL_WEIGHT_DTYPES:
            raise ValueError(f"Panel weights are float32 or bfloat16, not {weight_dtype}.")
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight_dtype
        self.max_panel_rows = PANEL_ROW_LIMITS[library.isa]  # rows beyond go to torch's kernels; None: never
        self.register_buffer("panels", pack_panels(weight, weight_dtype), persistent=False)  # (ceil(out/16), in, 16)
        bias = None if bias is None else bias.detach().to(torch.float32).contiguous()  # (out,)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PanelLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) float32 -> (..., out). Runs once per layer per decoding step, 211 times a SmolLM2 forward:
        the few-row path checks the input in one expression and calls the kernel directly (about 5 microseconds
        of Python per call less than checking step by step, a millisecond per forward)."""
        rows = x.numel() // self.in_features
        few = self.max_panel_rows is None or rows <= self.max_panel_rows or self.weight_dtype is torch.bfloat16
        if (
            few and x.dtype is torch.float32 and x.is_cpu and x.shape[-1] == self.in_features and x.is_contiguous()
            and not (x.requires_grad and torch.is_grad_enabled())
        ):
            return self._panel_rows(x, rows)
        self._check_input(x)
        if few:  # torch has no float32 x bfloat16 matmul: bfloat16 panels take every row count
            return self._panel_rows(x.contiguous(), rows)
        weight = self.panels.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features]  # (out, in)
        out = nn.functional.linear(x.reshape(rows, self.in_features), weight, self.bias)  # (n, out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dtype is not torch.float32 or not x.is_cpu:
            raise RuntimeError(f"PanelLinear computes on CPU float32 inputs, got {x.device.type} {x.dtype}.")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("PanelLinear is for inference only: run it under torch.no_grad().")
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"PanelLinear expects inputs of size {self.in_features}, got shape {tuple(x.shape)}.")

    def _panel_rows(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Contiguous (..., in) holding `rows` rows -> (..., out) with the panel kernel."""
        out = x.new_empty((*x.shape[:-1], self.out_features))  # float32, laid out as (rows, out)
        buffers = self._buffers  # a dict lookup: nn.Module's attribute fallback costs more than the kernel call
        bias = buffers["bias"]
        _kernel(self.weight_dtype)(
            x.data_ptr(), rows, self.in_features, buffers["panels"].data_ptr(), self.out_features,
            None if bias is None else bias.data_ptr(), out.data_ptr(),
        )
        return out

    def _apply(self, fn, recurse: bool = True) -> PanelLinear:
        refuse_moving(fn, "it runs CPU float32 kernels")
        return self

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        return shape if self.weight_dtype is torch.float32 else f"{shape}, weight_dtype=bfloat16"


class PanelCopyLinear(nn.Linear):
    """An `nn.Linear` (the same parameters: it saves, trains and moves as one) that computes few-row CPU float32
    inference with a panel-packed copy of its weight, made on first use and again whenever the weight or bias
    changes (a new tensor, or an in-place update such as an optimizer step). For the draft heads: they are
    trained and saved, yet read once per decoding step, where torch's kernels are slowest. Costs a second copy
    of the weight, in `copy_dtype` (float32, or bfloat16: half the bytes to read and to keep)."""

    copy_dtype: torch.dtype = torch.float32

    @classmethod
    def from_linear(cls, linear: nn.Linear, copy_dtype: torch.dtype = torch.float32) -> PanelCopyLinear:
        """A layer sharing `linear`'s parameters (no copy until the first packed forward)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.copy_dtype = copy_dtype
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._packable(x):
            return super().forward(x)
        key = tuple((t.data_ptr(), tensor_version(t)) for t in (self.weight, self.bias) if t is not None)
        cached = self.__dict__.get("_panel_copy")
        if cached is None or cached[0] != key:
            cached = (key, PanelLinear(self.weight, self.bias, self.copy_dtype))
            self.__dict__["_panel_copy"] = cached  # a plain attribute: neither a submodule nor in the state dict
        return cached[1](x)

    def _packable(self, x: torch.Tensor) -> bool:
        """Inference on CPU float32 with few rows (prefill and training take torch's kernels)."""
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return False
        return (
            x.dtype is torch.float32 and x.is_cpu and self.weight.dtype is torch.float32 and self.weight.is_cpu
            and x.numel() <= COPY_MAX_ROWS * self.in_features
        )
