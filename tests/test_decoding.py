"""Tests for `HydraForCausalLM.generate(speculative=...)` and the tree loop of hf_hydra.decoding.

The reference is always the base model's own greedy `generate`: speculative decoding must return the
same tokens, stop at the same place (EOS, max_new_tokens / max_length, stopping criteria, stop strings,
also in the middle of an accepted path) and feed a streamer the same tokens.

Fresh heads are random, so on a 128-token vocabulary they rarely guess right (tau near 1). To run the
multi-token paths for sure, most tests use a 16-token vocabulary and the "full" tree below: its depth 1
holds every token and its depth 2 every pair, so every step accepts at least two drafts (+ the bonus).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerFast, StoppingCriteria, StoppingCriteriaList
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from hf_hydra import HydraForCausalLM, HydraGenerateOutput, SpeculationStats, step_drafts
from hf_hydra.cache_name import CACHE_NAME, cache_argument
from hf_hydra.growing_cache import GrowingLayer

ARCHS = ("llama", "qwen2", "mistral", "gemma")
HEAD_ARCHS = ("medusa", "hydra", "hydra++")
NUM_HEADS = 4
SMALL_VOCAB = 16
# Hand-made tree, given unsorted: branching at the root, at depth 1 and 2, one path down to depth 4.
HAND_TREE = [[1, 0], [0], [0, 0, 0], [2], [0, 0], [0, 1], [1], [0, 0, 0, 0], [0, 0, 1], [3]]
TREES: dict[str, object] = {
    "chain": "chain",
    "cpu_small_11": "cpu_small_11",
    "mc_sim_7b_63": "mc_sim_7b_63",
    "hand": HAND_TREE,
}
# Every token at depth 1, every pair at depth 2 (16 + 256 nodes): at least 2 drafts accepted per step.
FULL_TREE = [[r] for r in range(SMALL_VOCAB)] + [[r, s] for r in range(SMALL_VOCAB) for s in range(SMALL_VOCAB)]
NEW_TOKENS = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts(vocab: int, lengths: tuple[int, ...] = (1, 5, 11), seed: int = 1234) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, n), generator=generator) for n in lengths]


def _base(factory: Callable[..., PreTrainedModel], arch: str, vocab: int = SMALL_VOCAB, seed: int = 0, **overrides):
    """A tiny random base. Gemma ties its embeddings and scales them by sqrt(d): a tiny random tied Gemma
    repeats one token forever, which would make every stopping test trivial, so it is untied here."""
    if arch == "gemma":
        overrides.setdefault("tie_word_embeddings", False)
    return factory(arch, seed=seed, vocab_size=vocab, **overrides)


def _hydra(
    factory: Callable[..., PreTrainedModel],
    arch: str = "llama",
    head_arch: str = "hydra",
    vocab: int = SMALL_VOCAB,
    seed: int = 0,
    **config_kwargs,
) -> HydraForCausalLM:
    """Fresh (random, seeded) heads on a tiny random base model, in eval mode."""
    base = _base(factory, arch, vocab, seed)
    torch.manual_seed(seed + 100)  # the heads' biases are randomly initialised
    return HydraForCausalLM.from_base(base, head_arch=head_arch, num_heads=NUM_HEADS, **config_kwargs).eval()


def _plain(model: HydraForCausalLM, prompt: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.base_lm.generate(prompt, do_sample=False, **kwargs)


def _speculative(model: HydraForCausalLM, prompt: torch.Tensor, **kwargs) -> HydraGenerateOutput:
    out = model.generate(prompt, speculative=True, return_dict_in_generate=True, **kwargs)
    assert isinstance(out, HydraGenerateOutput)
    _check_stats(out, prompt)
    return out


def _check_stats(out: HydraGenerateOutput, prompt: torch.Tensor) -> None:
    stats = out.speculation
    assert isinstance(stats, SpeculationStats)
    assert stats.new_tokens == out.sequences.shape[1] - prompt.shape[1]
    assert stats.steps == len(stats.accepted_lengths)
    assert sum(stats.accepted_lengths) + 1 == stats.new_tokens  # the prefill makes the first token
    assert all(n >= 1 for n in stats.accepted_lengths)
    # every step appends its accepted drafts and a bonus token, except a last step cut inside its drafts
    drafts = sum(stats.accepted_lengths) - stats.steps
    assert drafts <= stats.accepted_drafts <= drafts + 1 and 0 <= stats.context_tokens <= stats.accepted_drafts
    if stats.steps:
        assert stats.tau >= 1.0
        assert stats.tau == pytest.approx(sum(stats.accepted_lengths) / stats.steps)


def _step_blocks(stats: SpeculationStats) -> list[range]:
    """Positions (in the generated part) of the tokens appended by the prefill and by each step."""
    blocks, start = [range(0, 1)], 1
    for n in stats.accepted_lengths:
        blocks.append(range(start, start + n))
        start += n
    return blocks


def _mid_path_token(out: HydraGenerateOutput, prompt_length: int) -> tuple[int, int] | None:
    """(token, position in the generated part) of a token that is NOT the last of its step's block and
    appears there for the first time in the generated text: stopping at it cuts an accepted path."""
    generated = out.sequences[0, prompt_length:].tolist()
    for block in _step_blocks(out.speculation):
        for position in list(block)[:-1]:
            if generated[position] not in generated[:position]:
                return generated[position], position
    return None


def _mid_path_stop(model: HydraForCausalLM) -> tuple[torch.Tensor, HydraGenerateOutput, int, int]:
    """A prompt whose full-tree run has a mid-path first occurrence: (prompt, that run, token, position).
    Tiny random models often repeat one token forever, so try a few prompts."""
    for prompt in _prompts(SMALL_VOCAB, lengths=(5, 7, 3, 9, 12, 2, 6, 4)):
        probe = _speculative(model, prompt, tree=FULL_TREE, max_new_tokens=NEW_TOKENS)
        found = _mid_path_token(probe, prompt.shape[1])
        if found is not None:
            return prompt, probe, *found
    raise AssertionError("no prompt stops in the middle of an accepted path; choose other seeds")


# ------------------------------------------------------------------------------------------------------
# Lossless: same tokens as greedy generate


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
@pytest.mark.parametrize("arch", ARCHS)
def test_speculative_equals_greedy(tiny_model_factory, arch: str, head_arch: str, tree: str) -> None:
    model = _hydra(tiny_model_factory, arch, head_arch)
    for prompt in _prompts(SMALL_VOCAB):
        plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS)
        out = _speculative(model, prompt, tree=TREES[tree], max_new_tokens=NEW_TOKENS)
        assert torch.equal(out.sequences, plain), f"prompt {prompt.tolist()}"
        assert out.speculation.new_tokens == NEW_TOKENS


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
@pytest.mark.parametrize("arch", ARCHS)
def test_speculative_equals_greedy_on_128_token_vocab(tiny_model_factory, arch: str, head_arch: str) -> None:
    model = _hydra(tiny_model_factory, arch, head_arch, vocab=128, seed=3)
    for prompt in _prompts(128, lengths=(4, 9)):
        for tree in ("mc_sim_7b_63", HAND_TREE):
            plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS)
            out = _speculative(model, prompt, tree=tree, max_new_tokens=NEW_TOKENS)
            assert torch.equal(out.sequences, plain)


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
@pytest.mark.parametrize("arch", ARCHS)
def test_full_tree_accepts_several_drafts_every_step_and_stays_exact(
    tiny_model_factory, arch: str, head_arch: str
) -> None:
    model = _hydra(tiny_model_factory, arch, head_arch)
    for prompt in _prompts(SMALL_VOCAB, lengths=(3, 8)):
        plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS)
        out = _speculative(model, prompt, tree=FULL_TREE, max_new_tokens=NEW_TOKENS)
        assert torch.equal(out.sequences, plain)
        lengths = out.speculation.accepted_lengths
        assert all(n >= 3 for n in lengths[:-1]), lengths  # the last step may be cut by max_new_tokens
        assert out.speculation.steps <= (NEW_TOKENS - 1 + 2) // 3


def test_random_heads_on_a_small_vocab_get_multi_token_acceptance(tiny_model_factory) -> None:
    """Not only the full tree: the ordinary trees with random heads also accept >= 2 drafts at times,
    so the lossless tests above do run multi-token paths through the usual trees."""
    best: dict[tuple[str, str], int] = {}
    for arch in ARCHS:
        for head_arch in HEAD_ARCHS:
            model = _hydra(tiny_model_factory, arch, head_arch)
            for prompt in _prompts(SMALL_VOCAB):
                out = _speculative(model, prompt, tree="mc_sim_7b_63", max_new_tokens=NEW_TOKENS)
                best[arch, head_arch] = max(best.get((arch, head_arch), 0), *out.speculation.accepted_lengths)
    assert max(best.values()) >= 3, best
    assert sum(n >= 3 for n in best.values()) >= len(best) // 2, best


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_speculative_equals_greedy_with_eager_and_sdpa_attention(tiny_model_factory, attn_implementation) -> None:
    base = tiny_model_factory("llama", seed=5, vocab_size=SMALL_VOCAB, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = HydraForCausalLM.from_base(base, head_arch="hydra++", num_heads=NUM_HEADS).eval()
    for prompt in _prompts(SMALL_VOCAB):
        for tree in ("mc_sim_7b_63", FULL_TREE):
            out = _speculative(model, prompt, tree=tree, max_new_tokens=NEW_TOKENS)
            assert torch.equal(out.sequences, _plain(model, prompt, max_new_tokens=NEW_TOKENS))


def test_heads_read_the_same_context_as_a_from_scratch_forward(tiny_model_factory, monkeypatch) -> None:
    """Each step drafts from the context of the verified tokens and the root = the base's next token.
    Recompute both from scratch (one base forward over the verified text, the prefix layer over all of
    it without a cache): the loop's incremental versions (accepted hidden states taken from the tree
    forward, the Hydra++ prefix-layer cache advanced by the accepted path) must match."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = step_drafts.draft_tree

    def recording_draft_tree(heads, tree, context, root_token, embed_tokens):
        calls.append((context.clone(), root_token.clone()))
        return original(heads, tree, context, root_token, embed_tokens)

    monkeypatch.setattr(step_drafts, "draft_tree", recording_draft_tree)
    for head_arch in HEAD_ARCHS:
        model = _hydra(tiny_model_factory, "qwen2", head_arch)
        prompt = _prompts(SMALL_VOCAB, lengths=(6,))[0]
        calls.clear()
        out = _speculative(model, prompt, tree=FULL_TREE, max_new_tokens=NEW_TOKENS)
        sequence = out.sequences[0]
        assert len(calls) == out.speculation.steps
        verified = prompt.shape[1]  # tokens whose hidden states the heads have seen
        for (context, root), block in zip(calls, _step_blocks(out.speculation), strict=False):
            verified += len(block)  # the previous step's tokens; its last one is the root, not yet verified
            assert int(root) == int(sequence[verified - 1])
            with torch.no_grad():
                hidden = model.base_lm(sequence[None, : verified - 1], output_hidden_states=True).hidden_states[-1]
                positions = torch.arange(verified - 1)[None]
                expected = model.heads.encode_context(hidden, positions, None)[0, -1]
            torch.testing.assert_close(context, expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------
# Stopping: EOS, length limits, stopping criteria, stop strings, also inside an accepted path


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
@pytest.mark.parametrize("arch", ARCHS)
def test_eos_in_the_middle_of_an_accepted_path(tiny_model_factory, arch: str, head_arch: str) -> None:
    model = _hydra(tiny_model_factory, arch, head_arch)
    prompt, _, eos, position = _mid_path_stop(model)
    # On both configs, so this holds whichever one generate reads.
    model.base_lm.generation_config.eos_token_id = eos
    model.generation_config.eos_token_id = eos

    plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS)
    assert plain.shape[1] == prompt.shape[1] + position + 1 and int(plain[0, -1]) == eos
    out = _speculative(model, prompt, tree=FULL_TREE, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, plain)
    assert torch.equal(model.generate(prompt, speculative=True, tree="mc_sim_7b_63", max_new_tokens=NEW_TOKENS), plain)


def test_eos_passed_to_generate(tiny_model_factory) -> None:
    for seed in (0, 1, 2):
        model = _hydra(tiny_model_factory, "mistral", "hydra", seed=seed)
        prompt, probe, eos, _ = _mid_path_stop(model)
        plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
        assert plain.shape[1] < prompt.shape[1] + NEW_TOKENS
        fast = _speculative(model, prompt, tree=FULL_TREE, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
        assert torch.equal(fast.sequences, plain)
        # A list of EOS ids: the first that comes stops.
        others = [t for t in range(SMALL_VOCAB) if t != eos]
        both = _speculative(model, prompt, tree=FULL_TREE, max_new_tokens=NEW_TOKENS, eos_token_id=[*others[:2], eos])
        assert torch.equal(
            both.sequences, _plain(model, prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[*others[:2], eos])
        )


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_every_max_new_tokens_from_1_to_20(tiny_model_factory, head_arch: str) -> None:
    model = _hydra(tiny_model_factory, "llama", head_arch)
    prompt = _prompts(SMALL_VOCAB, lengths=(4,))[0]
    full = _plain(model, prompt, max_new_tokens=20)
    cut_inside_a_path = 0
    for n in range(1, 21):
        out = _speculative(model, prompt, tree=FULL_TREE, max_new_tokens=n)
        assert torch.equal(out.sequences, full[:, : prompt.shape[1] + n]), n
        assert out.speculation.new_tokens == n
        if out.speculation.steps and out.speculation.accepted_lengths[-1] < 3:
            cut_inside_a_path += 1  # full-tree steps append >= 3 tokens unless the limit cut them
    assert cut_inside_a_path >= 5
    one = _speculative(model, prompt, tree=FULL_TREE, max_new_tokens=1)
    assert one.speculation.steps == 0 and one.speculation.accepted_lengths == ()


def test_max_length(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory, "gemma", "hydra")
    prompt = _prompts(SMALL_VOCAB, lengths=(6,))[0]
    for max_length in (7, 8, 10, 13, 17, 30):
        plain = _plain(model, prompt, max_length=max_length)
        assert plain.shape[1] == max_length
        for tree in (FULL_TREE, "cpu_small_11"):
            assert torch.equal(_speculative(model, prompt, tree=tree, max_length=max_length).sequences, plain)


class StopOnToken(StoppingCriteria):
    """Stops once the last token is `token`; records the lengths it was asked about."""

    def __init__(self, token: int) -> None:
        self.token = token
        self.lengths: list[int] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        self.lengths.append(input_ids.shape[1])
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_custom_stopping_criteria(tiny_model_factory, head_arch: str) -> None:
    model = _hydra(tiny_model_factory, "qwen2", head_arch)
    prompt, _, token, position = _mid_path_stop(model)

    plain_criterion = StopOnToken(token)
    plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS, stopping_criteria=StoppingCriteriaList([plain_criterion]))
    assert plain.shape[1] == prompt.shape[1] + position + 1
    criterion = StopOnToken(token)
    out = _speculative(
        model, prompt, tree=FULL_TREE, max_new_tokens=NEW_TOKENS, stopping_criteria=StoppingCriteriaList([criterion])
    )
    assert torch.equal(out.sequences, plain)
    # Asked once per appended token, in order, like plain decoding.
    assert criterion.lengths == plain_criterion.lengths == list(range(prompt.shape[1] + 1, plain.shape[1] + 1))


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """An offline tokenizer of the 16-token vocabulary: token i is the letter chr(ord('a') + i)."""
    vocab = {chr(ord("a") + i): i for i in range(SMALL_VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def _stop_string_cases(model: HydraForCausalLM, tokenizer) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """(prompt, stop string, plain greedy output with it): two-letter stop strings taken at several
    places of each prompt's greedy continuation."""
    cases = []
    for prompt in _prompts(SMALL_VOCAB):
        generated = _plain(model, prompt, max_new_tokens=NEW_TOKENS)[0, prompt.shape[1] :]
        for start in (2, 5, 9):
            stop = tokenizer.decode(generated[start : start + 2])
            plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS, stop_strings=[stop], tokenizer=tokenizer)
            assert tokenizer.decode(plain[0, prompt.shape[1] :]).endswith(stop)
            cases.append((prompt, stop, plain))
    assert any(plain.shape[1] < prompt.shape[1] + NEW_TOKENS for prompt, _, plain in cases)
    return cases


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_stop_strings_with_an_offline_tokenizer(tiny_model_factory, head_arch: str) -> None:
    tokenizer = _char_tokenizer()
    model = _hydra(tiny_model_factory, "llama", head_arch, seed=1)
    for prompt, stop, plain in _stop_string_cases(model, tokenizer):
        kwargs = {"max_new_tokens": NEW_TOKENS, "stop_strings": [stop], "tokenizer": tokenizer}
        assert torch.equal(_speculative(model, prompt, tree=FULL_TREE, **kwargs).sequences, plain)
        assert torch.equal(model.generate(prompt, speculative=True, tree="cpu_small_11", **kwargs), plain)


def test_stop_strings_on_the_generation_config(tiny_model_factory) -> None:
    """Stop strings set on the generation config (as a Hub generation_config.json may) work like passed ones."""
    tokenizer = _char_tokenizer()
    model = _hydra(tiny_model_factory, "llama", "hydra", seed=1)
    for prompt, stop, plain in _stop_string_cases(model, tokenizer)[:3]:
        # On both configs, so this holds whichever one generate reads.
        model.base_lm.generation_config.stop_strings = [stop]
        model.generation_config.stop_strings = [stop]
        try:
            assert torch.equal(model.generate(prompt, max_new_tokens=NEW_TOKENS, tokenizer=tokenizer), plain)
            fast = model.generate(prompt, speculative=True, max_new_tokens=NEW_TOKENS, tokenizer=tokenizer)
        finally:
            model.base_lm.generation_config.stop_strings = None
            model.generation_config.stop_strings = None
        assert torch.equal(fast, plain)


def test_stop_strings_without_tokenizer_is_a_value_error(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(torch.tensor([[1, 2, 3]]), speculative=True, stop_strings=["ab"], max_new_tokens=4)


# ------------------------------------------------------------------------------------------------------
# Streamer


class RecordingStreamer(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ends = 0

    def put(self, value: torch.Tensor) -> None:
        assert self.ends == 0, "put() after end()"
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ends += 1


def _check_streamed(streamer: RecordingStreamer, prompt: torch.Tensor, sequence: torch.Tensor) -> None:
    assert streamer.ends == 1
    assert torch.equal(streamer.puts[0].reshape(prompt.shape), prompt)
    streamed = torch.cat([p.reshape(-1) for p in streamer.puts[1:]])
    assert torch.equal(streamed, sequence[0, prompt.shape[1] :])


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_streamer_gets_the_prompt_then_exactly_the_generated_tokens(tiny_model_factory, head_arch: str) -> None:
    model = _hydra(tiny_model_factory, "llama", head_arch)
    prompt = _prompts(SMALL_VOCAB, lengths=(5,))[0]
    plain_streamer = RecordingStreamer()
    plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS, streamer=plain_streamer)
    _check_streamed(plain_streamer, prompt, plain)

    streamer = RecordingStreamer()
    out = _speculative(model, prompt, tree=FULL_TREE, max_new_tokens=NEW_TOKENS, streamer=streamer)
    assert torch.equal(out.sequences, plain)
    _check_streamed(streamer, prompt, out.sequences)
    assert len(streamer.puts) == 1 + 1 + out.speculation.steps  # prompt, prefill token, one put per step
    assert max(p.numel() for p in streamer.puts[1:]) >= 3  # accepted paths arrive in one put

    # Stopped in the middle of a path: the streamer gets nothing past the EOS.
    prompt, out, eos, _ = _mid_path_stop(model)
    streamer = RecordingStreamer()
    stopped = model.generate(
        prompt, speculative=True, tree=FULL_TREE, max_new_tokens=NEW_TOKENS, eos_token_id=eos, streamer=streamer
    )
    assert int(stopped[0, -1]) == eos and stopped.shape[1] < out.sequences.shape[1]
    _check_streamed(streamer, prompt, stopped)


def test_streamer_with_text_streamer_prints_the_same_text(tiny_model_factory, capsys) -> None:
    from transformers import TextStreamer

    tokenizer = _char_tokenizer()
    model = _hydra(tiny_model_factory, "qwen2", "hydra")
    prompt = _prompts(SMALL_VOCAB, lengths=(5,))[0]
    plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS, streamer=TextStreamer(tokenizer, skip_prompt=True))
    plain_text = capsys.readouterr().out
    model.generate(
        prompt,
        speculative=True,
        tree=FULL_TREE,
        max_new_tokens=NEW_TOKENS,
        streamer=TextStreamer(tokenizer, skip_prompt=True),
    )
    assert capsys.readouterr().out == plain_text == tokenizer.decode(plain[0, prompt.shape[1] :]) + "\n"


# ------------------------------------------------------------------------------------------------------
# Statistics


def test_stats_count_base_forwards(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory, "mistral", "hydra++")
    calls: list[int] = []
    handle = model.base_lm.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        for prompt in _prompts(SMALL_VOCAB):
            for tree in (FULL_TREE, "cpu_small_11", "chain"):
                calls.clear()
                out = _speculative(model, prompt, tree=tree, max_new_tokens=NEW_TOKENS)
                assert len(calls) == out.speculation.steps + 1  # the prefill, then one forward per step
                assert out.speculation.new_tokens == NEW_TOKENS
    finally:
        handle.remove()


def test_stats_with_random_heads_on_128_tokens(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory, "llama", "hydra", vocab=128)
    prompt = _prompts(128, lengths=(5,))[0]
    out = _speculative(model, prompt, max_new_tokens=NEW_TOKENS)
    assert 1.0 <= out.speculation.tau <= NUM_HEADS + 1
    assert out.speculation.steps >= (NEW_TOKENS - 1) // (NUM_HEADS + 1)


def test_without_return_dict_a_plain_tensor(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory)
    prompt = _prompts(SMALL_VOCAB, lengths=(5,))[0]
    out = model.generate(prompt, speculative=True, max_new_tokens=8)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 13)


# ------------------------------------------------------------------------------------------------------
# Logits processors with greedy decoding: each tree node scored with its own prefix, as plain greedy does

PROCESSOR_OPTIONS: dict[str, dict] = {
    "repetition_penalty": {"repetition_penalty": 1.3},
    "no_repeat_ngram_size": {"no_repeat_ngram_size": 2},
    "min_new_tokens": {"min_new_tokens": 10, "eos_token_id": 0},
    "bad_words_and_suppress": {"bad_words_ids": [[2], [5, 6]], "suppress_tokens": [7]},
}


@pytest.mark.parametrize("options", PROCESSOR_OPTIONS)
@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
def test_greedy_with_logits_processors_equals_plain_greedy(tiny_model_factory, head_arch: str, options: str) -> None:
    model = _hydra(tiny_model_factory, "llama", head_arch)
    kwargs = PROCESSOR_OPTIONS[options] | {"max_new_tokens": NEW_TOKENS}
    changed = 0
    for prompt in _prompts(SMALL_VOCAB):
        plain = _plain(model, prompt, **kwargs)
        changed += not torch.equal(plain, _plain(model, prompt, max_new_tokens=NEW_TOKENS))
        for tree in ("cpu_small_11", "mc_sim_7b_63", FULL_TREE):
            out = _speculative(model, prompt, tree=tree, **kwargs)
            assert torch.equal(out.sequences, plain), (tree, prompt.tolist())
        assert torch.equal(model.generate(prompt, speculative="assisted", **kwargs), plain)
    if options != "min_new_tokens":  # EOS 0 may never come up greedily: then min_new_tokens changes nothing
        assert changed >= 1  # the option does change the output, so the comparison means something


def test_greedy_with_min_new_tokens_and_an_eos_that_comes_early(tiny_model_factory) -> None:
    """EOS is suppressed for the first min_new_tokens tokens, also inside an accepted path."""
    model = _hydra(tiny_model_factory, "llama", "hydra")
    prompt, _, eos, position = _mid_path_stop(model)
    kwargs = {"max_new_tokens": NEW_TOKENS, "eos_token_id": eos, "min_new_tokens": position + 3}
    plain = _plain(model, prompt, **kwargs)
    assert plain.shape[1] > prompt.shape[1] + position + 1  # the early EOS was suppressed
    assert torch.equal(_speculative(model, prompt, tree=FULL_TREE, **kwargs).sequences, plain)


# ------------------------------------------------------------------------------------------------------
# Other ways in, and what is refused


def test_speculative_false_is_the_base_models_generate(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory, "llama", "hydra")
    prompt = _prompts(SMALL_VOCAB, lengths=(5,))[0]
    for kwargs in (
        {"max_new_tokens": 12},
        {"max_new_tokens": 6, "num_beams": 2},
        {"max_new_tokens": 6, "repetition_penalty": 1.3},
    ):
        assert torch.equal(model.generate(prompt, **kwargs), model.base_lm.generate(prompt, do_sample=False, **kwargs))
        assert torch.equal(model.generate(prompt, speculative=False, **kwargs), model.generate(prompt, **kwargs))
    torch.manual_seed(7)
    sampled = model.generate(prompt, do_sample=True, max_new_tokens=12)
    torch.manual_seed(7)
    assert torch.equal(sampled, model.base_lm.generate(prompt, do_sample=True, max_new_tokens=12))


def test_speculative_tree_and_keyword_forms(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory, "llama", "hydra")
    prompt = _prompts(SMALL_VOCAB, lengths=(5,))[0]
    plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS)
    assert torch.equal(model.generate(prompt, speculative="tree", max_new_tokens=NEW_TOKENS), plain)
    assert torch.equal(model.generate(input_ids=prompt, speculative=True, max_new_tokens=NEW_TOKENS), plain)
    mask = torch.ones_like(prompt)
    assert torch.equal(model.generate(prompt, attention_mask=mask, speculative=True, max_new_tokens=NEW_TOKENS), plain)
    assert torch.equal(model.generate(prompt, speculative=True, tree="chain-2", max_new_tokens=NEW_TOKENS), plain)
    # The default tree is the config's: the same as naming it.
    default = _speculative(model, prompt, max_new_tokens=NEW_TOKENS)
    named = _speculative(model, prompt, tree=model.config.tree, max_new_tokens=NEW_TOKENS)
    assert default.speculation == named.speculation


@pytest.mark.parametrize("head_arch", HEAD_ARCHS)
@pytest.mark.parametrize("arch", ARCHS)
def test_assisted_mode_equals_greedy(tiny_model_factory, arch: str, head_arch: str) -> None:
    model = _hydra(tiny_model_factory, arch, head_arch)
    prompt = _prompts(SMALL_VOCAB, lengths=(6,))[0]
    plain = _plain(model, prompt, max_new_tokens=16)
    assert torch.equal(model.generate(prompt, speculative="assisted", max_new_tokens=16), plain)


def test_assisted_mode_streamer_and_eos(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory, "llama", "hydra")
    prompt, _, eos, _ = _mid_path_stop(model)
    plain = _plain(model, prompt, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    streamer = RecordingStreamer()
    out = model.generate(prompt, speculative="assisted", max_new_tokens=NEW_TOKENS, eos_token_id=eos, streamer=streamer)
    assert torch.equal(out, plain)
    _check_streamed(streamer, prompt, out)


@pytest.mark.parametrize("speculative", [True, "assisted"])
def test_every_mode_reads_the_models_generation_config(tiny_model_factory, speculative) -> None:
    """`model.generation_config` holds the defaults of `model.generate` (transformers' convention, and
    what `from_pretrained` loads from the heads' generation_config.json): every mode must honour it."""
    model = _hydra(tiny_model_factory, "llama", "hydra")
    prompt, _, eos, position = _mid_path_stop(model)
    model.generation_config.eos_token_id = eos
    plain = model.generate(prompt, max_new_tokens=NEW_TOKENS)
    fast = model.generate(prompt, speculative=speculative, max_new_tokens=NEW_TOKENS)
    assert torch.equal(fast, plain)
    assert plain.shape[1] == prompt.shape[1] + position + 1


def test_every_mode_agrees_when_the_base_config_sets_eos_before_wrapping(tiny_model_factory) -> None:
    base = tiny_model_factory("llama", seed=0, vocab_size=SMALL_VOCAB)
    prompt = _prompts(SMALL_VOCAB, lengths=(5,))[0]
    reference = base.generate(prompt, do_sample=False, max_new_tokens=NEW_TOKENS)
    eos = int(reference[0, prompt.shape[1] + 6])
    base.generation_config.eos_token_id = eos
    plain = base.generate(prompt, do_sample=False, max_new_tokens=NEW_TOKENS)
    assert int(plain[0, -1]) == eos
    model = HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=NUM_HEADS).eval()
    for speculative in (False, True, "assisted"):
        assert torch.equal(model.generate(prompt, speculative=speculative, max_new_tokens=NEW_TOKENS), plain)


def _refused(model: HydraForCausalLM, match: str, prompt: torch.Tensor | None = None, **kwargs) -> None:
    prompt = _prompts(SMALL_VOCAB, lengths=(5,))[0] if prompt is None else prompt
    kwargs.setdefault("speculative", True)
    with pytest.raises(ValueError, match=match):
        model.generate(prompt, max_new_tokens=5, **kwargs)


class _KeepScores(LogitsProcessor):
    """A user's own processor: not known to be row-wise, so the tree loop refuses it."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return scores


BATCH_OF_TWO = torch.tensor([[1, 2, 3], [4, 5, 6]])
REFUSED: dict[str, tuple[str, dict]] = {
    "beams": ("beam search", {"num_beams": 2}),
    "return_sequences": ("num_return_sequences", {"num_return_sequences": 2}),
    "custom_logits_processor": ("row-wise.*_KeepScores", {"logits_processor": LogitsProcessorList([_KeepScores()])}),
    "classifier_free_guidance": ("UnbatchedClassifierFreeGuidanceLogitsProcessor", {"guidance_scale": 1.5}),
    "sampled_beams": ("beam search", {"num_beams": 2, "do_sample": True}),
    "tree_too_deep_by_name": ("only 4 draft heads", {"tree": "chain-5"}),
    "tree_too_deep_by_paths": ("depth 5", {"tree": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]]}),
    "unknown_tree": ("Unknown tree", {"tree": "no_such_tree"}),
    "tree_without_parent": ("no parent", {"tree": [[0], [1, 0]]}),
    "output_scores": ("output_scores", {"output_scores": True, "return_dict_in_generate": True}),
    "bad_mode": ("speculative must be", {"speculative": "fast"}),
    "assisted_batch": ("batch", {"prompt": BATCH_OF_TWO, "speculative": "assisted"}),
    "assisted_typical": ("lossless", {"do_sample": True, "speculative": "assisted", "acceptance": "typical"}),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_requests_are_clear_value_errors(tiny_model_factory, case: str) -> None:
    match, kwargs = REFUSED[case]
    model = _hydra(tiny_model_factory, "llama", "hydra")
    _refused(model, match, **kwargs)
    # Nothing was left behind on the model: a normal call still works and is exact.
    prompt = _prompts(SMALL_VOCAB, lengths=(5,))[0]
    plain = _plain(model, prompt, max_new_tokens=8)
    assert torch.equal(model.generate(prompt, speculative=True, max_new_tokens=8), plain)


@pytest.mark.parametrize("speculative", [True, "assisted"])
def test_the_loops_decode_on_a_cache_that_grows_in_place(tiny_model_factory, speculative) -> None:
    """The caller's empty cache (or generate's) gets growing layers, and the output is plain greedy's."""
    model = _hydra(tiny_model_factory, "llama", "hydra++")
    prompt = _prompts(SMALL_VOCAB, lengths=(6,))[0]
    cache = DynamicCache(config=model.base_lm.config)
    out = model.generate(prompt, speculative=speculative, max_new_tokens=16, **cache_argument(cache))
    assert torch.equal(out, _plain(model, prompt, max_new_tokens=16))
    assert [type(layer) for layer in cache.layers] == [GrowingLayer] * model.base_lm.config.num_hidden_layers
    assert cache.get_seq_length() == out.shape[1] - 1  # every token but the last, as after plain decoding


def test_a_filled_cache_is_refused(tiny_model_factory) -> None:
    model = _hydra(tiny_model_factory, "llama", "hydra")
    prompt = _prompts(SMALL_VOCAB, lengths=(5,))[0]
    cache = DynamicCache(config=model.base_lm.config)
    with torch.no_grad():
        model.base_lm(prompt[:, :3], **cache_argument(cache), use_cache=True)
    _refused(model, CACHE_NAME, prompt=prompt, **cache_argument(cache))


def test_refused_also_from_the_generation_config(tiny_model_factory) -> None:
    from transformers import GenerationConfig

    model = _hydra(tiny_model_factory, "llama", "hydra")
    _refused(model, "beam search", generation_config=GenerationConfig(num_beams=2, max_new_tokens=5))


def test_sliding_window_cache_is_refused(tiny_model_factory) -> None:
    base = tiny_model_factory("mistral", seed=0, vocab_size=SMALL_VOCAB, sliding_window=8)
    model = HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=NUM_HEADS).eval()
    _refused(model, "sliding-window")
    prompt = _prompts(SMALL_VOCAB, lengths=(5,))[0]
    assert torch.equal(model.generate(prompt, max_new_tokens=6), _plain(model, prompt, max_new_tokens=6))
