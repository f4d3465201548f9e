"""Make hf_hydra and the carried test tools importable on a machine where nothing of ours is installed.

The GPU machine receives the working tree and runs its own `python3` (torch and transformers only). Two things
are missing there, and this module supplies both before anything imports them:

* `hf_hydra.model_cards`: an installed hf_hydra maps it to the top-level `model_cards/` folder (pyproject's
  `package-dir`); from the repository root `import hf_hydra` fails without it (`model_card.py` reads its template
  through `importlib.resources`). `expose_model_cards` registers that folder under the package name.
* pytest (and pluggy, iniconfig, ...): `prepare.py` downloads their pure-python wheels into `gpu_check/carry/`,
  which the device run carries; `use_carried_wheels` unpacks them into a temporary folder first on `sys.path`.

Standard library only: it runs before torch, transformers or hf_hydra are imported.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY_DIR = ROOT / "gpu_check" / "carry"  # prepare.py's output (ignored by git; the device run carries it)


def expose_model_cards(root: Path = ROOT) -> None:
    """Register `<root>/model_cards` as the module `hf_hydra.model_cards` (what an install maps it to), unless
    hf_hydra is already imported (then it found its own)."""
    if "hf_hydra" in sys.modules or "hf_hydra.model_cards" in sys.modules:
        return
    spec = importlib.machinery.PathFinder.find_spec("hf_hydra.model_cards", [str(root)])
    if spec is None or spec.loader is None:
        raise ImportError(f"{root / 'model_cards'} is missing: run from a checkout of the repository.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


def use_carried_wheels(carry_dir: Path = CARRY_DIR) -> list[str]:
    """Unpack every wheel in `carry_dir` into one temporary folder and put it first on `sys.path` (so the carried
    pytest wins over an installed one: the same version everywhere); returns the wheels' names, [] without any."""
    wheels = sorted(carry_dir.glob("*.whl")) if carry_dir.is_dir() else []
    if not wheels:
        return []
    target = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
    sys.path.insert(0, str(target))
    return [wheel.name for wheel in wheels]


def prepare_imports(root: Path = ROOT, wheels: bool = True) -> list[str]:
    """The repository root first on `sys.path`, `hf_hydra.model_cards` registered and, with `wheels`, the carried
    wheels unpacked (only the tests need them); returns the carried wheels' names."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    expose_model_cards(root)
    return use_carried_wheels(root / "gpu_check" / "carry") if wheels else []
