"""What one sequence's decoding step and call share between the single-prompt loop (`decoding`) and the batch
loop (`batch_decoding`): scoring and accepting a verified tree, appending the accepted tokens until a stopping
criterion fires, the call's statistics and phase timer, and the `generate` output that carries them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList, StoppingCriteriaList

from .acceptance import Acceptance, AcceptanceRule
from .processors import node_scores
from .tree import TreeBuffers


@dataclass(frozen=True)
class SpeculationStats:
    """Per-call statistics. tau counts the tokens appended per base verification step, bonus included."""

    steps: int  # base verification forwards after the prefill
    new_tokens: int  # tokens generated, the prefill's first token included
    accepted_lengths: tuple[int, ...]  # tokens appended by each step (accepted drafts + bonus, cut at a stop)
    accepted_drafts: int = 0  # drafted tokens accepted and appended (the new tokens but the bonus ones)
    context_tokens: int = 0  # of those, the ones only the context candidates proposed (not the heads)
    phase_seconds: dict[str, float] = field(default_factory=dict, compare=False)  # wall time per phase, summed

    @property
    def tau(self) -> float:
        """Mean accepted length (>= 1); nan when no verification step ran."""
        return sum(self.accepted_lengths) / self.steps if self.steps else float("nan")

    @property
    def overhead_fraction(self) -> float:
        """Share of the decoding steps' time spent outside the base's verification forward (drafting,
        acceptance, bookkeeping)."""
        step = sum(v for k, v in self.phase_seconds.items() if k in STEP_PHASES)
        return 1.0 - self.phase_seconds.get("verify", 0.0) / step if step else float("nan")


STEP_PHASES = ("draft", "verify", "accept", "commit")


class PhaseTimer:
    """Sums time per named phase without synchronising the host with the device.

    On the CPU: wall time. On CUDA: the device's timeline between events recorded where each phase starts and
    ends, so asynchronous GPU work is charged to the phase that launched it while the loop's own control flow stays
    the only thing that waits for the device; `totals` reads the events once, at the end of the call."""

    def __init__(self, device: torch.device) -> None:
        self.on_cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((phase, start, end))
            return
        start_time = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start_time

    def totals(self) -> dict[str, float]:
        """Seconds per phase, summed over the call (on CUDA: one synchronisation, here)."""
        if self.events:
            self.events[-1][2].synchronize()
            for phase, start, end in self.events:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + start.elapsed_time(end) / 1000
            self.events = []
        return self.seconds


@dataclass
class HydraGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate(..., return_dict_in_generate=True)` output, plus the speculation statistics."""

    speculation: SpeculationStats | None = None
    # a batch: each row's statistics (`speculation` then sums the rows; its steps are the batched forwards)
    speculation_per_row: tuple[SpeculationStats, ...] | None = None



def accept(
    rule: AcceptanceRule,
    tokens: torch.Tensor,
    logits: torch.Tensor,
    sequence: torch.Tensor,
    tree: TreeBuffers,
    logits_processor: LogitsProcessorList,
    generator: torch.Generator | None,
) -> Acceptance:
    """Score every node with its own prefix (logits processors), then apply the call's acceptance rule.
    tokens: (T,) drafted tree; logits: (T, V) the verification's; sequence: (1, S) ends with the root."""
    scores = node_scores(logits, sequence, tokens, tree, logits_processor)  # (T, V)
    return rule.accept(tokens, scores, tree, generator)


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


