"""Run here, before the GPU machine is called: fill `gpu_check/carry/` and check that the run fits what it carries.

The GPU machine has its own python3 with torch and transformers and nothing else (no network, no pip), so the
test runner comes along: pure-python wheels of pytest and what it imports, downloaded from the package registry
into `gpu_check/carry/` (ignored by git; the run names it in `carry`), unpacked there by `bootstrap.py`.

The run copies the working tree (tracked files and untracked ones git does not ignore) plus the carried folder,
64 MiB at most in all; the shipped heads under hf_hydra/pretrained are most of it. This script measures the three
parts, refuses to go on when they exceed the limit, and prints the `run` call to make.

    python gpu_check/prepare.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY_DIR = ROOT / "gpu_check" / "carry"
# pytest and everything it imports unconditionally (exceptiongroup and tomli on Python < 3.11, pygments since
# pytest 8.4, packaging >= 24), as pure-python wheels: the machine's Python version is not known here.
WHEELS = (
    "pytest==9.2.0",
    "pluggy==1.7.0",
    "iniconfig==2.3.1",
    "packaging==26.4",
    "pygments==2.21.0",
    "exceptiongroup==1.3.2",
    "tomli==2.5.0",
)
TRANSFER_LIMIT = 64 * 2**20  # bytes the run may carry: working tree and carried paths together
RUN_TIMEOUT_SECONDS = 420  # the run's timeout_s: the script takes 2-4 minutes on an H200 (README.md)
RUN_COMMAND = 'python3 gpu_check/device_check.py --out "$OUT"'


@dataclass(frozen=True)
class TransferSize:
    """What the GPU run copies, in bytes."""

    tracked: int  # files git tracks
    untracked: int  # files git neither tracks nor ignores (they travel too)
    carried: int  # the carried folder

    @property
    def total(self) -> int:
        return self.tracked + self.untracked + self.carried


def download_wheels(target: Path = CARRY_DIR, wheels: Sequence[str] = WHEELS) -> list[Path]:
    """Pure-python wheels of `wheels` into `target` (emptied of older wheels first), with pip's own settings."""
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.whl"):
        old.unlink()
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--platform", "any", "--implementation", "py", "--abi", "none", "--python-version", "3.10",
         "--dest", str(target), *wheels],
        check=True,
    )  # fmt: skip
    return sorted(target.glob("*.whl"))


def _git_files(*args: str) -> list[Path]:
    listing = subprocess.run(["git", "ls-files", "-z", *args], cwd=ROOT, check=True, capture_output=True).stdout
    return [ROOT / name for name in listing.decode().split("\0") if name]


def _bytes(paths: Sequence[Path]) -> int:
    return sum(path.stat().st_size for path in paths if path.is_file())


def transfer_size(carried: Path = CARRY_DIR) -> TransferSize:
    """The size of the run's copy: tracked files, untracked files git does not ignore, and the carried folder."""
    return TransferSize(
        tracked=_bytes(_git_files()),
        untracked=_bytes(_git_files("--others", "--exclude-standard")),
        carried=_bytes([path for path in carried.rglob("*")]) if carried.is_dir() else 0,
    )


def run_call() -> str:
    """The device tool call that runs the check, as the README gives it."""
    carry = CARRY_DIR.relative_to(ROOT).as_posix()
    return f"run(command='{RUN_COMMAND}', carry=[\"{carry}\"], timeout_s={RUN_TIMEOUT_SECONDS})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-download", action="store_true", help="keep the wheels already in gpu_check/carry/")
    args = parser.parse_args(argv)
    wheels = sorted(CARRY_DIR.glob("*.whl")) if args.no_download else download_wheels()
    print(f"carried wheels in {CARRY_DIR.relative_to(ROOT)}/: {', '.join(w.name for w in wheels) or 'none'}")
    size = transfer_size()
    mib = 2**20
    print(
        f"transfer: tracked {size.tracked / mib:.2f} MiB + untracked {size.untracked / mib:.2f} MiB + carried "
        f"{size.carried / mib:.2f} MiB = {size.total / mib:.2f} MiB of {TRANSFER_LIMIT / mib:.0f} MiB"
    )
    if size.total > TRANSFER_LIMIT:
        print("Too large for the run: remove untracked files or large wheels, then prepare again.", file=sys.stderr)
        return 1
    print(run_call())
    return 0


if __name__ == "__main__":
    sys.exit(main())
