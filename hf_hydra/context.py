"""Context candidates: drafts copied from earlier in the sequence (prompt and generated text).

Where the text so far ends with an n-gram that occurred before, what followed it then is a good guess for what
follows now (prompt lookup decoding). `SuffixIndex` keeps, for n = 1..max_ngram, the latest positions where
each n-gram ended, updated per appended token, so finding candidates never scans the context: the work per
token and per query is bounded by constants (`max_ngram`, `positions_per_key`, the candidate length).

`ContextDrafter` turns the matches into candidate token paths for one step. How far a candidate is followed
is decided by its estimated chance of being accepted: per match length n, the running rate at which copied
tokens were accepted in this call (`AcceptanceRates`, starting from a prior); a candidate's j-th token is
proposed while rate^j stays above `min_probability`, the smallest acceptance chance worth a verified node's
cost. The candidates are deterministic functions of the sequence, so merged into the heads' tree (see
`hf_hydra.tree.merge_token_paths`) they keep greedy decoding exact and lossless sampling lossless.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ContextCandidate:
    """Tokens to follow the root with, found after an earlier occurrence of the last `match_length` tokens;
    probabilities[j]: the estimated chance that tokens[: j + 1] are all accepted (empty before scoring)."""

    tokens: tuple[int, ...]
    match_length: int
    probabilities: tuple[float, ...] = ()


class SuffixIndex:
    """n-gram -> the latest `positions_per_key` positions where it ended, for n = 1..max_ngram."""

    def __init__(self, max_ngram: int = 3, positions_per_key: int = 4) -> None:
        if max_ngram < 1 or positions_per_key < 1:
            raise ValueError("SuffixIndex needs max_ngram >= 1 and positions_per_key >= 1.")
        self.max_ngram = max_ngram
        self.positions_per_key = positions_per_key
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], deque[int]] = {}

    def extend(self, tokens: list[int]) -> None:
        """Append tokens, indexing the n-grams that end at each."""
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                key = tuple(self.tokens[end - n + 1 : end + 1])
                positions = self.ends.get(key)
                if positions is None:
                    positions = self.ends[key] = deque(maxlen=self.positions_per_key)
                positions.append(end)

    def continuations(self, length: int, max_candidates: int) -> list[ContextCandidate]:
        """Up to `max_candidates` distinct continuations (at most `length` tokens) of the current suffix,
        longest match first, then most recent first."""
        found: list[ContextCandidate] = []
        seen: set[tuple[int, ...]] = set()
        end = len(self.tokens) - 1
        for n in range(min(self.max_ngram, end), 0, -1):
            for position in reversed(self.ends.get(tuple(self.tokens[end - n + 1 :]), ())):
                tokens = tuple(self.tokens[position + 1 : position + 1 + length])
                if position == end or not tokens or tokens in seen:
                    continue
                seen.add(tokens)
                found.append(ContextCandidate(tokens, n))
                if len(found) == max_candidates:
                    return found
        return found


@dataclass
class AcceptanceRates:
    """Per match length, how often a copied token was accepted (given the ones before it were), with a prior
    of `prior_rate` worth `prior_weight` tokens."""

    prior_rate: float = 0.4
    prior_weight: float = 4.0
    accepted: dict[int, float] = field(default_factory=dict)
    proposed: dict[int, float] = field(default_factory=dict)

    def rate(self, match_length: int) -> float:
        accepted = self.accepted.get(match_length, 0.0) + self.prior_rate * self.prior_weight
        return accepted / (self.proposed.get(match_length, 0.0) + self.prior_weight)

    def record(self, match_length: int, proposed: int, accepted: int) -> None:
        """A candidate whose first `proposed` tokens were verified and whose first `accepted` were accepted:
        accepted tokens are successes, and the first rejected one (if any) a failure."""
        trials = min(proposed, accepted + 1)
        self.accepted[match_length] = self.accepted.get(match_length, 0.0) + accepted
        self.proposed[match_length] = self.proposed.get(match_length, 0.0) + trials


class ContextDrafter:
    """Per call: the index of the sequence so far and this call's acceptance rates."""

    def __init__(
        self,
        max_ngram: int = 3,
        max_candidates: int = 2,
        max_length: int = 10,
        min_probability: float = 0.08,
    ) -> None:
        self.index = SuffixIndex(max_ngram)
        self.rates = AcceptanceRates()
        self.max_candidates = max_candidates
        self.max_length = max_length
        self.min_probability = min_probability
        self.proposed: list[ContextCandidate] = []

    def extend(self, tokens: list[int]) -> None:
        self.index.extend(tokens)

    def candidates(self, min_probability: float | None = None) -> list[ContextCandidate]:
        """This step's candidates, each cut where its estimated chance of acceptance drops below
        `min_probability` (default: the drafter's; the sequence so far ends with the root). They count as
        proposed unless `verified` says otherwise."""
        floor = self.min_probability if min_probability is None else min_probability
        chosen = []
        for candidate in self.index.continuations(self.max_length, self.max_candidates):
            rate, probability, probabilities = self.rates.rate(candidate.match_length), 1.0, []
            for _ in candidate.tokens:
                probability *= rate
                if probability < floor:
                    break
                probabilities.append(probability)
            if probabilities:
                kept = candidate.tokens[: len(probabilities)]
                chosen.append(ContextCandidate(kept, candidate.match_length, tuple(probabilities)))
        self.proposed = chosen
        return chosen

    def verified(self, lengths: list[int]) -> None:
        """How many leading tokens of each of this step's candidates the step verifies (a dynamic tree may
        leave some out): only those count as proposed."""
        self.proposed = [
            ContextCandidate(candidate.tokens[:length], candidate.match_length, candidate.probabilities[:length])
            for candidate, length in zip(self.proposed, lengths, strict=True)
            if length
        ]

    def record(self, accepted_tokens: list[int]) -> None:
        """Update the rates from the drafts accepted after this step's root."""
        for candidate in self.proposed:
            matched = 0
            while matched < min(len(candidate.tokens), len(accepted_tokens)) and (
                candidate.tokens[matched] == accepted_tokens[matched]
            ):
                matched += 1
            self.rates.record(candidate.match_length, len(candidate.tokens), matched)
