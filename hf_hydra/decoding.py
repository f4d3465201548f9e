"""The tree decoding loop, run by transformers' `generate(custom_generate=...)`.

    prefill : base forward over the prompt -> first token, the heads' context vector
    repeat  : draft (heads' tree + context candidates -> one tree, `step_drafts`) -> verify (one base
              forward) -> score (logits processors per node)
              -> accept (greedy / lossless / typical: a path + bonus)
              -> commit (compact the KV cache, advance the heads' context, stream, check stopping)

`generate()` prepares the generation config, special tokens, a fresh `DynamicCache` (whose layers the loop turns
into growing ones, `hf_hydra.growing_cache`), `max_length`, logits processors and stopping criteria; this module
does the rest for one prompt, and hands a batch of several to `batch_decoding`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.generation import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from . import support
from .acceptance import acceptance_rule
from .batch_decoding import BatchRequest, batch_tree_generate, check_batch_request
from .cache_name import CACHE_NAME, cache_argument
from .dynamic_tree import DynamicTreePolicy
from .growing_cache import grow_in_place
from .heads import DraftHeads
from .processors import check_processors_supported, next_token_scores
from .sequence_steps import HydraGenerateOutput, PhaseTimer, SpeculationStats, accept, append_until_stop
from .step_drafts import StepDrafter, check_sources
from .tree import TreeBuffers
from .verification import check_cache_supported, keep_accepted, verify_tree


@dataclass(frozen=True)
class Prefill:
    logits: torch.Tensor  # (V,) the base's next-token logits after the prompt
    context: torch.Tensor | None  # (d,) the heads' context vector at the last prompt position


def check_request(
    model: PreTrainedModel,
    batch_size: int,
    generation_config: GenerationConfig,
    logits_processor: LogitsProcessorList,
) -> None:
    """Refuse what the tree loop does not implement, naming the limitation (see `hf_hydra.support`)."""
    support.check_generation_request(generation_config, batch_size, support.TREE)
    support.check_tree_base(model.config)
    check_processors_supported(logits_processor)
    flags = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
    asked = [flag for flag in flags if getattr(generation_config, flag, False)]
    if asked:
        raise support.refuse("outputs", support.TREE, ", ".join(asked))


@dataclass(frozen=True)
class Prompt:
    """The prompt as `generate` prepared it: token ids, or embeddings only (`input_ids` then (1, 0)), and
    the attention mask and positions plain decoding uses (a masked prompt token: padding or `pad_token_id`)."""

    input_ids: torch.Tensor  # (1, L) or (1, 0) with inputs_embeds
    inputs_embeds: torch.Tensor | None  # (1, L, d)
    attention_mask: torch.Tensor | None  # (1, L), None when every position is attended
    position_ids: torch.Tensor | None  # (1, L), None when the base takes no position ids
    visible: torch.Tensor | None  # (L,) bool: the positions later tokens attend to; None: all of them
    position_offset: int  # cache row i sits at position i + offset: decoding continues from the last position

    @classmethod
    def from_generate(cls, input_ids: torch.Tensor, model_kwargs: dict) -> Prompt:
        embeds = model_kwargs.get("inputs_embeds")
        length = input_ids.shape[1] if embeds is None else embeds.shape[1]
        mask = model_kwargs.get("attention_mask")
        mask = None if mask is None or bool(mask.all()) else mask
        position_ids = model_kwargs.get("position_ids")
        return cls(
            input_ids=input_ids,
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            visible=None if mask is None else mask[0].bool(),
            position_offset=0 if position_ids is None else int(position_ids[0, -1]) + 1 - length,
        )

    @property
    def length(self) -> int:
        return self.input_ids.shape[1] if self.inputs_embeds is None else self.inputs_embeds.shape[1]


@torch.no_grad()
def prefill(
    base: PreTrainedModel,
    heads: DraftHeads | None,
    prompt: Prompt,
    cache: DynamicCache,
    context_cache: DynamicCache | None,
) -> Prefill:
    """Run the base over the prompt, as plain decoding does; the cache then holds L entries. Without heads
    there is no context vector (None)."""
    ids = {"input_ids": prompt.input_ids} if prompt.inputs_embeds is None else {"inputs_embeds": prompt.inputs_embeds}
    out = base(
        **ids,
        attention_mask=prompt.attention_mask,
        **({} if prompt.position_ids is None else {"position_ids": prompt.position_ids}),
        **cache_argument(cache),
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    if heads is None:
        return Prefill(logits=out.logits[0, -1], context=None)
    hidden = out.hidden_states[-1]  # (1, L, d)
    positions = torch.arange(prompt.length, device=hidden.device)[None]  # (1, L)
    context = heads.encode_context(hidden, positions, context_cache)[0, -1]  # (d,)
    return Prefill(logits=out.logits[0, -1], context=context)


def tree_speculative_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    heads: DraftHeads | None = None,
    tree: TreeBuffers | DynamicTreePolicy | None = None,
    streamer: BaseStreamer | None = None,
    acceptance: str | None = None,
    posterior_threshold: float | None = None,
    posterior_alpha: float | None = None,
    generator: torch.Generator | None = None,
    sources: str | None = None,
    **model_kwargs,
) -> torch.LongTensor | HydraGenerateOutput:
    """`custom_generate` callable: tree speculative decoding of `model` (the base) with `heads` and / or
    context candidates (`sources`: "heads", "context" or "heads+context", see `hf_hydra.step_drafts`;
    default `generation_config.hydra_sources`, else "context" without heads).

    Greedy (`do_sample=False`): the same tokens as greedy `generate`. Sampling: `acceptance="lossless"`
    (default: `generation_config.hydra_acceptance`) samples exactly from the base's distribution after
    generate's logits processors (temperature, top-k, top-p, min-p, repetition penalty, ...);
    `acceptance="typical"` is the papers' typical acceptance (`posterior_threshold` eps = 0.09,
    `posterior_alpha` delta = 0.3), faster but not distribution-preserving. Random draws come from
    `generator`, or from torch's global RNG (seed it with `torch.manual_seed`) when None.

    input_ids: (1, L), or a left-padded batch (B, L) with its `attention_mask`, which `batch_decoding` decodes (each
    row its own tree, one forward for all). Returns (B, L + n) like `generate`, or a `HydraGenerateOutput` with
    `speculation` statistics when `return_dict_in_generate=True`.
    """
    sources = sources or getattr(generation_config, "hydra_sources", None) or ("heads" if heads else "context")
    check_sources(sources, heads)
    if "heads" in sources and tree is None:
        raise ValueError("tree_speculative_generate needs tree= with heads; call HydraForCausalLM.generate.")
    check_request(model, input_ids.shape[0], generation_config, logits_processor)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
    if acceptance is None:
        acceptance = getattr(generation_config, "hydra_acceptance", None)
    rule = acceptance_rule(bool(generation_config.do_sample), acceptance, posterior_threshold, posterior_alpha)
    cache = model_kwargs.get(CACHE_NAME)
    if cache is None:  # use_cache=False: speculation verifies against the cache all the same
        cache = DynamicCache(config=model.config)
    support.check_cache(cache, support.TREE)
    grow_in_place(cache)  # the loop appends a few entries per step: no copy of the whole cache each time
    if input_ids.shape[0] > 1:
        check_batch_request(model, model_kwargs, streamer)
        request = BatchRequest(sources, heads, tree, rule, logits_processor, stopping_criteria, generator)
        return batch_tree_generate(
            model, input_ids, model_kwargs.get("attention_mask"), cache, request, generation_config
        )
    prompt = Prompt.from_generate(input_ids, model_kwargs)
    drafter = StepDrafter(
        sources, heads, tree, model.get_input_embeddings(), support.position_limits(model.config),
        prompt.position_offset, input_ids.device,
    )  # fmt: skip
    heads = drafter.heads  # None when the heads do not draft: no context vector to keep either
    context_cache = heads.new_context_cache() if heads is not None else None
    if streamer is not None:
        streamer.put(input_ids.cpu())

    timer = PhaseTimer(input_ids.device)
    with timer("prefill"):
        start = prefill(model, heads, prompt, cache, context_cache)
    check_cache_supported(cache)
    root = rule.first_token(next_token_scores(start.logits, input_ids, logits_processor), generator)
    sequence, finished = append_until_stop(input_ids, root[None], stopping_criteria)
    drafter.observe(sequence[0].tolist(), [])
    heads_context = start.context  # (d,) the heads' context vector (None without heads)
    accepted_lengths: list[int] = []
    accepted_drafts = context_tokens = 0
    if streamer is not None:
        streamer.put(root[None].cpu())

    while not finished:
        past = cache.get_seq_length()
        with timer("draft"):
            draft = drafter.draft(past, heads_context, root)
        with timer("verify"):
            verified = verify_tree(model, cache, draft.tokens, draft.tree, prompt.visible, prompt.position_offset)
        with timer("accept"):
            accepted = accept(rule, draft.tokens, verified.logits, sequence, draft.tree, logits_processor, generator)
        with timer("commit"):
            keep_accepted(cache, past, accepted.nodes, draft.tree.num_tokens)
            if heads is not None:
                positions = (past + torch.arange(accepted.nodes.shape[0], device=input_ids.device))[None]  # (1, a)
                hidden = verified.hidden[accepted.nodes][None]  # (1, a, d)
                heads_context = heads.encode_context(hidden, positions, context_cache)[0, -1]
            root = accepted.bonus_token
            drafts = draft.tokens[accepted.nodes[1:]]  # (a - 1,)
            before = sequence.shape[1]
            sequence, finished = append_until_stop(sequence, torch.cat([drafts, root[None]]), stopping_criteria)
            appended = sequence.shape[1] - before
            accepted_lengths.append(appended)
            accepted_drafts += min(appended, drafts.shape[0])  # a stop may cut the step before its bonus
            if draft.from_context is not None:
                context_tokens += int(draft.from_context[accepted.nodes[1 : 1 + appended]].sum())
                drafter.observe(sequence[0, before:].tolist(), drafts.tolist())
            if streamer is not None:
                streamer.put(sequence[0, before:].cpu())

    if streamer is not None:
        streamer.end()
    # a stop inside the last path leaves entries of tokens not returned: keep one per token but the last, as plain
    # decoding does, so that the cache the caller gets back continues the returned sequence
    cache.crop(min(0, prompt.length + sequence.shape[1] - input_ids.shape[1] - 1 - cache.get_seq_length()))
    stats = SpeculationStats(
        steps=len(accepted_lengths),
        new_tokens=sequence.shape[1] - input_ids.shape[1],
        accepted_lengths=tuple(accepted_lengths),
        accepted_drafts=accepted_drafts,
        context_tokens=context_tokens,
        phase_seconds=timer.totals(),
    )
    if generation_config.return_dict_in_generate:
        return HydraGenerateOutput(sequences=sequence, speculation=stats)
    return sequence


def context_speculative_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    **kwargs,
) -> torch.LongTensor | HydraGenerateOutput:
    """`custom_generate` callable for any causal LM, without heads: the tree loop with context candidates
    (continuations of the text's latest n-grams found earlier in it), e.g.
    `model.generate(ids, custom_generate=context_speculative_generate)`. Exact like the heads' tree loop
    (greedy: plain greedy's tokens; sampling: lossless acceptance)."""
    return tree_speculative_generate(
        model, input_ids, logits_processor, stopping_criteria, generation_config, sources="context", **kwargs
    )
