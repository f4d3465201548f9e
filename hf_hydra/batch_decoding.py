"""The tree loop for a batch of prompts: each row drafts its own tree, ONE base forward verifies all of them.

    prefill : one base forward over the left-padded prompts (B, L), as plain batched `generate` runs it
    repeat  : each row drafts its tree (its own heads' context, context candidates, dynamic tree)
              -> verify: the trees padded to the largest T (padding nodes see only themselves), one forward
                 over (B, T) with a (B, 1, T, S + T) mask and each row's own positions
              -> accept: each row its own path and bonus (the single-prompt rules, with its own logits
                 processors and stopping criteria)
              -> commit: each row's accepted entries move to the front of the step's cache region, which keeps
                 the longest row's count; a shorter row's extra entries stay as holes that no later query sees
                 (`visible`: (B, S) bool), so no row's cache is ever copied whole
    A finished row (EOS, stop strings, max length) leaves the batch (`DynamicCache.batch_select_indices`): it is
    neither drafted nor verified again, and its output is padded with `pad_token_id` as plain `generate` pads.

A row's next position is the number of its visible cache entries, where plain batched decoding of left-padded
prompts places it (positions = cumsum(attention_mask) - 1). So each row takes the single-prompt loop's steps:
greedy rows give plain greedy's tokens of that prompt alone up to floating-point ties (padding and batching change
reduction orders), and sampled rows follow plain sampling's distribution (every row draws from the one generator,
in row order; the rows' draws are independent). Dynamic trees are sized on the verification curve as the batch
shares it (`DynamicTreePolicy.for_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.generation import LogitsProcessorList, StoppingCriteriaList

from . import support
from .acceptance import Acceptance, AcceptanceRule
from .cache_name import cache_argument
from .dynamic_tree import DynamicTreePolicy
from .heads import DraftHeads
from .processors import next_token_scores, processors_for_row
from .sequence_steps import HydraGenerateOutput, PhaseTimer, SpeculationStats, accept, append_until_stop
from .step_drafts import StepDraft, StepDrafter
from .tree import TreeBuffers
from .verification import check_cache_supported, keep_accepted_rows, verify_tree_rows


@dataclass
class Row:
    """One prompt of the batch while it decodes."""

    index: int  # its row in the caller's batch
    sequence: torch.Tensor  # (1, L + n): the padded prompt and the tokens generated so far
    position: int  # its visible cache entries: the position of its next token
    drafter: StepDrafter
    context_cache: DynamicCache | None  # the heads' prefix layer's (None without one)
    heads_context: torch.Tensor | None  # (d,)
    root: torch.Tensor  # () the last token, not yet in the cache: the next tree grows from it
    finished: bool
    logits_processor: LogitsProcessorList  # the call's, for this row (`processors_for_row`)
    accepted_lengths: list[int] = field(default_factory=list)
    accepted_drafts: int = 0
    context_tokens: int = 0

    def stats(self, prompt_length: int) -> SpeculationStats:
        return SpeculationStats(
            steps=len(self.accepted_lengths),
            new_tokens=self.sequence.shape[1] - prompt_length,
            accepted_lengths=tuple(self.accepted_lengths),
            accepted_drafts=self.accepted_drafts,
            context_tokens=self.context_tokens,
        )


@dataclass(frozen=True)
class BatchRequest:
    """What every row shares: the call's sources, heads, tree, rule, processors and stopping criteria."""

    sources: str
    heads: DraftHeads | None
    tree: TreeBuffers | DynamicTreePolicy | None
    rule: AcceptanceRule
    logits_processor: LogitsProcessorList
    stopping_criteria: StoppingCriteriaList
    generator: torch.Generator | None


def check_batch_request(model: PreTrainedModel, model_kwargs: dict, streamer: object) -> None:
    """Refuse what a batch cannot decode exactly, before anything runs."""
    if model_kwargs.get("inputs_embeds") is not None:
        raise support.refuse("batch_embeds", support.TREE)
    rope_type = support.position_limits(model.config).rope_type
    if rope_type is not None:
        raise support.refuse("batch_rope", support.TREE, f"rope_type={rope_type!r}")
    if streamer is not None:
        raise ValueError("Streamers take one sequence (as in transformers): stream a batch of 1, or drop streamer=.")


@torch.no_grad()
def batch_tree_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: DynamicCache,
    request: BatchRequest,
    generation_config: GenerationConfig,
) -> torch.Tensor | HydraGenerateOutput:
    """Tree speculative decoding of a batch (B, L) of left-padded prompts (`attention_mask` (B, L), None: no
    padding). Returns (B, L + n) padded with `pad_token_id` like batched `generate`, or a `HydraGenerateOutput`
    whose `speculation` sums the rows (steps = batched base forwards) and `speculation_per_row` has each row's."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    timer = PhaseTimer(input_ids.device)
    with timer("prefill"):
        rows, visible = _prefill(model, input_ids, attention_mask, cache, request)
    check_cache_supported(cache)
    rows, visible, done = _drop_finished(rows, cache, visible)
    steps, sized_for = 0, 0
    while rows:
        if len(rows) != sized_for:  # the rows sharing a forward changed: so did each row's share of the curve
            _size_trees(rows, request)
            sized_for = len(rows)
        past = cache.get_seq_length()
        with timer("draft"):
            drafts = [row.drafter.draft(row.position, row.heads_context, row.root) for row in rows]
        with timer("verify"):
            verified = verify_tree_rows(
                model, cache, [d.tokens for d in drafts], [d.tree for d in drafts], visible,
                [row.position for row in rows],
            )  # fmt: skip
        with timer("accept"):
            accepted = [
                accept(request.rule, d.tokens, verified.logits[b, : d.tree.num_tokens], row.sequence, d.tree,
                       row.logits_processor, request.generator)
                for b, (row, d) in enumerate(zip(rows, drafts, strict=True))
            ]  # fmt: skip
        with timer("commit"):
            visible = keep_accepted_rows(cache, past, [a.nodes for a in accepted], visible)
            for b, (row, draft, step) in enumerate(zip(rows, drafts, accepted, strict=True)):
                _commit_row(row, draft, step, verified.hidden[b], request)
            rows, visible, finished = _drop_finished(rows, cache, visible)
            done += finished
        steps += 1
    return _output(sorted(done, key=lambda row: row.index), input_ids.shape[1], steps, timer, generation_config)


def _prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: DynamicCache,
    request: BatchRequest,
) -> tuple[list[Row], torch.Tensor]:
    """One base forward over the padded prompts; each row's first token, heads' context and drafter.
    -> the rows and `visible` (B, L) bool."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        **cache_argument(cache),
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    visible = attention_mask.bool()  # (B, L)
    rows = [
        _first_row(model, b, input_ids[b : b + 1], visible[b], out.logits[b, -1], out.hidden_states[-1][b], request)
        for b in range(input_ids.shape[0])
    ]
    return rows, visible


def _first_row(
    model: PreTrainedModel,
    index: int,
    prompt: torch.Tensor,
    visible: torch.Tensor,
    logits: torch.Tensor,
    hidden: torch.Tensor,
    request: BatchRequest,
) -> Row:
    """Row `index` after the prefill. prompt: (1, L) padded; visible: (L,) bool; logits: (V,); hidden: (L, d)."""
    drafter = StepDrafter(
        request.sources, request.heads, request.tree, model.get_input_embeddings(),
        support.position_limits(model.config), 0, prompt.device,
    )  # fmt: skip
    heads, context_cache, heads_context = drafter.heads, None, None
    length = int(visible.sum())
    if heads is not None:
        context_cache = heads.new_context_cache()
        positions = torch.arange(length, device=prompt.device)[None]  # (1, n)
        heads_context = heads.encode_context(hidden[visible][None], positions, context_cache)[0, -1]  # (d,)
    processors = processors_for_row(request.logits_processor, index)
    root = request.rule.first_token(next_token_scores(logits, prompt, processors), request.generator)
    sequence, finished = append_until_stop(prompt, root[None], request.stopping_criteria)
    drafter.observe(prompt[0, visible].tolist() + [int(root)], [])
    return Row(index, sequence, length, drafter, context_cache, heads_context, root, finished, processors)


def _drop_finished(
    rows: list[Row], cache: DynamicCache, visible: torch.Tensor
) -> tuple[list[Row], torch.Tensor, list[Row]]:
    """The rows still decoding, their cache rows and `visible` rows (B', S); and the finished ones, which leave
    the batch (nothing of theirs is drafted or verified again)."""
    keep = [b for b, row in enumerate(rows) if not row.finished]
    finished = [row for row in rows if row.finished]
    if finished and keep:
        index = torch.tensor(keep, device=visible.device)
        cache.batch_select_indices(index)
        visible = visible[index]
    return [rows[b] for b in keep], visible, finished


def _size_trees(rows: Sequence[Row], request: BatchRequest) -> None:
    """Dynamic trees are sized on the curve as this many rows share it."""
    if isinstance(request.tree, DynamicTreePolicy):
        policy = request.tree.for_rows(len(rows))
        for row in rows:
            if row.drafter.policy is not None:
                row.drafter.policy = policy


def _commit_row(row: Row, draft: StepDraft, accepted: Acceptance, hidden: torch.Tensor, request: BatchRequest) -> None:
    """Append row's accepted drafts and bonus (cut at a stop), advance its heads' context and drafter.
    hidden: (T, d) the row's verified hidden states."""
    nodes = accepted.nodes
    if row.drafter.heads is not None:
        positions = (row.position + torch.arange(nodes.shape[0], device=nodes.device))[None]  # (1, a)
        row.heads_context = row.drafter.heads.encode_context(hidden[nodes][None], positions, row.context_cache)[0, -1]
    row.position += nodes.shape[0]
    row.root = accepted.bonus_token
    drafts = draft.tokens[nodes[1:]]  # (a - 1,)
    before = row.sequence.shape[1]
    row.sequence, row.finished = append_until_stop(
        row.sequence, torch.cat([drafts, row.root[None]]), request.stopping_criteria
    )
    appended = row.sequence.shape[1] - before
    row.accepted_lengths.append(appended)
    row.accepted_drafts += min(appended, drafts.shape[0])
    if draft.from_context is not None:
        row.context_tokens += int(draft.from_context[nodes[1 : 1 + appended]].sum())
        row.drafter.observe(row.sequence[0, before:].tolist(), drafts.tolist())


def _output(
    rows: Sequence[Row], prompt_length: int, steps: int, timer: PhaseTimer, generation_config: GenerationConfig
) -> torch.Tensor | HydraGenerateOutput:
    """The rows' sequences right-padded to the longest (B, L + n), and their statistics."""
    longest = max(row.sequence.shape[1] for row in rows)
    pad = generation_config.pad_token_id
    if pad is None and any(row.sequence.shape[1] < longest for row in rows):
        raise ValueError(
            "Rows stopped at different lengths and there is no pad_token_id to fill them with: set "
            "pad_token_id (e.g. to the tokenizer's pad or eos token)."
        )
    pad = pad[0] if isinstance(pad, list) else pad
    sequences = torch.stack([
        torch.nn.functional.pad(row.sequence[0], (0, longest - row.sequence.shape[1]), value=pad or 0) for row in rows
    ])  # (B, L + n)  # fmt: skip
    if not generation_config.return_dict_in_generate:
        return sequences
    per_row = tuple(row.stats(prompt_length) for row in rows)
    total = SpeculationStats(
        steps=steps,
        new_tokens=sum(s.new_tokens for s in per_row),
        accepted_lengths=tuple(length for s in per_row for length in s.accepted_lengths),
        accepted_drafts=sum(s.accepted_drafts for s in per_row),
        context_tokens=sum(s.context_tokens for s in per_row),
        phase_seconds=timer.totals(),
    )
    return HydraGenerateOutput(sequences=sequences, speculation=total, speculation_per_row=per_row)
