"""Tests for hf_hydra.processors: generate's logits processors applied to every tree node with its own prefix."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)

from hf_hydra.processors import check_processors_supported, next_token_scores, node_scores
from hf_hydra.tree import build_tree_buffers

VOCAB = 12

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _processors() -> LogitsProcessorList:
    """What generate builds for repetition_penalty, no_repeat_ngram_size, min_new_tokens and sampling
    (repetition penalty with the (1,) prompt-padding tensor generate gives it)."""
    return LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.8, prompt_ignore_length=torch.tensor([0])),
            NoRepeatNGramLogitsProcessor(2),
            MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=4, min_new_tokens=6, eos_token_id=3),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(6),
            TopPLogitsWarper(0.9),
            MinPLogitsWarper(0.05),
        ]
    )


@pytest.mark.parametrize("tree_name", ["cpu_small_11", "mc_sim_7b_63"])
def test_node_scores_equal_processing_each_node_alone(tree_name: str) -> None:
    """Batched per depth == what plain decoding computes at each node: the processors called on that node's
    own sequence (prefix + the drafts on its path) with batch size 1."""
    tree = build_tree_buffers(tree_name, num_heads=4)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (tree.num_tokens,), generator=generator)
    sequence = torch.tensor([[2, 5, 2, 7, 9, int(tokens[0])]])  # the prompt (4 tokens), one token, the root
    logits = torch.randn(tree.num_tokens, VOCAB, generator=generator) * 2
    processors = _processors()
    scores = node_scores(logits, sequence, tokens, tree, processors)
    assert scores.shape == logits.shape and scores.dtype == torch.float32
    for node in range(tree.num_tokens):
        path = tree.ancestors[node, 1 : int(tree.depths[node]) + 1]
        own_sequence = torch.cat([sequence, tokens[path][None]], dim=1)
        expected = processors(own_sequence, logits[node][None].clone())[0]
        torch.testing.assert_close(scores[node], expected, msg=f"node {node}")
    assert torch.isinf(scores).any()  # the processors did something (top-k / no-repeat / min-new-tokens)
    torch.testing.assert_close(next_token_scores(logits[0], sequence, processors), scores[0])


def test_without_processors_the_logits_are_unchanged() -> None:
    tree = build_tree_buffers("cpu_small_11", num_heads=4)
    logits = torch.randn(tree.num_tokens, VOCAB)
    tokens = torch.zeros(tree.num_tokens, dtype=torch.long)
    assert node_scores(logits, torch.tensor([[0]]), tokens, tree, LogitsProcessorList()) is logits
    half = logits.to(torch.bfloat16)
    assert torch.equal(node_scores(half, torch.tensor([[0]]), tokens, tree, LogitsProcessorList()), half.float())


class _CustomProcessor(LogitsProcessor):
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return scores


def test_processors_that_are_not_known_to_be_row_wise_are_refused() -> None:
    check_processors_supported(_processors())
    with pytest.raises(ValueError, match="_CustomProcessor"):
        check_processors_supported(LogitsProcessorList([TemperatureLogitsWarper(0.5), _CustomProcessor()]))
    guidance = UnbatchedClassifierFreeGuidanceLogitsProcessor.__new__(UnbatchedClassifierFreeGuidanceLogitsProcessor)
    with pytest.raises(ValueError, match="UnbatchedClassifierFreeGuidanceLogitsProcessor"):
        check_processors_supported(LogitsProcessorList([guidance]))
