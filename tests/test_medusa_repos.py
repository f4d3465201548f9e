"""Tests for Medusa-1.0 / Medusa-2 repos (FasterDecoding/medusa-1.0-*): full models whose weights hold the heads as
`medusa_head.*` beside the base's keys, with a base config.json (model_type) that carries `medusa_num_heads`.

Repos are synthesized offline: a tiny random Llama saved with `save_pretrained` (one safetensors file, sharded
safetensors, or a pytorch_model.bin), its weights then extended with heads in the reference layout
(FasterDecoding/Medusa `medusa_model.py`: per head nn.Sequential([ResBlock] * L, Linear(d, V, bias=False))).
A hand-written forward of those equations on the stored tensors checks our heads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from hub_client import tiny_tokenizer
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

import hf_hydra  # noqa: F401  (registers model type "hydra" with the Auto classes)
from hf_hydra import HydraForCausalLM, _compat, cli
from hf_hydra.reference_checkpoints import REFERENCE_TREE_NAME, reference_tree
from hf_hydra.tree import DEFAULT_TREE_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STORED_HEADS = 4  # the config says 5 (what the reference hard-codes in places): the stored heads are the truth
LAYERS = 2  # `[ResBlock(d)] * 2`: one module, so both blocks of a head hold the same tensors
LAYOUTS = ("safetensors", "sharded", "bin")
PROMPTS = ([1, 5, 9, 3], [7, 7, 2, 30, 11, 4])
SEQUENCE = [3, 17, 9, 25, 0, 12, 30, 7]


# ==================================================================================================
# Synthesized repos


def _heads_state(d: int, vocab: int, num_heads: int = STORED_HEADS, seed: int = 1) -> dict[str, torch.Tensor]:
    """`medusa_head.*` as a Medusa-1.0 model's state dict holds them."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(num_heads):
        weight, bias = 0.1 * torch.randn(d, d, generator=g), 0.1 * torch.randn(d, generator=g)
        for k in range(LAYERS):  # one ResBlock module repeated: equal tensors under each index (copies on disk)
            state |= {f"medusa_head.{i}.{k}.linear.weight": weight.clone(),
                      f"medusa_head.{i}.{k}.linear.bias": bias.clone()}
        state[f"medusa_head.{i}.{LAYERS}.weight"] = 0.3 * torch.randn(vocab, d, generator=g)
    return state


def _add_to_safetensors(path: Path, extra: dict[str, torch.Tensor]) -> None:
    save_file(load_file(path) | extra, str(path), metadata={"format": "pt"})


def _write_repo(folder: Path, layout: str, edit: Callable[[dict], None] | None = None,
                **config: object) -> tuple[Path, PreTrainedModel]:
    """A Medusa-1.0-like repo in `layout` ("safetensors", "sharded" or "bin"); returns it and its base model.
    `edit` changes the heads' tensors before they are written; `config` is merged into config.json."""
    base = make_tiny_model("llama", seed=0)
    base.save_pretrained(folder, max_shard_size="40KB" if layout == "sharded" else "50GB")
    tiny_tokenizer().save_pretrained(folder)
    heads = _heads_state(base.config.hidden_size, base.config.vocab_size)
    if edit is not None:
        edit(heads)
    if layout == "sharded":
        index_path = folder / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        last = sorted(set(index["weight_map"].values()))[-1]  # the heads sit in the last shard, as published
        _add_to_safetensors(folder / last, heads)
        index["weight_map"] |= dict.fromkeys(heads, last)
        index_path.write_text(json.dumps(index))
    elif layout == "bin":
        torch.save(load_file(folder / "model.safetensors") | heads, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    else:
        _add_to_safetensors(folder / "model.safetensors", heads)
    raw = json.loads((folder / "config.json").read_text())
    raw |= {"medusa_num_heads": 5, "medusa_num_layers": LAYERS} | config
    (folder / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return folder, base


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, tuple[Path, PreTrainedModel]]:
    """One Medusa-1.0-like repo per layout (read-only: tests that change one write their own)."""
    root = tmp_path_factory.mktemp("medusa-1.0")
    return {layout: _write_repo(root / layout, layout) for layout in LAYOUTS}


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def load_reports() -> Callable[[], list[str]]:
    """The load reports transformers' from_pretrained logged during the test (read on its own logger: whether
    transformers' loggers propagate depends on its logging setup)."""
    logger, handler = logging.getLogger(_compat.LOAD_REPORT_LOGGER), _Messages()
    logger.addHandler(handler)
    yield lambda: [message for message in handler.messages if _compat.LOAD_REPORT_TITLE in message]
    logger.removeHandler(handler)


# ==================================================================================================
# The reference equations, written out on the stored tensors (by their reference names)


def _reference_head(state: dict, i: int, hidden: torch.Tensor) -> torch.Tensor:
    """FasterDecoding/Medusa head i on h_t: L x ResBlock `x + SiLU(W x + b)`, then Linear(d, V) without bias."""
    x = hidden
    for k in range(LAYERS):
        block = f"medusa_head.{i}.{k}.linear"
        x = x + F.silu(F.linear(x, state[f"{block}.weight"], state[f"{block}.bias"]))
    return F.linear(x, state[f"medusa_head.{i}.{LAYERS}.weight"])


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor a synthesized repo stores, whatever its layout."""
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", weights_only=True)
    state = {}
    for path in folder.glob("*.safetensors"):
        state |= load_file(path)
    return state


def _base_hidden(base: PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return base(torch.tensor([tokens]), output_hidden_states=True).hidden_states[-1][0]  # (T, d), post-norm


def _head_logits(model: HydraForCausalLM) -> torch.Tensor:
    hidden = _base_hidden(model.base_lm, SEQUENCE)
    with torch.no_grad():
        return torch.stack([model.heads(i, hidden) for i in range(model.config.num_heads)])  # (H, T, V)


def _greedy(base: PreTrainedModel) -> list[list[int]]:
    return [base.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12)[0].tolist() for p in PROMPTS]


def _speculative(model: HydraForCausalLM) -> list[list[int]]:
    return [model.generate(torch.tensor([p]), speculative=True, do_sample=False, max_new_tokens=12)[0].tolist()
            for p in PROMPTS]


# ==================================================================================================
# Loading


@pytest.mark.parametrize("layout", LAYOUTS)
def test_heads_compute_the_reference_equations(repos, layout: str) -> None:
    folder, _ = repos[layout]
    model = HydraForCausalLM.from_pretrained(folder, prepack=False)  # float32 heads (packed ones draft in bfloat16)
    config = model.config
    assert config.reference_checkpoint == {"source": str(folder), "format": "medusa-in-base"}
    assert (config.head_arch, config.num_heads, config.num_layers) == ("medusa", STORED_HEADS, LAYERS)
    assert config.vocab_projection == "per_head"
    assert config.base_model_name_or_path == str(folder)  # the repo is its own base
    state = _stored(folder)
    hidden = _base_hidden(model.base_lm, SEQUENCE)
    with torch.no_grad():
        for i in range(STORED_HEADS):
            torch.testing.assert_close(model.heads(i, hidden), _reference_head(state, i, hidden), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_base_is_the_repos_own_weights_loaded_quietly(repos, layout: str, load_reports) -> None:
    folder, base = repos[layout]
    model = HydraForCausalLM.from_pretrained(folder, prepack=False)  # torch's own layers: the stored tensors
    assert load_reports() == []  # no table of "unexpected" medusa_head keys for the user
    loaded, saved = model.base_lm.state_dict(), base.state_dict()
    assert loaded.keys() == saved.keys()
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key


def test_plain_transformers_reports_the_heads_keys(repos, load_reports) -> None:
    """What the quiet load holds back: transformers' report of the medusa_head keys, under the title and logger
    hf_hydra._compat.from_pretrained_allowing recognises it by."""
    AutoModelForCausalLM.from_pretrained(repos["safetensors"][0])
    assert len(load_reports()) == 1 and "medusa_head" in load_reports()[0]


def test_speculative_generate_equals_greedy_generate_of_the_base(repos) -> None:
    folder, base = repos["sharded"]
    model = HydraForCausalLM.from_pretrained(folder)
    assert _speculative(model) == _greedy(base)


def test_heads_only_file_beside_a_base_config(tmp_path: Path, repos) -> None:
    """A config with a model_type and medusa_num_heads beside medusa_lm_head.*: heads from that file, base from
    base_model_name_or_path."""
    base_dir, base = repos["safetensors"]
    folder = tmp_path / "medusa-heads"
    folder.mkdir()
    raw = json.loads((base_dir / "config.json").read_text()) | {"base_model_name_or_path": str(base_dir)}
    (folder / "config.json").write_text(json.dumps(raw))
    heads = {k.removeprefix("medusa_head."): v for k, v in _stored(base_dir).items() if k.startswith("medusa_head.")}
    save_file(heads, str(folder / "medusa_lm_head.safetensors"))
    model = HydraForCausalLM.from_pretrained(folder)
    assert model.config.reference_checkpoint["format"] == "medusa"
    assert model.base_lm.name_or_path == str(base_dir)
    torch.testing.assert_close(_head_logits(model), _head_logits(HydraForCausalLM.from_pretrained(base_dir)))


def test_convert_writes_our_format_and_reloads_identically(tmp_path: Path, repos, load_reports) -> None:
    folder, _ = repos["bin"]
    out = tmp_path / "converted"
    assert cli.main(["convert", str(folder), str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "README.md"}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hydra" and config["head_arch"] == "medusa"
    assert config["base_model_name_or_path"] == str(folder)
    assert config["reference_checkpoint"] == {"source": str(folder), "format": "medusa-in-base"}
    assert config["tree"] == DEFAULT_TREE_NAME  # converted on a CPU
    assert all(key.startswith("heads.") for key in load_file(out / "model.safetensors"))  # heads only
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # the base again from the Medusa repo, quietly
    assert load_reports() == []
    assert torch.equal(_head_logits(reloaded), _head_logits(HydraForCausalLM.from_pretrained(folder)))


def test_reference_tree_follows_the_base_device(repos) -> None:
    assert reference_tree(torch.device("cpu"), 5) == DEFAULT_TREE_NAME
    assert reference_tree(torch.device("cuda", 0), 5) == REFERENCE_TREE_NAME
    cut = reference_tree(torch.device("cuda"), 3)  # mc_sim_7b_63 is 4 deep: cut to the heads
    assert cut and max(len(path) for path in cut) == 3
    assert HydraForCausalLM.from_pretrained(repos["safetensors"][0]).config.tree == DEFAULT_TREE_NAME


@pytest.mark.cuda
def test_on_a_gpu_the_reference_tree_decodes_losslessly(repos) -> None:
    folder, base = repos["safetensors"]
    model = HydraForCausalLM.from_pretrained(folder, device_map="cuda")
    assert model.config.tree == REFERENCE_TREE_NAME
    outputs = [model.generate(torch.tensor([p], device="cuda"), speculative=True, do_sample=False,
                              max_new_tokens=12)[0].tolist() for p in PROMPTS]
    assert outputs == _greedy(base)


# ==================================================================================================
# What must not load, or must not load quietly


def _model_weights(folder: Path) -> None:
    """Keep only the base's keys in a repo's single safetensors file."""
    path = folder / "model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("medusa_head.")}, str(path),
              metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.__setitem__("medusa_head.0.7.weight", s["medusa_head.0.2.weight"].clone()),
         r"unknown keys \['medusa_head.0.7.weight'\]"),
        (lambda s: s.pop("medusa_head.2.2.weight"), r"missing keys \['medusa_head.2.2.weight'\]"),
        (lambda s: s.__setitem__("medusa_head.1.1.linear.bias", s["medusa_head.1.1.linear.bias"] + 1), "ties them"),
        (lambda s: s.__setitem__("medusa_head.3.2.weight", s["medusa_head.3.2.weight"][:, :32].contiguous()),
         r"wrong shape.*medusa_head.3.2.weight \(128, 32\) \(expected \(128, 64\)\)"),
    ],
)
def test_heads_that_do_not_map_exactly_are_value_errors(tmp_path: Path, edit, match: str) -> None:
    folder, _ = _write_repo(tmp_path / "bad", "safetensors", edit)
    with pytest.raises(ValueError, match=match):
        HydraForCausalLM.from_pretrained(folder)


def test_medusa_config_without_heads_anywhere_is_a_value_error(tmp_path: Path) -> None:
    folder, _ = _write_repo(tmp_path / "no-heads", "safetensors")
    _model_weights(folder)
    with pytest.raises(ValueError, match=r"model weights \(.*model.safetensors\) hold no medusa_head\.\* tensors"):
        HydraForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="it has no model weights and no medusa_head"):
        HydraForCausalLM.from_pretrained(folder)


def test_base_config_without_medusa_keys_is_still_a_base(tmp_path: Path) -> None:
    folder, _ = _write_repo(tmp_path / "base", "safetensors", medusa_num_heads=None, medusa_num_layers=None)
    with pytest.raises(ValueError, match="load it as the base model"):
        HydraForCausalLM.from_pretrained(folder)


def test_weights_only_false_is_refused(repos) -> None:
    with pytest.raises(ValueError, match="never unpickles"):
        HydraForCausalLM.from_pretrained(repos["bin"][0], weights_only=False)


def test_other_findings_still_get_transformers_report(tmp_path: Path, load_reports) -> None:
    folder, _ = _write_repo(tmp_path / "partial", "safetensors")
    path = folder / "model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if k != "model.norm.weight"}, str(path),
              metadata={"format": "pt"})
    HydraForCausalLM.from_pretrained(folder)
    assert len(load_reports()) == 1 and "model.norm.weight" in load_reports()[0]
