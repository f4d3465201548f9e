"""A goodness-of-fit test for the sampling tests: Pearson's chi-square against exact cell probabilities."""

from __future__ import annotations

import torch


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
