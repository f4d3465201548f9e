"""Tests for HydraForCausalLM (construction, heads-only save / load, Auto classes, training forward) and
HydraConfig validation. Tiny seeded random base models from conftest; everything offline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, PreTrainedModel

import hf_hydra  # noqa: F401  (registers model type "hydra" with the Auto classes)
from hf_hydra import HydraConfig, HydraForCausalLM
from hf_hydra.drafting import draft_tree
from hf_hydra.heads import ProjectedResBlock, ResBlock
from hf_hydra.tree import causal_mask

HEAD_ARCHS = ("medusa", "hydra", "hydra++")
NUM_HEADS = 4
VOCAB = 16
SAVED_FILES = {"config.json", "generation_config.json", "model.safetensors", "README.md"}  # README.md: the card
DRAFT_IDS = torch.tensor([3, 0, 7, 12, 5, 9, 1, 14])  # K = 8 of the 16 tokens, deliberately unsorted


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _base(factory: Callable[..., PreTrainedModel], arch: str = "llama", seed: int = 0, **overrides):
    return factory(arch, seed=seed, vocab_size=overrides.pop("vocab_size", VOCAB), **overrides)


def _hydra(base: PreTrainedModel, head_arch: str = "hydra", seed: int = 1, **config_kwargs) -> HydraForCausalLM:
    torch.manual_seed(seed)  # the heads' biases (and the Hydra++ prefix layer) are randomly initialised
    config_kwargs.setdefault("num_heads", NUM_HEADS)
    return HydraForCausalLM.from_base(base, head_arch=head_arch, **config_kwargs).eval()


def _randomize_heads(model: HydraForCausalLM, seed: int = 2) -> None:
    """Fresh heads have zero / identity / copied weights; make every tensor distinct so a round trip that
    mixes tensors up (or drops one) cannot pass by accident."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.heads.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def _prompt(length: int = 6, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def _speculate(model: HydraForCausalLM, prompt: torch.Tensor, **kwargs):
    return model.generate(prompt, speculative=True, max_new_tokens=20, return_dict_in_generate=True, **kwargs)


def _assert_greedy_on_three_prompts(model: HydraForCausalLM, base, tree: str) -> None:
    """Speculative decoding with `tree` gives plain greedy's tokens on three seeded prompts."""
    for seed in range(3):
        prompt = _prompt(seed=seed)
        expected = base.generate(prompt, do_sample=False, max_new_tokens=20)
        assert torch.equal(_speculate(model, prompt, tree=tree).sequences, expected)


def _assert_same_heads(a: HydraForCausalLM, b: HydraForCausalLM) -> None:
    state_a, state_b = a.heads.state_dict(), b.heads.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].dtype == state_b[key].dtype, key
        assert torch.equal(state_a[key], state_b[key]), key


# ------------------------------------------------------------------------------------------------------
# Heads-only save / load


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_save_writes_only_the_heads(tiny_model_factory, tmp_path: Path, head_arch: str) -> None:
    base = _base(tiny_model_factory, tie_word_embeddings=True)  # tied, like SmolLM2
    model = _hydra(base, head_arch, num_layers=2)
    model.save_pretrained(tmp_path)

    assert {p.name for p in tmp_path.iterdir()} == SAVED_FILES
    saved = load_file(tmp_path / "model.safetensors")
    assert all(key.startswith("heads.") for key in saved), sorted(saved)
    base_names = set(base.state_dict()) | {f"base_lm.{k}" for k in base.state_dict()}
    assert not base_names & saved.keys()
    assert not any("base_lm" in key or "embed_tokens" in key for key in saved)
    assert saved.keys() == {f"heads.{k}" for k in model.heads.state_dict()}
    for key, value in model.heads.state_dict().items():
        assert torch.equal(saved[f"heads.{key}"], value), key
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "hydra" and config["head_arch"] == head_arch
    assert (config["base_hidden_size"], config["base_vocab_size"]) == (base.config.hidden_size, VOCAB)
    generation_config = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation_config["hydra_tree"] == [list(p) for p in model.tree_buffers(model.config.tree).paths]


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_round_trip_is_bit_identical(tiny_model_factory, tmp_path: Path, head_arch: str) -> None:
    base = _base(tiny_model_factory, "qwen2")
    model = _hydra(base, head_arch, num_layers=2, dropout=0.1)
    _randomize_heads(model)
    model.save_pretrained(tmp_path)

    loaded = HydraForCausalLM.from_pretrained(tmp_path, base_model=base)
    assert isinstance(loaded, HydraForCausalLM) and loaded.base_lm is base
    assert not loaded.training and not loaded.heads.training
    _assert_same_heads(model, loaded)
    assert loaded.config.to_dict() == model.config.to_dict()
    assert loaded.generation_config.hydra_tree == model.generation_config.hydra_tree
    for seed in range(3):
        prompt = _prompt(seed=seed)
        expected = _speculate(model, prompt, tree="mc_sim_7b_63")
        got = _speculate(loaded, prompt, tree="mc_sim_7b_63")
        assert torch.equal(got.sequences, expected.sequences)
        assert got.speculation == expected.speculation  # same drafts accepted: the heads really are the same
        assert torch.equal(got.sequences, base.generate(prompt, do_sample=False, max_new_tokens=20))


def test_auto_model_loads_base_from_config_and_heads(tiny_model_factory, tmp_path: Path) -> None:
    original = _base(tiny_model_factory, "mistral", sliding_window=None)
    original.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = _hydra(base, "hydra++")
    _randomize_heads(model)
    assert model.config.base_model_name_or_path == str(tmp_path / "base")
    model.save_pretrained(tmp_path / "heads")

    assert isinstance(AutoConfig.from_pretrained(tmp_path / "heads"), HydraConfig)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "heads", prepack=False)  # torch's layers: comparable
    assert isinstance(auto, HydraForCausalLM)
    assert type(auto.base_lm) is type(base) and auto.base_lm is not base and auto.base_prepack is None
    for key, value in base.state_dict().items():
        assert torch.equal(auto.base_lm.state_dict()[key], value), key
    _assert_same_heads(model, auto)
    assert not any(p.requires_grad for p in auto.base_lm.parameters())
    prompt = _prompt()
    assert torch.equal(_speculate(auto, prompt).sequences, _speculate(model, prompt).sequences)
    # By default a base loaded onto the CPU is packed for fast inference: the same tokens.
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "heads")
    assert packed.base_prepack is not None and packed.base_prepack.layers > 0
    assert torch.equal(_speculate(packed, prompt).sequences, _speculate(model, prompt).sequences)
    # The explicit class without base_model does the same.
    explicit = HydraForCausalLM.from_pretrained(tmp_path / "heads")
    _assert_same_heads(model, explicit)
    # AutoModel gives the same class (heads need the base's LM head, so nothing is stripped).
    by_auto_model = AutoModel.from_pretrained(tmp_path / "heads", prepack=False)
    assert type(by_auto_model) is HydraForCausalLM and type(by_auto_model.base_lm) is type(base)
    _assert_same_heads(model, by_auto_model)
    assert torch.equal(_speculate(by_auto_model, prompt).sequences, _speculate(model, prompt).sequences)


def test_heads_naming_a_hub_id_load_that_id_and_no_provisioned_copy(
    tiny_model_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provisioned SmolLM2 folder holds dequantized GGUF weights: heads that name the Hub id get the Hub's
    model (here: the loader is asked for exactly that id), never the provisioned folder in its place."""
    base = _base(tiny_model_factory, "llama")
    model = _hydra(base, "hydra")
    model.config.base_model_name_or_path = hf_hydra.assets.DEFAULT_BASE_MODEL_ID
    model.save_pretrained(tmp_path / "heads")
    asked = []

    def from_pretrained(source, output_loading_info=False, **kwargs):
        asked.append(source)
        info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return (base, info) if output_loading_info else base

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    HydraForCausalLM.from_pretrained(tmp_path / "heads", prepack=False)
    assert asked == [hf_hydra.assets.DEFAULT_BASE_MODEL_ID]


def test_auto_model_passes_dtype_to_the_base_and_heads_follow(tiny_model_factory, tmp_path: Path) -> None:
    _base(tiny_model_factory).save_pretrained(tmp_path / "base")
    model = _hydra(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), "hydra++")
    model.save_pretrained(tmp_path / "heads")
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "heads", dtype=torch.bfloat16)
    assert half.base_lm.dtype == torch.bfloat16
    assert {p.dtype for p in half.heads.parameters()} == {torch.bfloat16}
    for key, value in model.heads.state_dict().items():
        assert torch.equal(half.heads.state_dict()[key], value.to(torch.bfloat16)), key


def test_saved_generation_config_sets_the_default_tree(tiny_model_factory, tmp_path: Path) -> None:
    """generation_config.json is where a tuned tree can ship (it is copied into each generate call): a tree
    written there must survive loading."""
    base = _base(tiny_model_factory)
    model = _hydra(base, "hydra")
    model.save_pretrained(tmp_path)
    path = tmp_path / "generation_config.json"
    generation_config = json.loads(path.read_text())
    generation_config["hydra_tree"] = [[0], [1], [0, 0]]
    path.write_text(json.dumps(generation_config))

    loaded = HydraForCausalLM.from_pretrained(tmp_path, base_model=base)
    assert loaded.generation_config.hydra_tree == [[0], [1], [0, 0]]
    prompt = _prompt()
    default = _speculate(loaded, prompt)
    assert default.speculation == _speculate(loaded, prompt, tree=[[0], [1], [0, 0]]).speculation
    assert max(default.speculation.accepted_lengths) <= 3  # depth 2 + bonus


def test_save_refuses_pickle(tiny_model_factory, tmp_path: Path) -> None:
    model = _hydra(_base(tiny_model_factory))
    with pytest.raises(ValueError, match="safetensors"):
        model.save_pretrained(tmp_path, safe_serialization=False)


# ------------------------------------------------------------------------------------------------------
# Loading errors


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"hidden_size": 32}, "hidden size 32"), ({"vocab_size": 24}, "vocabulary 24")],
)
def test_mismatched_base_is_a_value_error(tiny_model_factory, tmp_path: Path, overrides: dict, match: str) -> None:
    model = _hydra(_base(tiny_model_factory))
    model.save_pretrained(tmp_path)
    other = _base(tiny_model_factory, **overrides)
    with pytest.raises(ValueError, match=match) as error:
        HydraForCausalLM.from_pretrained(tmp_path, base_model=other)
    assert "trained for" in str(error.value)
    with pytest.raises(ValueError, match=match):
        HydraForCausalLM(model.config, other)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.5, 0.97])
def test_corrupted_weights_are_a_value_error(tiny_model_factory, tmp_path: Path, keep_fraction: float) -> None:
    base = _base(tiny_model_factory)
    _hydra(base).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(ValueError, match="corrupt"):
        HydraForCausalLM.from_pretrained(tmp_path, base_model=base)


def test_garbage_weights_are_a_value_error(tiny_model_factory, tmp_path: Path) -> None:
    base = _base(tiny_model_factory)
    _hydra(base).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64 + b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        HydraForCausalLM.from_pretrained(tmp_path, base_model=base)


def test_wrong_key_set_is_a_value_error_listing_keys(tiny_model_factory, tmp_path: Path) -> None:
    base = _base(tiny_model_factory)
    _hydra(base).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    weights = load_file(path)
    weights.pop("heads.heads.2.blocks.0.res_connection.weight")
    weights["heads.heads.9.bogus.weight"] = torch.zeros(2)
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing") as error:
        HydraForCausalLM.from_pretrained(tmp_path, base_model=base)
    assert "heads.heads.2.blocks.0.res_connection.weight" in str(error.value)
    assert "heads.heads.9.bogus.weight" in str(error.value)


def test_weights_of_another_head_arch_are_a_value_error(tiny_model_factory, tmp_path: Path) -> None:
    base = _base(tiny_model_factory)
    _hydra(base, "hydra").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["head_arch"] = "medusa"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'medusa'") as error:
        HydraForCausalLM.from_pretrained(tmp_path, base_model=base)
    assert "res_connection" in str(error.value)


def test_wrong_tensor_shape_is_a_value_error(tiny_model_factory, tmp_path: Path) -> None:
    """Right keys, wrong shape (a file edited or written for another size): a ValueError naming the tensor,
    like every other loading problem, not a RuntimeError from deep inside load_state_dict."""
    base = _base(tiny_model_factory)
    _hydra(base).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    weights = load_file(path)
    weights["heads.heads.0.output.bias"] = torch.zeros(5)
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="heads.heads.0.output.bias"):
        HydraForCausalLM.from_pretrained(tmp_path, base_model=base)


# ------------------------------------------------------------------------------------------------------
# HydraConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head_arch": "eagle"}, "head_arch"),
        ({"num_heads": 0}, "num_heads"),
        ({"num_heads": 2.5}, "num_heads"),
        ({"num_layers": 0}, "num_layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"vocab_projection": "tied"}, "vocab_projection"),
        ({"vocab_projection": "draft_vocab"}, "draft_vocab_size"),
        ({"vocab_projection": "draft_vocab", "draft_vocab_size": 0}, "draft_vocab_size"),
        ({"vocab_projection": "draft_vocab", "draft_vocab_size": 20, "base_vocab_size": 16}, "exceeds"),
        ({"acceptance": "nucleus"}, "acceptance"),
        ({"tree": "mc_sim_7b_63", "num_heads": 3}, "only 3 draft heads"),
        ({"tree": [[0], [0, 0], [0, 0, 0]], "num_heads": 2}, "only 2 draft heads"),
        ({"tree": "no_such_tree"}, "Unknown tree"),
        ({"tree": [[0], [2, 1]]}, "no parent"),
        ({"tree": []}, "at least one node"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HydraConfig(**kwargs)


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", [[0], [1], [0, 0], [0, 0, 0]]])
def test_config_round_trip(tmp_path: Path, tree) -> None:
    config = HydraConfig(
        base_model_name_or_path="some/base",
        base_model_revision="abc123",
        base_hidden_size=64,
        base_vocab_size=128,
        head_arch="hydra++",
        num_heads=4,
        num_layers=3,
        dropout=0.2,
        vocab_projection="draft_vocab",
        draft_vocab_size=32,
        tree=tree,
    )
    config.save_pretrained(tmp_path)
    for loaded in (HydraConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, HydraConfig)
        drop = {"_name_or_path"}  # where it was loaded from
        assert {k: v for k, v in loaded.to_dict().items() if k not in drop} == {
            k: v for k, v in config.to_dict().items() if k not in drop
        }
        assert loaded.tree == tree


@pytest.mark.parametrize("num_heads", [1, 2, 3])
def test_default_tree_fits_fewer_heads(tiny_model_factory, num_heads: int) -> None:
    """The default tree (cpu_small_11, depth 4) must not make configs with fewer heads invalid: a user
    asking for 2 heads and no particular tree should get a working model."""
    HydraConfig(num_heads=num_heads)  # must not raise
    base = _base(tiny_model_factory)
    model = _hydra(base, "hydra", num_heads=num_heads)
    prompt = _prompt()
    assert torch.equal(
        model.generate(prompt, speculative=True, max_new_tokens=12),
        base.generate(prompt, do_sample=False, max_new_tokens=12),
    )


# ------------------------------------------------------------------------------------------------------
# Vocabulary projections


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_shared_projection(tiny_model_factory, tmp_path: Path, head_arch: str) -> None:
    base = _base(tiny_model_factory, "llama")
    model = _hydra(base, head_arch, vocab_projection="shared")
    assert all(head.output is None for head in model.heads.heads)
    lm_head = base.get_output_embeddings().weight
    assert model.heads.shared_output_weight.data_ptr() == lm_head.data_ptr()  # a view, not a copy
    _randomize_heads(model)
    _assert_greedy_on_three_prompts(model, base, "mc_sim_7b_63")

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not any("output" in key or "lm_head" in key for key in saved), sorted(saved)
    loaded = HydraForCausalLM.from_pretrained(tmp_path, base_model=base)
    _assert_same_heads(model, loaded)
    assert loaded.heads.shared_output_weight.data_ptr() == lm_head.data_ptr()
    prompt = _prompt()
    assert _speculate(loaded, prompt).speculation == _speculate(model, prompt).speculation

    model.train()
    out = model(_prompt(9)[:, :9].repeat(2, 1), return_head_logits=True)
    assert out.head_logits.shape == (2, NUM_HEADS, 9, VOCAB)
    out.head_logits.sum().backward()
    assert lm_head.grad is None


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_draft_vocab_projection(tiny_model_factory, tmp_path: Path, head_arch: str) -> None:
    base = _base(tiny_model_factory, "qwen2")
    model = _hydra(base, head_arch, vocab_projection="draft_vocab", draft_token_ids=DRAFT_IDS)
    assert model.config.draft_vocab_size == len(DRAFT_IDS)
    assert torch.equal(model.heads.draft_token_ids, DRAFT_IDS)
    lm_head = base.get_output_embeddings().weight
    for head in model.heads.heads:  # initialised from the base lm_head rows of the draft tokens
        assert torch.equal(head.output.weight, lm_head[DRAFT_IDS])
    _randomize_heads(model)
    _assert_greedy_on_three_prompts(model, base, "cpu_small_11")

    # Drafts come from the draft vocabulary only.
    tree = model.tree_buffers("cpu_small_11")
    context = torch.randn(base.config.hidden_size)
    drafted = draft_tree(model.heads, tree, context, torch.tensor(2), base.get_input_embeddings()).tokens[1:]
    assert set(drafted.tolist()) <= set(DRAFT_IDS.tolist())

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert torch.equal(saved["heads.draft_token_ids"], DRAFT_IDS)
    assert json.loads((tmp_path / "config.json").read_text())["draft_vocab_size"] == len(DRAFT_IDS)
    loaded = HydraForCausalLM.from_pretrained(tmp_path, base_model=base)
    _assert_same_heads(model, loaded)
    prompt = _prompt()
    assert _speculate(loaded, prompt).speculation == _speculate(model, prompt).speculation

    out = model(_prompt(7).repeat(3, 1), return_head_logits=True)
    assert out.head_logits.shape == (3, NUM_HEADS, 7, len(DRAFT_IDS))


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_shared_draft_vocab_projection(tiny_model_factory, tmp_path: Path, head_arch: str) -> None:
    base = _base(tiny_model_factory, "llama")
    model = _hydra(base, head_arch, vocab_projection="shared_draft_vocab", draft_token_ids=DRAFT_IDS)
    lm_head = base.get_output_embeddings().weight
    assert all(head.output is None for head in model.heads.heads)
    assert torch.equal(model.heads.shared_output_weight, lm_head[DRAFT_IDS])
    _randomize_heads(model)
    _assert_greedy_on_three_prompts(model, base, "cpu_small_11")

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not any("output" in key for key in saved), sorted(saved)  # the frozen rows are not saved
    assert torch.equal(saved["heads.draft_token_ids"], DRAFT_IDS)
    loaded = HydraForCausalLM.from_pretrained(tmp_path, base_model=base)
    _assert_same_heads(model, loaded)
    assert torch.equal(loaded.heads.shared_output_weight, lm_head[DRAFT_IDS])
    prompt = _prompt()
    assert _speculate(loaded, prompt).speculation == _speculate(model, prompt).speculation

    # Loading other draft ids into the module takes the matching base rows.
    other_ids = DRAFT_IDS.flip(0)
    state = {**model.heads.state_dict(), "draft_token_ids": other_ids}
    model.heads.load_state_dict(state)
    assert torch.equal(model.heads.shared_output_weight, lm_head[other_ids])

    model.train()
    out = model(_prompt(7).repeat(2, 1), return_head_logits=True)
    assert out.head_logits.shape == (2, NUM_HEADS, 7, len(DRAFT_IDS))
    out.head_logits.sum().backward()
    assert lm_head.grad is None


@pytest.mark.parametrize(
    ("draft_token_ids", "match"),
    [
        (None, "draft_token_ids"),
        (torch.tensor([1, 2, 2, 3]), "distinct"),
        (torch.tensor([1, 2, 16]), "distinct"),
        (torch.tensor([-1, 2, 3]), "distinct"),
    ],
)
def test_bad_draft_token_ids(tiny_model_factory, draft_token_ids, match: str) -> None:
    base = _base(tiny_model_factory)
    with pytest.raises(ValueError, match=match):
        _hydra(base, vocab_projection="draft_vocab", draft_token_ids=draft_token_ids)
    with pytest.raises(ValueError, match="draft_token_ids has 3 ids"):
        _hydra(base, vocab_projection="draft_vocab", draft_token_ids=torch.tensor([1, 2, 3]), draft_vocab_size=4)


def test_tree_wider_than_the_draft_vocabulary_is_a_value_error(tiny_model_factory) -> None:
    """mc_sim_7b_63 asks head 0 for its top 10; draft-vocabulary heads with K = 8 have only 8 candidates.
    That must be a clear ValueError up front, not a RuntimeError from topk in the middle of decoding."""
    base = _base(tiny_model_factory)
    model = _hydra(base, vocab_projection="draft_vocab", draft_token_ids=DRAFT_IDS)
    with pytest.raises(ValueError, match="8"):
        model.generate(_prompt(), speculative=True, tree="mc_sim_7b_63", max_new_tokens=5)


# ------------------------------------------------------------------------------------------------------
# Training forward


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_training_forward_shapes_and_gradients(tiny_model_factory, head_arch: str) -> None:
    base = _base(tiny_model_factory, "gemma")
    model = _hydra(base, head_arch, num_layers=2).train()
    _randomize_heads(model)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))

    plain = model(ids)
    assert plain.head_logits is None
    out = model(ids, return_head_logits=True)
    assert out.head_logits.shape == (2, NUM_HEADS, 9, VOCAB)
    with torch.no_grad():
        reference = base(ids, output_hidden_states=True)
    torch.testing.assert_close(out.logits, reference.logits)
    torch.testing.assert_close(out.last_hidden_state, base.model(ids).last_hidden_state)  # post-norm

    out.head_logits.sum().backward()
    for name, param in model.heads.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_teacher_forcing_feeds_each_head_the_true_next_tokens(tiny_model_factory, head_arch: str) -> None:
    """head_logits[:, i, t] is head i reading the context at t and (Hydra) E(x_{t+1}) .. E(x_{t+i+1}),
    the same call drafting makes when those tokens are on the path: head i at t predicts x_{t+i+2}."""
    base = _base(tiny_model_factory, "llama")
    model = _hydra(base, head_arch)
    _randomize_heads(model)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(ids, return_head_logits=True)
        context = model.heads.encode_context(out.last_hidden_state, torch.arange(10)[None], None)  # (2, 10, d)
        embeds = base.get_input_embeddings()(ids)  # (2, 10, d)
        for b in range(2):
            for i in range(NUM_HEADS):
                for t in range(10 - i - 1):
                    path = embeds[b, t + 1 : t + i + 2] if model.heads.sequential else None  # (i + 1, d)
                    expected = model.heads(i, context[b, t], path)
                    torch.testing.assert_close(out.head_logits[b, i, t], expected, atol=1e-5, rtol=1e-5)


def test_hydra_plus_plus_dropout_only_in_train_mode(tiny_model_factory) -> None:
    base = _base(tiny_model_factory)
    model = _hydra(base, "hydra++", dropout=0.5)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    first, second = (model(ids, return_head_logits=True).head_logits for _ in range(2))
    assert not torch.equal(first, second)
    model.eval()
    first, second = (model(ids, return_head_logits=True).head_logits for _ in range(2))
    assert torch.equal(first, second)
    # Medusa and Hydra heads have no dropout (the paper's Hydra++ recipe only).
    for head_arch in ("medusa", "hydra"):
        other = _hydra(base, head_arch, dropout=0.5).train()
        assert not any(isinstance(m, nn.Dropout) for m in other.modules())
        assert torch.equal(
            other(ids, return_head_logits=True).head_logits, other(ids, return_head_logits=True).head_logits
        )


def test_train_mode_keeps_the_frozen_base_in_eval(tiny_model_factory) -> None:
    """Only the heads train: model.train() (as a Trainer calls it) must not switch on the frozen base's
    own dropout, or its hidden states and teacher logits turn noisy."""
    base = _base(tiny_model_factory, "llama", attention_dropout=0.5)
    model = _hydra(base, "hydra").train()
    assert model.heads.training
    assert not model.base_lm.training
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_hydra_plus_plus_prefix_layer_is_a_fresh_base_decoder_layer(tiny_model_factory) -> None:
    base = _base(tiny_model_factory, "qwen2")
    model = _hydra(base, "hydra++")
    layer = model.heads.prefix_layer.layer
    assert type(layer) is type(base.model.layers[0])
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    assert not any(p.data_ptr() in base_ptrs for p in model.heads.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_hydra_plus_plus_prefix_layer_is_causal_over_a_prompt_and_in_chunks(tiny_model_factory, attn_implementation):
    """Over a prompt (nothing cached) sdpa runs the prefix layer causally without building an L x L mask; the
    output is the layer's with an explicit causal mask, and running the prompt in two cached chunks agrees."""
    model = _hydra(_base(tiny_model_factory, attn_implementation=attn_implementation), "hydra++")
    prefix = model.heads.prefix_layer
    hidden = torch.randn(1, 12, model.config.base_hidden_size)  # (1, L, d)
    positions = torch.arange(12)[None]  # (1, L)
    with torch.no_grad():
        whole = prefix(hidden, positions, None)
        explicit = prefix.norm(
            prefix.layer(
                hidden,
                attention_mask=causal_mask(12, 0, hidden.dtype, hidden.device),
                position_ids=positions,
                position_embeddings=prefix.rotary_emb(hidden, positions),
            )
        )
        cache = DynamicCache()
        first, rest = (prefix(hidden[:, part], positions[:, part], cache) for part in (slice(0, 7), slice(7, 12)))
        chunks = torch.cat([first, rest], dim=1)
    torch.testing.assert_close(whole, explicit)
    torch.testing.assert_close(chunks, whole)


# ------------------------------------------------------------------------------------------------------
# Module structure


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_no_weight_tying_between_blocks_or_heads(tiny_model_factory, head_arch: str) -> None:
    base = _base(tiny_model_factory)
    model = _hydra(base, head_arch, num_layers=3)
    blocks = [block for head in model.heads.heads for block in head.blocks]
    assert len(blocks) == NUM_HEADS * 3
    assert len({id(block) for block in blocks}) == len(blocks)
    params = list(model.heads.parameters())
    assert len({p.data_ptr() for p in params}) == len(params)
    for head in model.heads.heads:
        expected_first = ProjectedResBlock if head_arch != "medusa" else ResBlock
        assert type(head.blocks[0]) is expected_first
        assert all(type(block) is ResBlock for block in head.blocks[1:])
    # Changing one block leaves every other one alone.
    with torch.no_grad():
        blocks[1].linear.weight.add_(1.0)
    assert all(not torch.equal(blocks[1].linear.weight, b.linear.weight) for b in blocks if b is not blocks[1])


def test_hydra_first_block_widths(tiny_model_factory) -> None:
    base = _base(tiny_model_factory)
    d = base.config.hidden_size
    model = _hydra(base, "hydra")
    for i, head in enumerate(model.heads.heads):
        assert head.blocks[0].linear.in_features == d * (i + 2)
        assert head.blocks[0].res_connection.weight.shape == (d, d * (i + 2))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_heads_follow_the_base_dtype_and_device(tiny_model_factory, device: str) -> None:
    """As `from_pretrained(..., device_map=...)` places the base: the heads go where its lm_head is."""
    base = _base(tiny_model_factory).to(device=device, dtype=torch.bfloat16)
    model = _hydra(base, "hydra++")
    assert {(p.device.type, p.dtype) for p in model.heads.parameters()} == {(device, torch.bfloat16)}
