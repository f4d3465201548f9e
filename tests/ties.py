"""The one exactness assertion of greedy speculative decoding: identical tokens, or a floating-point tie."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from hf_hydra.divergence import first_divergence


def assert_same_or_tie(
    base: PreTrainedModel, plain: torch.Tensor, fast: torch.Tensor, prompt_length: int
) -> str | None:
    """Equal (1, S) sequences, or a first difference at a floating-point tie for the base's dtype (returns its
    description, for the test to report); anything else fails with the gap and the tolerance."""
    divergence = first_divergence(base, plain, fast)
    if divergence is None:
        return None
    where = divergence.index - prompt_length
    assert divergence.is_tie, (
        f"outputs differ at new token {where} with a top-2 logit gap of {divergence.gap} "
        f"(a {base.dtype} tie is at most {divergence.tolerance})"
    )
    return f"tie at new token {where}: top-2 gap {divergence.gap:.2e} ({base.dtype})"
