"""For the sampling tests: the exact distribution of plain sampling's first tokens, and Pearson's chi-square
goodness-of-fit test against exact cell probabilities."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test of `counts` (any shape) against the exact probabilities `probs`
    (same shape, summing to 1). Cells expected fewer than `min_expected` times are pooled into one, so the
    chi-square approximation holds; an observed outcome of probability 0 gives 0.0."""
    expected = (probs.double() * counts.sum()).flatten()
    observed = counts.double().flatten()
    if bool((observed[expected == 0] > 0).any()):
        return 0.0
    small = expected < min_expected
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    observed = torch.cat([observed[~small], observed[small].sum()[None]])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.double), statistic / 2))


def exact_first_three(base: PreTrainedModel, prompt: torch.Tensor, **sampling) -> torch.Tensor:
    """(V, V, V) joint distribution of the first three tokens of plain sampling, from generate's own
    processed scores (one batched call per length, all continuations as rows)."""
    vocab = base.config.vocab_size
    tokens = torch.arange(vocab)
    rows = (
        prompt,
        torch.cat([prompt.expand(vocab, -1), tokens[:, None]], dim=1),  # (V, L + 1)
        torch.cat([prompt.expand(vocab * vocab, -1), torch.cartesian_prod(tokens, tokens)], dim=1),  # (V^2, L + 2)
    )
    steps = []
    for batch in rows:
        out = base.generate(
            batch, attention_mask=torch.ones_like(batch), do_sample=True, max_new_tokens=1,
            output_scores=True, return_dict_in_generate=True, **sampling,
        )  # fmt: skip
        steps.append(out.scores[0].softmax(dim=-1))  # (rows, V)
    first, second, third = steps
    return first[0][:, None, None] * second[:, :, None] * third.reshape(vocab, vocab, vocab)
