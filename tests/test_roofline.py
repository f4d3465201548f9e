"""Tests for hf_hydra.roofline: the limits a forward is measured against, and `hf-hydra profile`."""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from filelock import FileLock

from hf_hydra import roofline
from hf_hydra.cli import main
from hf_hydra.prepack import prepack_linear_layers
from hf_hydra.roofline import (
    CpuDescription,
    RooflineReport,
    describe_cpu,
    forward_seconds,
    linear_weight_bytes,
    roofline_table,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _report(seconds: list[float]) -> RooflineReport:
    # 400 MB of float32 weights at 20 GB/s: 20 ms to read; 100 M elements x 2 flops x n rows at 50 GFLOP/s
    return RooflineReport(CpuDescription("test cpu", ["avx2"]), 1, "panel", 400_000_000, 20e9, 50e9, seconds)


def test_the_limit_is_memory_for_few_rows_and_arithmetic_for_many() -> None:
    report = _report([0.03] * 8)
    assert report.limit_seconds[0] == pytest.approx(0.02)  # reading 400 MB at 20 GB/s
    assert report.limit_seconds[3] == pytest.approx(0.02)  # 4 rows: 16 ms of arithmetic, still under the read
    assert report.limit_seconds[7] == pytest.approx(8 * 2 * 100e6 / 50e9)  # 8 rows: 32 ms of arithmetic
    assert report.ratios[0] == pytest.approx(1.5)
    record = report.to_record()
    assert record["ratios"] == report.ratios and record["cpu"]["flags"] == ["avx2"]
    json.dumps(record)  # JSON-ready


def test_weight_bytes_count_stock_and_packed_layers_once(tiny_model_factory) -> None:
    model = tiny_model_factory("llama", seed=0, vocab_size=50, tie_word_embeddings=True)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    expected = sum(m.weight.numel() * 4 for m in linears)  # the tied lm_head once; the embedding lookup not at all
    assert linear_weight_bytes(model) == expected
    packed = copy.deepcopy(model)
    prepack_linear_layers(packed, kernel="onednn")
    assert linear_weight_bytes(packed) == expected


def test_forward_seconds_time_every_base_and_size(tiny_model_factory) -> None:
    stock = tiny_model_factory("llama", seed=0)
    packed = copy.deepcopy(stock)
    prepack_linear_layers(packed)
    seconds = forward_seconds({"stock": stock, "packed": packed}, max_tokens=3, context_length=8, repeats=1)
    assert set(seconds) == {"stock", "packed"}
    assert all(len(times) == 3 and all(t > 0 for t in times) for times in seconds.values())


def test_the_cpu_is_described_with_its_vector_flags() -> None:
    cpu = describe_cpu()
    assert cpu.model
    assert all(flag == "avx2" or flag.startswith(("avx512", "amx")) for flag in cpu.flags)


@pytest.mark.parametrize(
    ("flags", "level"),
    [([], "no AVX2"), (["avx2"], "AVX2"), (["avx2", "avx512_vnni", "avx512f"], "AVX-512"),
     (["amx_tile", "avx2", "avx512f"], "AMX"), (["avx2", "avx512_vnni"], "AVX2")],
)
def test_the_vector_level_is_the_widest_extension(flags: list[str], level: str) -> None:
    assert CpuDescription("cpu", flags).vector_level == level


def test_the_table_names_each_kernel_and_the_limit() -> None:
    table = roofline_table([_report([0.03, 0.031, 0.032, 0.04])])
    assert "| panel | 30.0 ms (1.50x) |" in table
    assert "| limit | 20.0 ms |" in table
    assert "n=8" not in table  # only the sizes measured


def test_cli_profile_measures_stock_and_packed(tiny_model_factory, tmp_path, capsys) -> None:
    base_dir = tmp_path / "base"
    tiny_model_factory("llama", seed=0).save_pretrained(base_dir)
    out = tmp_path / "profile.json"
    args = ["profile", "--base", str(base_dir), "--max-tokens", "2", "--repeats", "1", "--out", str(out)]
    assert main(args) == 0
    records = json.loads(out.read_text())
    assert [r["kernel"] for r in records][1] == "stock" and records[0]["kernel"] in ("onednn", "panel")
    assert all(len(r["seconds"]) == 2 and len(r["ratios"]) == 2 for r in records)
    assert "bandwidth" in capsys.readouterr().out


def test_the_machine_curve_is_measured_once_per_base_kernels(tiny_model_factory, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HYDRA_CACHE", str(tmp_path))
    calls = []

    def counted(bases, max_tokens, context_length=300, repeats=7):
        calls.append(max_tokens)
        return forward_seconds(bases, max_tokens, context_length=8, repeats=1)

    monkeypatch.setattr(roofline, "forward_seconds", counted)
    stock = tiny_model_factory("llama", seed=0)
    first = roofline.machine_forward_seconds(stock, max_tokens=4)
    assert len(first) == 4 and roofline.machine_forward_seconds(stock, max_tokens=4) == first
    assert calls == [4]  # the second call read the cached curve
    packed = copy.deepcopy(stock)
    prepack_linear_layers(packed, kernel="onednn")
    roofline.machine_forward_seconds(packed, max_tokens=4)
    assert calls == [4, 4]  # other kernels, another curve
    assert len(list((tmp_path / "machine_curves").glob("*.json"))) == 2


def test_a_process_waits_for_one_measuring_and_reads_its_curve(tiny_model_factory, tmp_path, monkeypatch) -> None:
    """Two processes measuring at once would time each other: the second waits on the lock, then finds the curve."""
    monkeypatch.setenv("HF_HYDRA_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(roofline, "forward_seconds", lambda *args, **kwargs: calls.append(1) or {"base": [9.0]})
    base = tiny_model_factory("llama", seed=0)
    curves = tmp_path / "machine_curves"
    curves.mkdir()
    measured = json.dumps({"cpu": {}, "seconds": [0.01, 0.02]})
    with FileLock(curves / roofline.MEASURING_LOCK):  # another process is measuring
        waiting = ThreadPoolExecutor(1).submit(roofline.machine_forward_seconds, base, 2)
        time.sleep(0.5)
        assert not waiting.done()
        (curves / f"{roofline._machine_curve_key(base, 2)}.json").write_text(measured)  # ... and caches its curve
    assert waiting.result(timeout=60) == [0.01, 0.02] and calls == []
