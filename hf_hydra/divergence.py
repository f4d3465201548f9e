"""Where a speculative output first differs from plain greedy `generate`, and whether that is a floating-point tie.

Verifying several tokens at once runs other kernels than one-token decoding (other reduction orders), so the
base's logits differ in their last bits between the two paths. Greedy speculative decoding is exact up to that:
the only difference allowed is a first differing token where the base's top-2 logits are within rounding of each
other. How close that is depends on the base's dtype:

* float32 (and float64): 1e-4 absolute. Measured differences between the paths on SmolLM2 are ~1e-5 (30 layers of
  float32 rounding accumulate to far more than one ulp of a logit).
* bfloat16 and float16: two units in the last place of the top logit in that dtype (one rounding per path). In
  half precision the logits themselves are rounded to 8 (bfloat16) or 11 (float16) significant bits, so exactly
  equal top-2 logits are common; measured on SmolLM2 in bfloat16, every first difference of 10 MT-Bench answers
  had a gap of 0 or 1 ulp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

FLOAT32_TIE_TOLERANCE = 1e-4
HALF_PRECISION_TIE_ULPS = 2


@dataclass(frozen=True)
class Divergence:
    index: int  # position in the sequence of the first differing token
    gap: float  # the base's top-2 logit gap there, computed by a forward over the reference's prefix
    tolerance: float  # the largest gap that is a floating-point tie for the base's dtype (`tie_tolerance`)

    @property
    def is_tie(self) -> bool:
        return self.gap <= self.tolerance


def tie_tolerance(dtype: torch.dtype, top_logit: float) -> float:
    """The largest top-2 logit gap that rounding in `dtype` explains, at a top logit of `top_logit`."""
    if dtype in (torch.float32, torch.float64):
        return FLOAT32_TIE_TOLERANCE
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"no tie tolerance for a base in {dtype}: use float32, float64, bfloat16 or float16.")
    return HALF_PRECISION_TIE_ULPS * ulp(dtype, top_logit)


def ulp(dtype: torch.dtype, value: float) -> float:
    """The spacing of `dtype`'s representable numbers at `value` (normal range)."""
    exponent = math.floor(math.log2(abs(value))) if value != 0 else 0
    return torch.finfo(dtype).eps * 2.0**exponent


def first_divergence(base: PreTrainedModel, reference: torch.Tensor, other: torch.Tensor) -> Divergence | None:
    """Where two (1, S) sequences first differ, with the base's top-2 logit gap for that token (None: identical).

    One output ending earlier than the other is a divergence with an infinite gap: never a tie."""
    common = min(reference.shape[1], other.shape[1])
    differing = (reference[0, :common] != other[0, :common]).nonzero()
    if differing.numel() == 0:
        if reference.shape[1] == other.shape[1]:
            return None
        return Divergence(index=common, gap=float("inf"), tolerance=0.0)
    index = int(differing[0])
    with torch.no_grad():
        top = base(reference[:, :index]).logits[0, -1].float().topk(2).values
    return Divergence(index=index, gap=float(top[0] - top[1]), tolerance=tie_tolerance(base.dtype, float(top[0])))
