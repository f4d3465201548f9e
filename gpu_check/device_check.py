"""The one script the GPU machine runs (gpu_check/README.md): CUDA tests, then the 7B-shape profile and projection.

    python3 gpu_check/device_check.py --out "$OUT"            # on the GPU machine, from the repository root
    python gpu_check/device_check.py --dry-run --out /tmp/gc   # here: the same steps, CPU and a tiny shape

1. tests/test_cuda.py under pytest (the carried wheels of `prepare.py`), in a child process with a time limit,
   its output in `cuda_tests.log` (the host syncs per step by file:line are in it) and `cuda_tests.xml`;
2. `profile_gpu.run`: `gpu_check.json` and `gpu_check.md` (rewritten after every stage, so a run cut short
   still returns what it measured);
3. `summary.json`: versions, durations, each part's outcome. Exit status 0 only when both parts succeeded.

Standard library only until the profile starts: the tests' process, not this one, imports the carried pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing outside the machine can be reached

from gpu_check import bootstrap  # noqa: E402

PYTEST_FLAG = "--pytest"  # runs pytest with the carried wheels (how this script starts the tests' process)
TESTS = "tests/test_cuda.py"
TESTS_TIMEOUT_SECONDS = 240
LOG_TAIL_LINES = 40


def run_pytest(arguments: Sequence[str]) -> int:
    """pytest with the carried wheels first on sys.path and hf_hydra importable from the repository root."""
    carried = bootstrap.prepare_imports()
    import pytest

    print(f"pytest {pytest.__version__} from {'the carried wheels' if carried else 'this Python'}", flush=True)
    return int(pytest.main(list(arguments)))


def run_tests(out_dir: Path) -> dict:
    """tests/test_cuda.py in a child process (its CUDA state and memory go with it), output to `cuda_tests.log`."""
    log = out_dir / "cuda_tests.log"
    arguments = [
        TESTS, "-q", "-rsfEP", "--durations=10", "-p", "no:cacheprovider", f"--junitxml={out_dir / 'cuda_tests.xml'}"
    ]  # fmt: skip
    started = time.perf_counter()
    with log.open("w") as stream:
        try:
            returncode = subprocess.run(
                [sys.executable, __file__, PYTEST_FLAG, *arguments],
                cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, timeout=TESTS_TIMEOUT_SECONDS,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            returncode = None
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(lines[-LOG_TAIL_LINES:]), flush=True)
    return {"returncode": returncode, "timed_out": returncode is None, "seconds": time.perf_counter() - started,
            "log": log.name}  # fmt: skip


def run_profile(out_dir: Path, dry_run: bool) -> dict:
    """The verification profile, loop timing and projection (`profile_gpu.run`); an error is recorded, not raised."""
    started = time.perf_counter()
    try:
        bootstrap.prepare_imports(wheels=False)
        from gpu_check import profile_gpu

        profile_gpu.run(profile_gpu.DRY_RUN if dry_run else profile_gpu.GPU, out_dir)
        table = out_dir / profile_gpu.RESULT_MARKDOWN
        print(table.read_text(), flush=True)
        return {"ok": True, "seconds": time.perf_counter() - started}
    except Exception:  # the report says what failed; the tests' results still come back
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
        return {"ok": False, "seconds": time.perf_counter() - started, "error": error}


def versions() -> dict:
    """Python and, in a child process (this one stays free of torch until the profile), torch / CUDA /
    transformers."""
    probe = (
        "import json, torch, transformers; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
        " 'transformers': transformers.__version__, 'cuda_available': torch.cuda.is_available(),"
        " 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    record = {"python": platform.python_version(), "executable": sys.executable}
    return record | (json.loads(found.stdout) if found.returncode == 0 else {"probe_error": found.stderr[-2000:]})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [PYTEST_FLAG]:
        return run_pytest(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results folder (default $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="the profile's tiny CPU shape (tests skip on a CPU)")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out (or $OUT) is required")
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"versions": versions(), "dry_run": args.dry_run}
    print(json.dumps(summary["versions"]), flush=True)
    if not args.skip_tests:
        summary["tests"] = run_tests(args.out)
    summary["profile"] = run_profile(args.out, args.dry_run)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    tests_passed = args.skip_tests or summary["tests"]["returncode"] == 0
    return 0 if tests_passed and summary["profile"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
