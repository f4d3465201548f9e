"""The tree decoding loop, run by transformers' `generate(custom_generate=...)`.

    prefill : base forward over the prompt -> first token, context vector
    repeat  : draft (heads -> tree) -> verify (one base forward) -> accept (longest greedy path + bonus)
              -> commit (compact the KV cache, advance the heads' context, stream, check stopping)

`generate()` prepares the generation config, special tokens, a fresh `DynamicCache`, `max_length`,
logits processors and stopping criteria; this module does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .acceptance import greedy_accept
from .drafting import draft_tree
from .heads import DraftHeads
from .tree import TreeBuffers
from .verification import check_cache_supported, keep_accepted, verify_tree


@dataclass(frozen=True)
class SpeculationStats:
    """Per-call statistics. tau counts the tokens appended per base verification step, bonus included."""

    steps: int  # base verification forwards after the prefill
    new_tokens: int  # tokens generated, the prefill's first token included
    accepted_lengths: tuple[int, ...]  # tokens appended by each step (accepted drafts + bonus, cut at a stop)

    @property
    def tau(self) -> float:
        """Mean accepted length (>= 1); nan when no verification step ran."""
        return sum(self.accepted_lengths) / self.steps if self.steps else float("nan")


@dataclass
class HydraGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate(..., return_dict_in_generate=True)` output, plus the speculation statistics."""

    speculation: SpeculationStats | None = None


@dataclass(frozen=True)
class Prefill:
    next_token: torch.Tensor  # () long, the base's greedy token after the prompt
    context: torch.Tensor  # (d,) the heads' context vector at the last prompt position


def check_greedy_request(
    input_ids: torch.Tensor,
    generation_config: GenerationConfig,
    logits_processor: LogitsProcessorList,
    model_kwargs: dict,
) -> None:
    """Refuse what the tree loop does not implement yet, naming the limitation."""
    if generation_config.do_sample:
        raise ValueError("speculative=True supports greedy decoding only for now; pass do_sample=False.")
    if (generation_config.num_beams or 1) > 1 or (generation_config.num_return_sequences or 1) > 1:
        raise ValueError("speculative=True does not support beam search or num_return_sequences > 1.")
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative=True supports batch size 1 only (got {input_ids.shape[0]}); loop over prompts.")
    if len(logits_processor) > 0:
        names = ", ".join(type(p).__name__ for p in logits_processor)
        raise ValueError(
            f"speculative=True does not support logits processors yet ({names}); remove the options that "
            "create them (e.g. repetition_penalty, min_new_tokens, bad_words_ids)."
        )
    flags = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
    if any(getattr(generation_config, flag, False) for flag in flags):
        raise ValueError(f"speculative=True does not return {', '.join(flags)}; leave them off.")
    if model_kwargs.get("attention_mask") is not None and not bool(model_kwargs["attention_mask"].all()):
        raise ValueError("speculative=True does not support padded prompts; pass the prompt without padding.")


@torch.no_grad()
def prefill(
    base: PreTrainedModel, heads: DraftHeads, input_ids: torch.Tensor, cache: DynamicCache,
    context_cache: DynamicCache | None,
) -> Prefill:
    """Run the base over the prompt (1, L); the cache then holds L entries."""
    out = base(input_ids=input_ids, past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]  # (1, L, d)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, L)
    context = heads.encode_context(hidden, positions, context_cache)[0, -1]  # (d,)
    return Prefill(next_token=out.logits[0, -1].argmax(), context=context)


def append_until_stop(
    sequence: torch.Tensor, new_tokens: torch.Tensor, stopping_criteria: StoppingCriteriaList
) -> tuple[torch.Tensor, bool]:
    """Append new tokens (n,) to sequence (1, S) one at a time, stopping at the first token after which a
    stopping criterion (EOS, max length, stop strings, ...) fires, exactly as one-token decoding would."""
    for count in range(1, new_tokens.shape[0] + 1):
        candidate = torch.cat([sequence, new_tokens[None, :count]], dim=1)
        if bool(stopping_criteria(candidate, None).any()):
            return candidate, True
    return torch.cat([sequence, new_tokens[None]], dim=1), False


def tree_speculative_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    heads: DraftHeads | None = None,
    tree: TreeBuffers | None = None,
    streamer: BaseStreamer | None = None,
    **model_kwargs,
) -> torch.LongTensor | HydraGenerateOutput:
    """`custom_generate` callable: greedy tree speculative decoding of `model` (the base) with `heads`.

    input_ids: (1, L). Returns (1, L + n) like greedy `generate`, or a `HydraGenerateOutput` with
    `speculation` statistics when `return_dict_in_generate=True`.
    """
    if heads is None or tree is None:
        raise ValueError("tree_speculative_generate needs heads= and tree=; call HydraForCausalLM.generate.")
    check_greedy_request(input_ids, generation_config, logits_processor, model_kwargs)
    cache = model_kwargs.get("past_key_values")
    if not isinstance(cache, DynamicCache) or cache.get_seq_length() != 0:
        raise ValueError("speculative=True starts from an empty DynamicCache; do not pass past_key_values.")
    tree = tree.to(input_ids.device)
    embed_tokens = model.get_input_embeddings()
    context_cache = heads.new_context_cache()
    if streamer is not None:
        streamer.put(input_ids.cpu())

    start = prefill(model, heads, input_ids, cache, context_cache)
    check_cache_supported(cache)
    sequence, finished = append_until_stop(input_ids, start.next_token[None], stopping_criteria)
    root, context = start.next_token, start.context
    accepted_lengths: list[int] = []
    if streamer is not None:
        streamer.put(start.next_token[None].cpu())

    while not finished:
        past = cache.get_seq_length()
        draft = draft_tree(heads, tree, context, root, embed_tokens)
        verified = verify_tree(model, cache, draft.tokens, tree)
        accepted = greedy_accept(draft.tokens, verified.logits, tree)
        keep_accepted(cache, past, accepted.nodes, tree.num_tokens)
        positions = (past + torch.arange(accepted.nodes.shape[0], device=input_ids.device))[None]  # (1, a)
        context = heads.encode_context(verified.hidden[accepted.nodes][None], positions, context_cache)[0, -1]
        root = accepted.bonus_token
        new_tokens = torch.cat([draft.tokens[accepted.nodes[1:]], root[None]])  # (a,)
        before = sequence.shape[1]
        sequence, finished = append_until_stop(sequence, new_tokens, stopping_criteria)
        accepted_lengths.append(sequence.shape[1] - before)
        if streamer is not None:
            streamer.put(sequence[0, before:].cpu())

    if streamer is not None:
        streamer.end()
    stats = SpeculationStats(
        steps=len(accepted_lengths),
        new_tokens=sequence.shape[1] - input_ids.shape[1],
        accepted_lengths=tuple(accepted_lengths),
    )
    if generation_config.return_dict_in_generate:
        return HydraGenerateOutput(sequences=sequence, past_key_values=None, speculation=stats)
    return sequence
