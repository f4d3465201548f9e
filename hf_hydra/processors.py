"""generate()'s logits processors on a verified tree: every node scored with its own prefix.

Plain decoding calls `logits_processor(input_ids, scores)` once per step, with the sequence so far
(1, S) and that step's next-token logits in float32 (1, V); sampling then draws from the softmax of the
result, greedy takes its argmax. A tree node a stands for the sequence `prefix + tokens[ancestors of a]`
(`prefix` ends with the root), so its scores are `logits_processor(that sequence, logits[a])`: exactly
what plain decoding would compute if it reached node a.

The nodes of one depth share a length and are processed as one batch, so every processor must be
row-wise (a row's output depends on that row only). `ROW_WISE_PROCESSORS` lists the ones checked to be;
others (classifier-free guidance runs the model itself, watermarking keeps state, a custom processor is
unknown) are refused with a ValueError rather than risk a silently wrong distribution.
"""

from __future__ import annotations

import torch
from transformers.generation import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from . import support
from ._compat import prompt_ignore_lengths, with_prompt_ignore_lengths
from .tree import TreeBuffers

ROW_WISE_PROCESSORS: frozenset[type] = frozenset(
    {
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        MinPLogitsWarper,
        TopHLogitsWarper,
        TypicalLogitsWarper,
        EpsilonLogitsWarper,
        EtaLogitsWarper,
        RepetitionPenaltyLogitsProcessor,  # its per-batch `prompt_ignore_length` is expanded, see _for_rows
        NoRepeatNGramLogitsProcessor,
        NoBadWordsLogitsProcessor,
        SequenceBiasLogitsProcessor,
        MinLengthLogitsProcessor,
        MinNewTokensLengthLogitsProcessor,
        ForcedBOSTokenLogitsProcessor,
        ForcedEOSTokenLogitsProcessor,
        InfNanRemoveLogitsProcessor,
        ExponentialDecayLengthPenalty,
        LogitNormalization,
        SuppressTokensLogitsProcessor,
        SuppressTokensAtBeginLogitsProcessor,
    }
)


# transformers' assisted loop applies the processors to each prefix of its chain, one at a time, and again to
# the prefixes after a rejection: every processor that depends on its prefix only is exact there.
PER_PREFIX_PROCESSORS: frozenset[type] = ROW_WISE_PROCESSORS | {PrefixConstrainedLogitsProcessor}


def check_processors_supported(logits_processor: LogitsProcessorList, path: str = support.TREE) -> None:
    """Raise a ValueError naming the processors `path` cannot apply exactly."""
    allowed, limitation = (
        (ROW_WISE_PROCESSORS, "processors") if path == support.TREE else (PER_PREFIX_PROCESSORS, "stateful_processors")
    )
    unsupported = sorted({type(p).__name__ for p in logits_processor if type(p) not in allowed})
    if unsupported:
        raise support.refuse(limitation, path, ", ".join(unsupported))


def next_token_scores(
    logits: torch.Tensor, sequence: torch.Tensor, logits_processor: LogitsProcessorList
) -> torch.Tensor:
    """The processed scores of the next token after `sequence` (1, S), as plain decoding computes them.
    logits: (V,) -> (V,) float32."""
    scores = logits.float()
    if len(logits_processor) == 0:
        return scores
    return logits_processor(sequence, scores[None].clone())[0]


def node_scores(
    logits: torch.Tensor,
    sequence: torch.Tensor,
    tokens: torch.Tensor,
    tree: TreeBuffers,
    logits_processor: LogitsProcessorList,
) -> torch.Tensor:
    """Processed next-token scores of every tree node, each with its own prefix.

    logits: (T, V) the base's logits at the nodes; sequence: (1, S) the verified tokens, ending with the
    root; tokens: (T,) the drafted tree. -> (T, V) float32 (the logits themselves when there are no
    processors).
    """
    scores = logits.float()
    if len(logits_processor) == 0:
        return scores
    out = torch.empty_like(scores)
    out[:1] = logits_processor(sequence, scores[:1].clone())  # the root: the sequence itself
    for level in tree.levels:
        rows = slice(level.start, level.end)
        drafted = tokens[tree.ancestors[rows, 1 : level.depth + 1]]  # (n, depth): below the root, down to the node
        prefixes = torch.cat([sequence.expand(drafted.shape[0], -1), drafted], dim=1)  # (n, S + depth)
        out[rows] = _for_rows(logits_processor, drafted.shape[0])(prefixes, scores[rows].clone())
    return out


def processors_for_row(logits_processor: LogitsProcessorList, row: int) -> LogitsProcessorList:
    """The processors a batched `generate` built, for its row `row` alone: RepetitionPenaltyLogitsProcessor
    holds every row's prompt padding (a (B,) `prompt_ignore_length`), the row keeps its own; the other row-wise
    processors hold nothing per row."""
    return LogitsProcessorList(_row_repetition_penalty(processor, row) for processor in logits_processor)


def _row_repetition_penalty(processor: LogitsProcessor, row: int) -> LogitsProcessor:
    ignore = prompt_ignore_lengths(processor)
    if type(processor) is not RepetitionPenaltyLogitsProcessor or ignore is None:
        return processor
    return with_prompt_ignore_lengths(processor, ignore[row : row + 1])


def _for_rows(logits_processor: LogitsProcessorList, rows: int) -> LogitsProcessorList:
    """The processors for a batch of `rows` prefixes of the one prompt they were built for. generate builds
    RepetitionPenaltyLogitsProcessor with a (1,) tensor `prompt_ignore_length` (the prompt's padding);
    the same value holds for every row."""
    if rows == 1:
        return logits_processor
    return LogitsProcessorList(_expanded_repetition_penalty(processor, rows) for processor in logits_processor)


def _expanded_repetition_penalty(processor: LogitsProcessor, rows: int) -> LogitsProcessor:
    ignore = prompt_ignore_lengths(processor)
    if type(processor) is not RepetitionPenaltyLogitsProcessor or ignore is None:
        return processor
    if ignore.shape[0] != 1:
        raise ValueError("internal: node_scores takes the processors of one row (processors_for_row).")
    return with_prompt_ignore_lengths(processor, ignore.expand(rows))
