"""Shared fixtures: seeded tiny random base models built from configs (offline, a few ms each).

The models have no bos/eos/pad token, so `generate` runs to the length limit unless a test sets
`eos_token_id` itself.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

TINY_VOCAB = 128
TINY_HIDDEN = 64

_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "llama": (LlamaConfig, {}),
    "qwen2": (Qwen2Config, {}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "gemma": (GemmaConfig, {"head_dim": 16}),
}
TINY_ARCHS: tuple[str, ...] = tuple(_CONFIGS)


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """Config of a 2-layer, hidden-64, vocab-128 model of architecture `arch` (one of `TINY_ARCHS`)."""
    config_class, arch_defaults = _CONFIGS[arch]
    kwargs = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": TINY_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention, as in the real models
        "max_position_embeddings": 512,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        # Larger than the usual 0.02 so logits are spread out (no near-ties in argmax) and the
        # attention pattern is far from uniform (a wrong mask shows up clearly).
        "initializer_range": 0.1,
    }
    return config_class(**(kwargs | arch_defaults | overrides))


def make_tiny_model(
    arch: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **config_overrides
) -> PreTrainedModel:
    """A seeded tiny random base model in eval mode (float32, CPU)."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **config_overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are skipped, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_model_factory() -> Callable[..., PreTrainedModel]:
    """`tiny_model_factory(arch="llama", seed=0, attn_implementation="sdpa", **config_overrides)`."""
    return make_tiny_model


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads spin and
    run ~7x slower. Modules of tiny-model tests use it for every test; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
