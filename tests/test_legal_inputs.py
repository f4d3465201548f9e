"""Every legal input gives plain `generate`'s output or a clear refusal, on both speculative paths.

One test per input that once went wrong (a silent difference or a crash deep in torch), on tiny models of
the architectures involved, and one sweep over the logits processors and stopping criteria transformers
ships for decoder-only models. The reference is always the base model's own `generate`.
"""

from __future__ import annotations

import pytest
import torch
from test_decoding import (
    FULL_TREE,
    NUM_HEADS,
    SMALL_VOCAB,
    RecordingStreamer,
    _char_tokenizer,
    _check_streamed,
    _hydra,
    _plain,
    _prompts,
)
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    DynamicCache,
    FalconConfig,
    GenerationConfig,
    GenerationMixin,
    GPT2Config,
    OPTConfig,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from hf_hydra import HydraForCausalLM, support
from hf_hydra.cache_name import cache_argument
from hf_hydra.dynamic_tree import DynamicTreePolicy
from hf_hydra.tree import build_tree_buffers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATHS = {"tree": {"speculative": True, "tree": FULL_TREE}, "assisted": {"speculative": "assisted"}}
# and dynamic trees, where the position scheme cuts a step's depth (the heads of `_on` carry a policy)
POSITION_PATHS = PATHS | {"dynamic_tree": {"speculative": True, "tree": "dynamic"}}
# Verifying m tokens costs 1 + 0.02 (m - 1): nearly flat, so dynamic trees grow big and deep.
FLAT_COST = DynamicTreePolicy(tuple(1.0 + 0.02 * m for m in range(32)))
TABLE_SIZE = 24  # learned absolute positions of the tiny GPT-2 and OPT


def _on(base: PreTrainedModel, head_arch: str = "medusa") -> HydraForCausalLM:
    """Fresh heads on `base`. Fresh Medusa heads copy the base's lm_head, so on a tiny model that repeats
    itself they guess right often: the assisted loop then accepts chunks of several tokens."""
    torch.manual_seed(100)
    model = HydraForCausalLM.from_base(base, head_arch=head_arch, num_heads=NUM_HEADS).eval()
    model.dynamic_tree = FLAT_COST
    return model


def _from_config(config) -> PreTrainedModel:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _same(model: HydraForCausalLM, prompt: torch.Tensor | None, path: str, **kwargs) -> torch.Tensor:
    """Speculative output on `path`, asserted equal to plain greedy `generate`'s."""
    plain = _plain(model, prompt, **kwargs)
    out = model.generate(prompt, **POSITION_PATHS[path], **kwargs)
    assert torch.equal(out, plain), f"{path}: {out.tolist()} != plain {plain.tolist()}"
    return out


# ------------------------------------------------------------------------------------------------------
# 1. The assisted loop stops inside an accepted chunk, as one-token decoding does


class StopAtLength(StoppingCriteria):
    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def _transformers_assisted(model: HydraForCausalLM, prompt: torch.Tensor, **kwargs) -> torch.Tensor:
    """transformers' own assisted loop with our drafter and nothing around it (stopping checked per chunk)."""
    cache = DynamicCache(config=model.base_lm.config)
    return GenerationMixin.generate(
        model, prompt, custom_generate=GenerationMixin._assisted_decoding, **cache_argument(cache), **kwargs
    )


def test_assisted_stops_inside_a_chunk_at_custom_criteria_and_streams_up_to_the_stop(tiny_model_factory) -> None:
    model = _on(tiny_model_factory("llama", seed=0, vocab_size=SMALL_VOCAB))
    missed_by_chunks = 0
    for prompt in _prompts(SMALL_VOCAB, lengths=(3, 5, 8)):
        for stop in range(prompt.shape[1] + 2, prompt.shape[1] + 16):
            criteria = StoppingCriteriaList([StopAtLength(stop)])
            kwargs = {"max_new_tokens": 20, "do_sample": False, "stopping_criteria": criteria}
            plain = model.base_lm.generate(prompt, **kwargs)
            streamer = RecordingStreamer()
            out = model.generate(prompt, speculative="assisted", streamer=streamer, **kwargs)
            assert torch.equal(out, plain) and out.shape[1] == stop
            _check_streamed(streamer, prompt, out)
            missed_by_chunks += _transformers_assisted(model, prompt, **kwargs).shape[1] > stop
    assert missed_by_chunks > 0, "no stop fell inside an accepted chunk: the test would not see the bug"


def test_assisted_stops_inside_a_chunk_at_stop_strings(tiny_model_factory) -> None:
    tokenizer = _char_tokenizer()
    model = _on(tiny_model_factory("llama", seed=0, vocab_size=SMALL_VOCAB))
    for prompt in _prompts(SMALL_VOCAB, lengths=(3, 5, 8)):
        text = tokenizer.decode(_plain(model, prompt, max_new_tokens=20)[0, prompt.shape[1] :])
        for stop in sorted({text[i : i + 2] for i in range(1, len(text) - 1)}):
            _same(model, prompt, "assisted", max_new_tokens=20, stop_strings=[stop], tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------------
# 2. Dynamic and longrope RoPE past the original context length


ROPE = {
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "longrope": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 12,
        "short_factor": [1.0] * 8,
        "long_factor": [3.0 + i for i in range(8)],
    },
}


@pytest.mark.parametrize("path", POSITION_PATHS)
@pytest.mark.parametrize("rope", ROPE)
def test_dynamic_and_longrope_rope_stay_exact_past_the_original_length(tiny_model_factory, rope, path) -> None:
    """Original length 12: prompts of 2..13 tokens and 20 new ones cross it in every phase of a step."""
    length = 12 if rope == "dynamic" else 48  # dynamic: max_position_embeddings is the original length
    base = tiny_model_factory("llama", seed=0, vocab_size=SMALL_VOCAB, max_position_embeddings=length,
                              rope_parameters=ROPE[rope])  # fmt: skip
    model = _on(base, "hydra")
    for prompt in _prompts(SMALL_VOCAB, lengths=tuple(range(2, 14))):
        _same(model, prompt, path, max_new_tokens=20)


def test_position_limits_cut_steps_at_the_table_end_and_around_the_original_length() -> None:
    table = support.PositionLimits(table_size=10)
    assert [table.max_depth(past) for past in (0, 5, 8, 9)] == [9, 4, 1, 0]
    dynamic = support.PositionLimits(rope_type="dynamic", original_length=12)
    assert [dynamic.max_depth(past) for past in (0, 8, 11, 12, 30)] == [11, 3, 0, 0, 0]
    longrope = support.PositionLimits(rope_type="longrope", original_length=12)
    assert [longrope.max_depth(past) for past in (0, 8, 11, 12, 30)] == [11, 3, 0, None, None]
    assert support.PositionLimits().max_depth(10_000) is None


def test_position_schemes_are_read_from_the_config(tiny_model_factory) -> None:
    assert support.position_limits(ABSOLUTE["gpt2"]()) == support.PositionLimits(table_size=TABLE_SIZE)
    assert support.position_limits(ABSOLUTE["opt"]()) == support.PositionLimits(table_size=TABLE_SIZE)
    for alibi in ALIBI.values():  # no position table: ALiBi has no length limit
        assert support.position_limits(alibi()) == support.PositionLimits()
    assert support.position_limits(tiny_model_factory("llama").config) == support.PositionLimits()
    dynamic = tiny_model_factory("llama", max_position_embeddings=12, rope_parameters=ROPE["dynamic"]).config
    assert support.position_limits(dynamic) == support.PositionLimits(rope_type="dynamic", original_length=12)
    longrope = tiny_model_factory("llama", max_position_embeddings=48, rope_parameters=ROPE["longrope"]).config
    assert support.position_limits(longrope) == support.PositionLimits(rope_type="longrope", original_length=12)


def test_a_tree_cut_to_a_depth_keeps_its_first_nodes() -> None:
    tree = build_tree_buffers("cpu_small_11", NUM_HEADS)
    root_only = tree.truncated(0)
    assert root_only.num_tokens == 1 and root_only.max_depth == 0 and root_only.leaf_paths.tolist() == [[0]]
    two = tree.truncated(2)
    assert two.paths == build_tree_buffers([p for p in tree.paths if len(p) <= 2], NUM_HEADS).paths
    reference = build_tree_buffers(two.paths, NUM_HEADS)
    for name in ("depths", "parents", "attention_mask", "ancestors", "leaf_path_lengths"):
        assert torch.equal(getattr(two, name), getattr(reference, name)), name
    assert sorted(map(tuple, two.leaf_paths.tolist())) == sorted(map(tuple, reference.leaf_paths.tolist()))
    assert tree.truncated(NUM_HEADS) is tree


# ------------------------------------------------------------------------------------------------------
# 3. Contrastive search and DoLa are refused (plain generate moved them to Hub code)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", [{"penalty_alpha": 0.6, "top_k": 4}, {"dola_layers": "high"}])
def test_contrastive_search_and_dola_are_refused(tiny_model_factory, option, path) -> None:
    model = _hydra(tiny_model_factory)
    with pytest.raises(ValueError, match="contrastive search, DoLa"):
        model.generate(_prompts(SMALL_VOCAB)[1], **PATHS[path], max_new_tokens=4, **option)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", ["assistant_model", "prompt_lookup_num_tokens"])
def test_a_second_drafter_is_refused(tiny_model_factory, option, path) -> None:
    model = _hydra(tiny_model_factory)
    value = model.base_lm if option == "assistant_model" else 3
    with pytest.raises(ValueError, match=f"a second drafter.*{option}"):
        model.generate(_prompts(SMALL_VOCAB)[1], **PATHS[path], max_new_tokens=4, **{option: value})


# ------------------------------------------------------------------------------------------------------
# 4. Learned absolute positions up to the last row of the table


ABSOLUTE = {
    "gpt2": lambda: GPT2Config(vocab_size=SMALL_VOCAB, n_positions=TABLE_SIZE, n_embd=64, n_layer=2, n_head=4,
                               bos_token_id=None, eos_token_id=None),
    "opt": lambda: OPTConfig(vocab_size=SMALL_VOCAB, max_position_embeddings=TABLE_SIZE, hidden_size=64,
                             num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                             bos_token_id=None, eos_token_id=None, pad_token_id=None),
}  # fmt: skip


@pytest.mark.parametrize("path", POSITION_PATHS)
@pytest.mark.parametrize("arch", ABSOLUTE)
def test_learned_positions_run_to_the_end_of_their_table(arch, path) -> None:
    model = _on(_from_config(ABSOLUTE[arch]()), "hydra")
    for prompt in _prompts(SMALL_VOCAB, lengths=(3, 12, 20, 22, 23)):
        for tree in (FULL_TREE, "cpu_small_11"):
            plain = _plain(model, prompt, max_length=TABLE_SIZE)
            out = model.generate(prompt, **(POSITION_PATHS[path] | ({"tree": tree} if path == "tree" else {})),
                                 max_length=TABLE_SIZE)  # fmt: skip
            assert torch.equal(out, plain) and out.shape[1] == TABLE_SIZE


# ------------------------------------------------------------------------------------------------------
# 5. ALiBi: refused by the tree loop, exact in the assisted loop


ALIBI = {
    "bloom": lambda: BloomConfig(vocab_size=SMALL_VOCAB, hidden_size=64, n_layer=2, n_head=4, bos_token_id=None,
                                 eos_token_id=None, pad_token_id=None),
    "falcon": lambda: FalconConfig(vocab_size=SMALL_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   alibi=True, new_decoder_architecture=False, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=None),
}  # fmt: skip


@pytest.mark.parametrize("arch", ALIBI)
def test_alibi_is_refused_by_the_tree_loop_and_exact_assisted(arch) -> None:
    model = _on(_from_config(ALIBI[arch]()), "hydra")
    with pytest.raises(ValueError, match=rf"ALiBi.*\({arch}\).*speculative='assisted'"):
        model.generate(_prompts(SMALL_VOCAB)[1], speculative=True, max_new_tokens=4)
    for prompt in _prompts(SMALL_VOCAB):
        _same(model, prompt, "assisted", max_new_tokens=12)


# ------------------------------------------------------------------------------------------------------
# 6. Attention kernels that take no 4D mask are refused (heads on the base's device: test_modeling.py)


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3", "flex_attention"])
def test_attention_without_4d_masks_is_refused_by_the_tree_loop(tiny_model_factory, implementation) -> None:
    config = tiny_model_factory("llama").config
    config._attn_implementation = implementation
    with pytest.raises(ValueError, match=f"attn_implementation='{implementation}'.*attn_implementation='sdpa'"):
        support.check_tree_base(config)


def test_flex_attention_base_is_refused_by_generate(tiny_model_factory) -> None:
    model = _on(tiny_model_factory("llama", seed=0, vocab_size=SMALL_VOCAB, attn_implementation="flex_attention"))
    with pytest.raises(ValueError, match="flex_attention"):
        model.generate(_prompts(SMALL_VOCAB)[1], speculative=True, max_new_tokens=4)


# ------------------------------------------------------------------------------------------------------
# 7. Stop strings of the model's generation config, with the caller's own generation config


@pytest.mark.parametrize("path", PATHS)
def test_model_stop_strings_with_a_user_generation_config(tiny_model_factory, path) -> None:
    tokenizer = _char_tokenizer()
    model = _on(tiny_model_factory("llama", seed=0, vocab_size=SMALL_VOCAB))
    prompt = _prompts(SMALL_VOCAB)[1]
    text = tokenizer.decode(_plain(model, prompt, max_new_tokens=20)[0, prompt.shape[1] :])
    model.generation_config.stop_strings = [text[6:8]]  # the base shares this object
    try:
        user_config = GenerationConfig(max_new_tokens=20, do_sample=False)
        plain = model.base_lm.generate(prompt, generation_config=user_config, tokenizer=tokenizer)
        assert plain.shape[1] < prompt.shape[1] + 20
        out = model.generate(prompt, **PATHS[path], generation_config=user_config, tokenizer=tokenizer)
        assert torch.equal(out, plain)
    finally:
        model.generation_config.stop_strings = None


# ------------------------------------------------------------------------------------------------------
# 8. A prompt given as embeddings only


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head_arch", ["medusa", "hydra", "hydra++"])
def test_a_prompt_of_embeddings(tiny_model_factory, head_arch, path) -> None:
    model = _hydra(tiny_model_factory, "llama", head_arch)
    for prompt in _prompts(SMALL_VOCAB):
        embeds = model.base_lm.get_input_embeddings()(prompt)  # (1, L, d)
        plain = model.base_lm.generate(inputs_embeds=embeds, max_new_tokens=16, do_sample=False)
        out = model.generate(inputs_embeds=embeds, **PATHS[path], max_new_tokens=16)
        assert torch.equal(out, plain) and out.shape[1] == 16


# ------------------------------------------------------------------------------------------------------
# 9. The caller's cache in the assisted loop


def test_assisted_takes_the_callers_empty_cache_and_refuses_a_filled_one(tiny_model_factory) -> None:
    model = _on(tiny_model_factory("llama", seed=0, vocab_size=SMALL_VOCAB))
    prompt = _prompts(SMALL_VOCAB)[1]
    cache = DynamicCache(config=model.base_lm.config)
    out = model.generate(prompt, speculative="assisted", max_new_tokens=12, **cache_argument(cache))
    assert torch.equal(out, _plain(model, prompt, max_new_tokens=12))
    assert cache.get_seq_length() == out.shape[1] - 1  # every token but the last, as after plain decoding
    with pytest.raises(ValueError, match="already holds"):
        model.generate(prompt, speculative="assisted", max_new_tokens=4, **cache_argument(cache))


# ------------------------------------------------------------------------------------------------------
# 10. use_cache=False, cache implementations, prompts with masked positions


@pytest.mark.parametrize("path", PATHS)
def test_use_cache_false_gives_the_same_tokens(tiny_model_factory, path) -> None:
    model = _hydra(tiny_model_factory)
    for prompt in _prompts(SMALL_VOCAB):
        _same(model, prompt, path, max_new_tokens=12, use_cache=False)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("implementation", ["static", "offloaded", "quantized"])
def test_other_cache_implementations_are_refused_by_name(tiny_model_factory, implementation, path) -> None:
    model = _hydra(tiny_model_factory)
    with pytest.raises(ValueError, match=f"cache_implementation='{implementation}'"):
        model.generate(_prompts(SMALL_VOCAB)[1], **PATHS[path], max_new_tokens=4, cache_implementation=implementation)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_the_tree_loop_masks_prompt_positions_as_plain_generate_does(tiny_model_factory, arch) -> None:
    """A prompt token equal to pad_token_id (not EOS) is masked by generate, and so is left padding."""
    model = _hydra(tiny_model_factory, arch, "hydra++")
    model.generation_config.pad_token_id = 3
    for prompt in _prompts(SMALL_VOCAB, lengths=(5, 9)):
        inside = prompt.clone()
        inside[0, 2] = 3
        left_padded = torch.cat([torch.full((1, 3), 3), prompt], dim=1)
        for masked in (inside, left_padded):
            _same(model, masked, "tree", max_new_tokens=16)
            with pytest.raises(ValueError, match="masked prompt positions.*speculative=True"):
                model.generate(masked, speculative="assisted", max_new_tokens=4)
    explicit = torch.tensor([[0, 0, 1, 1, 1]])
    _same(model, prompt[:, :5], "tree", max_new_tokens=16, attention_mask=explicit)


# ------------------------------------------------------------------------------------------------------
# Every logits processor and stopping criterion transformers ships for decoder-only models


GREEDY_PROCESSORS: dict[str, dict] = {
    "repetition_penalty": {"repetition_penalty": 1.8},
    "no_repeat_ngram_size": {"no_repeat_ngram_size": 2},
    "bad_words_ids": {"bad_words_ids": [[0], [5, 6]]},
    "sequence_bias": {"sequence_bias": {(0,): -5.0, (4, 4): 3.0}},
    "min_length": {"min_length": 12, "eos_token_id": 0},
    "min_new_tokens": {"min_new_tokens": 6, "eos_token_id": 0},
    "forced_bos_token_id": {"forced_bos_token_id": 7},
    "forced_eos_token_id": {"forced_eos_token_id": 9, "max_new_tokens": 10},
    "remove_invalid_values": {"remove_invalid_values": True},
    "exponential_decay_length_penalty": {"exponential_decay_length_penalty": (4, 1.5), "eos_token_id": 0},
    "renormalize_logits": {"renormalize_logits": True},
    "suppress_tokens": {"suppress_tokens": [0, 1]},
    "begin_suppress_tokens": {"begin_suppress_tokens": [0, 2]},
    # sampling warpers, at settings that leave one token: equal to plain sampling draw for draw
    "temperature_top_k": {"do_sample": True, "temperature": 0.7, "top_k": 1},
    "top_p": {"do_sample": True, "top_p": 1e-6},
    "min_p": {"do_sample": True, "min_p": 0.999},
    "typical_p": {"do_sample": True, "typical_p": 1e-6},
    "epsilon_cutoff": {"do_sample": True, "epsilon_cutoff": 0.0009, "top_k": 1},
    "eta_cutoff": {"do_sample": True, "eta_cutoff": 0.0009, "top_k": 1},
    # stopping criteria
    "max_length": {"max_length": 13},
    "max_time": {"max_time": 60.0},
    "eos_token_id": {"eos_token_id": [0, 4]},
    "stop_strings": {"stop_strings": ["ca", "jj"]},
    "stopping_criteria": {"stopping_criteria": StoppingCriteriaList([StopAtLength(11)])},
}
# Options whose processor the tree loop cannot apply per node (it refuses them); the assisted loop applies
# processors to its chain one prefix at a time, as plain decoding does.
TREE_REFUSES: dict[str, tuple[str, dict]] = {
    "guidance_scale": ("UnbatchedClassifierFreeGuidanceLogitsProcessor", {"guidance_scale": 1.5}),
    "watermarking_config": ("WatermarkLogitsProcessor", {"watermarking_config": {"bias": 2.0, "greenlist_ratio": 0.5}}),
    "prefix_allowed_tokens_fn": (
        "PrefixConstrainedLogitsProcessor", {"prefix_allowed_tokens_fn": lambda batch, ids: list(range(8))}
    ),
}  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", GREEDY_PROCESSORS)
def test_every_processor_and_stopping_criterion_gives_plain_generates_tokens(tiny_model_factory, option, path) -> None:
    model = _on(tiny_model_factory("llama", seed=0, vocab_size=SMALL_VOCAB))
    kwargs = {"max_new_tokens": 16} | GREEDY_PROCESSORS[option]
    if option == "stop_strings":
        kwargs["tokenizer"] = _char_tokenizer()
    for prompt in _prompts(SMALL_VOCAB, lengths=(1, 3, 6, 10)):
        plain = model.base_lm.generate(prompt, **kwargs)
        assert torch.equal(model.generate(prompt, **PATHS[path], **kwargs), plain), option


@pytest.mark.parametrize("option", TREE_REFUSES)
def test_processors_the_tree_loop_cannot_apply_per_node_are_refused(tiny_model_factory, option) -> None:
    match, kwargs = TREE_REFUSES[option]
    model = _on(tiny_model_factory("llama", seed=0, vocab_size=SMALL_VOCAB))
    with pytest.raises(ValueError, match=match):
        model.generate(_prompts(SMALL_VOCAB)[1], speculative=True, max_new_tokens=4, **kwargs)


def test_the_assisted_loop_applies_processors_per_prefix(tiny_model_factory) -> None:
    _, kwargs = TREE_REFUSES["prefix_allowed_tokens_fn"]
    model = _on(tiny_model_factory("llama", seed=0, vocab_size=SMALL_VOCAB))
    for prompt in _prompts(SMALL_VOCAB):
        _same(model, prompt, "assisted", max_new_tokens=12, **kwargs)


@pytest.mark.parametrize("option", ["guidance_scale", "watermarking_config"])
def test_the_assisted_loop_refuses_processors_built_from_the_model(tiny_model_factory, option) -> None:
    _, kwargs = TREE_REFUSES[option]
    model = _on(tiny_model_factory("llama", seed=0, vocab_size=SMALL_VOCAB))
    with pytest.raises(ValueError, match="speculative='assisted' does not support"):
        model.generate(_prompts(SMALL_VOCAB)[1], speculative="assisted", max_new_tokens=4, **kwargs)


# ------------------------------------------------------------------------------------------------------
# One list of limitations: the errors and the README


def test_the_readme_lists_exactly_the_limitations() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert support.limitations_markdown() in readme


def test_every_limitation_message_names_what_to_do() -> None:
    for key, limitation in support.LIMITATIONS.items():
        for path in limitation.paths:
            message = str(support.refuse(key, path, "detail"))
            assert message.startswith(f"{path} does not support") and "(detail)" in message
            assert message.endswith(".") and limitation.remedy in message

