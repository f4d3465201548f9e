"""The machine against the model's limits: how close a forward over n new tokens comes to what it must cost.

A forward over n new tokens reads every weight once (weight bytes / memory bandwidth) and does 2 x n x (weight
elements) floating-point operations (/ the machine's peak rate); its limit is the larger of the two. A decoding
step (n = 1) and a small verification tree (n = 2..8) sit on the memory side on every CPU we measured, so the
ratio t(n) / limit(n) says what a kernel leaves on the table. `measure_roofline` measures both rates and t(n) for
the model's base as loaded (its kernels included); `hf-hydra profile` prints it. The same timing loop gives
`tune-tree` its verification curve (`forward_seconds`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import re
import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import transformers
from filelock import FileLock
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .assets import cache_root
from .cache_name import cache_argument, output_cache
from .cpu_kernels import source_digest
from .growing_cache import growing_cache

logger = logging.getLogger(__name__)

FLAG_PATTERN = re.compile(r"^(avx2|avx512\w*|amx\w*)$")  # the flags that decide which kernels run fast


@dataclasses.dataclass(frozen=True)
class CpuDescription:
    model: str
    flags: list[str]  # AVX2 / AVX-512 / AMX flags, sorted

    @property
    def vector_level(self) -> str:
        """The widest of these extensions, in words: "AMX", "AVX-512", "AVX2" or "no AVX2"."""
        for prefix, level in (("amx", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2")):
            if any(flag.startswith(prefix) for flag in self.flags):
                return level
        return "no AVX2"


@dataclasses.dataclass(frozen=True)
class RooflineReport:
    """t(n) of one base against its limits on this machine; JSON-ready via dataclasses.asdict."""

    cpu: CpuDescription
    threads: int
    kernel: str  # "stock", or the packed kernel (`PrepackReport.kernel`)
    weight_bytes: int  # every linear layer's weights, the lm_head included
    bandwidth_bytes_per_second: float
    peak_flops_per_second: float
    seconds: list[float]  # [n - 1]: median seconds of a forward over n new tokens

    @property
    def limit_seconds(self) -> list[float]:
        """[n - 1]: the larger of reading the weights once and doing their float32 arithmetic for n rows."""
        memory = self.weight_bytes / self.bandwidth_bytes_per_second
        flops_per_row = 2 * self.weight_bytes / 4  # a multiply and an add per float32 weight
        return [max(memory, n * flops_per_row / self.peak_flops_per_second) for n in range(1, len(self.seconds) + 1)]

    @property
    def ratios(self) -> list[float]:
        """t(n) / limit(n): 1.0 would be a forward at the machine's limit."""
        return [t / limit for t, limit in zip(self.seconds, self.limit_seconds, strict=True)]

    def to_record(self) -> dict:
        """The measurements with the limits and ratios they imply, for JSON."""
        return dataclasses.asdict(self) | {"limit_seconds": self.limit_seconds, "ratios": self.ratios}


@functools.lru_cache(maxsize=1)
def describe_cpu() -> CpuDescription:
    """The CPU model name and its vector-extension flags (from /proc/cpuinfo where there is one), read once."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return CpuDescription(platform.processor() or platform.machine(), [])
    text = cpuinfo.read_text()
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    wanted = sorted({flag for flag in (flags.group(1).split() if flags else []) if FLAG_PATTERN.match(flag)})
    return CpuDescription(name.group(1).strip() if name else platform.machine(), wanted)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every linear layer's weights (stock or packed: anything with in_ and out_features), as float32
    for packed layers; a tied lm_head counts once, the embedding lookup (a few rows) not at all."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif hasattr(module, "in_features") and hasattr(module, "out_features"):
            total += module.in_features * module.out_features * 4
    return total


def measure_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes per second of one streaming read (a sum over a tensor far larger than any cache), median."""
    data = torch.ones(megabytes * 2**20 // 4)
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        data.sum()
        seconds.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(seconds[1:])


def measure_peak_flops(size: int = 1024, repeats: int = 7) -> float:
    """Float32 operations per second of a large square matmul (torch's best kernel at its best shape), median."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds[1:])


@torch.no_grad()
def forward_seconds(
    bases: Mapping[str, PreTrainedModel], max_tokens: int, context_length: int = 300, repeats: int = 7
) -> dict[str, list[float]]:
    """Median seconds of one forward over n = 1..max_tokens new tokens after `context_length` cached, per base,
    on a growing cache (`hf_hydra.growing_cache`) as the decoding loops use.

    Each round times every base at every size once (after one warm-up round), so a burst of load from
    another process hits a few rounds of everything, not all rounds of one base or size."""
    first = next(iter(bases.values()))
    vocab = first.get_output_embeddings().out_features
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab, (1, context_length), generator=generator)
    sizes = range(1, max_tokens + 1)
    tokens = {n: torch.randint(vocab, (1, n), generator=generator) for n in sizes}
    prefixes = {  # on the cache the decoding loops use
        name: output_cache(
            base(input_ids=prompt.to(base.device), **cache_argument(growing_cache(base.config)), use_cache=True)
        )
        for name, base in bases.items()
    }
    runs: dict[tuple[str, int], list[float]] = {(name, n): [] for name in bases for n in sizes}
    for _ in tqdm(range(repeats + 1), desc="forward latency", unit="round"):
        for n in sizes:
            for name, base in bases.items():
                cache = copy.deepcopy(prefixes[name])
                start = time.perf_counter()
                base(input_ids=tokens[n].to(base.device), **cache_argument(cache), use_cache=True)
                if base.device.type == "cuda":
                    torch.cuda.synchronize(base.device)
                runs[name, n].append(time.perf_counter() - start)
    return {name: [statistics.median(runs[name, n][1:]) for n in sizes] for name in bases}


def measure_roofline(
    bases: Mapping[str, PreTrainedModel], max_tokens: int = 32, context_length: int = 300, repeats: int = 7
) -> list[RooflineReport]:
    """One report per base (name -> base, e.g. {"panel": packed, "stock": stock}), all measured interleaved."""
    bandwidth, peak = measure_bandwidth(), measure_peak_flops()
    seconds = forward_seconds(bases, max_tokens, context_length, repeats)
    cpu, threads = describe_cpu(), torch.get_num_threads()
    return [
        RooflineReport(cpu, threads, name, linear_weight_bytes(base), bandwidth, peak, seconds[name])
        for name, base in bases.items()
    ]


def roofline_table(reports: list[RooflineReport], sizes: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)) -> str:
    """A markdown table: t(n) in ms and its ratio to the limit, one row per base, and the limit itself."""
    sizes = tuple(n for n in sizes if n <= len(reports[0].seconds))
    header = "| kernel | " + " | ".join(f"n={n}" for n in sizes) + " |"
    rows = [header, "|" + "---|" * (len(sizes) + 1)]
    for report in reports:
        cells = [f"{report.seconds[n - 1] * 1e3:.1f} ms ({report.ratios[n - 1]:.2f}x)" for n in sizes]
        rows.append(f"| {report.kernel} | " + " | ".join(cells) + " |")
    limits = [f"{reports[0].limit_seconds[n - 1] * 1e3:.1f} ms" for n in sizes]
    rows.append("| limit | " + " | ".join(limits) + " |")
    return "\n".join(rows)


def machine_identity(kernel: str) -> dict:
    """What a verification curve belongs to: the CPU and its flags, the thread count, the base's kernel."""
    return {"cpu": dataclasses.asdict(describe_cpu()), "threads": torch.get_num_threads(), "kernel": kernel}


MACHINE_CURVE_TOKENS = 16  # bounds a fitted dynamic tree to 15 nodes; measuring takes seconds, not a minute
MEASURING_LOCK = ".measuring.lock"  # in the curves folder: held while a process measures a curve


def machine_forward_seconds(base: PreTrainedModel, max_tokens: int = MACHINE_CURVE_TOKENS) -> list[float]:
    """This machine's t(n) for n = 1..max_tokens on `base` as loaded (its kernels included), for the trees:
    measured once (a few seconds, three rounds) and then read from ``<cache_root()>/machine_curves/``, keyed by
    the CPU and its flags, the thread count, the torch and transformers versions, the base's layers and the
    panel kernels' source. Processes measure one at a time (a lock in that folder): two measuring together, such
    as the shards of a bench started side by side, would each time the other's load into the curve they cache;
    one that waited reads the curve the other measured, where it is the same."""
    path = cache_root() / "machine_curves" / f"{_machine_curve_key(base, max_tokens)}.json"
    if path.is_file():
        return json.loads(path.read_text())["seconds"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.parent / MEASURING_LOCK):
        if path.is_file():  # measured by the process this one waited for
            return json.loads(path.read_text())["seconds"]
        logger.info("Measuring this machine's verification cost for the dynamic tree (once; cached in %s).", path)
        seconds = forward_seconds({"base": base}, max_tokens, repeats=3)["base"]
        temporary = path.with_suffix(f".tmp-{os.getpid()}")
        temporary.write_text(json.dumps({"cpu": dataclasses.asdict(describe_cpu()), "seconds": seconds}))
        os.replace(temporary, path)
    return seconds


def _machine_curve_key(base: PreTrainedModel, max_tokens: int) -> str:
    layers = [
        (type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None))
        for m in base.modules()
        if hasattr(m, "in_features")
    ]
    identity = [
        dataclasses.asdict(describe_cpu()), torch.get_num_threads(), torch.__version__, transformers.__version__,
        type(base).__name__, str(base.dtype), layers, max_tokens, source_digest(), "growing cache",
    ]
    return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:20]
