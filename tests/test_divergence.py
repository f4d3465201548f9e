"""First differences between greedy outputs, and which of them are floating-point ties for the base's dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from hf_hydra.divergence import FLOAT32_TIE_TOLERANCE, first_divergence, tie_tolerance, ulp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_first_difference_is_found_with_the_base_top2_gap(dtype: torch.dtype) -> None:
    base = make_tiny_model("llama").to(dtype)
    reference = torch.tensor([[5, 6, 7, 8, 9]])
    divergence = first_divergence(base, reference, torch.tensor([[5, 6, 7, 1, 9]]))
    assert divergence.index == 3
    with torch.no_grad():
        top = base(reference[:, :3]).logits[0, -1].float().topk(2).values
    assert divergence.gap == float(top[0] - top[1])
    assert divergence.tolerance == tie_tolerance(dtype, float(top[0]))
    assert divergence.is_tie == (divergence.gap <= divergence.tolerance)
    assert first_divergence(base, reference, reference.clone()) is None


def test_an_output_ending_early_is_never_a_tie() -> None:
    base = make_tiny_model("llama")
    reference = torch.tensor([[5, 6, 7, 8, 9]])
    divergence = first_divergence(base, reference, reference[:, :4])
    assert divergence.index == 4 and divergence.gap == float("inf") and not divergence.is_tie


def test_half_precision_ties_are_two_ulps_of_the_top_logit() -> None:
    assert tie_tolerance(torch.float32, 20.0) == FLOAT32_TIE_TOLERANCE
    assert ulp(torch.bfloat16, 13.0) == 2.0**-7 * 8  # 8 significant bits: spacing 1/16 in [8, 16)
    assert ulp(torch.float16, 13.0) == 2.0**-10 * 8
    assert tie_tolerance(torch.bfloat16, 13.0) == 2 * 2.0**-4
    assert tie_tolerance(torch.bfloat16, -20.0) == 2 * 2.0**-3
    # Neighbouring bfloat16 numbers really are one ulp apart there.
    value = torch.tensor(13.0, dtype=torch.bfloat16)
    assert float(torch.nextafter(value, torch.tensor(99.0, dtype=torch.bfloat16)) - value) == ulp(torch.bfloat16, 13.0)
    with pytest.raises(ValueError, match="float32, float64, bfloat16 or float16"):
        tie_tolerance(torch.int8, 1.0)
