"""Acceptance rules: which path of a verified tree to keep, and the token after it (the bonus).

    greedy_accept    do_sample=False. Drafts must equal the base's argmax: output identical to greedy.
    lossless_accept  do_sample=True, acceptance="lossless" (default). Recursive rejection sampling over the
                     children of each node: output distributed exactly as plain sampling.
    typical_accept   do_sample=True, acceptance="typical". The Medusa / Hydra papers' typical acceptance:
                     accepts more, but is NOT distribution-preserving.

Every rule reads the base model's view of each node after generate's logits processors (temperature,
top-k, top-p, min-p, repetition penalty, ...) were applied to it with that node's own prefix
(`hf_hydra.processors.node_scores`): `scores` for greedy, `probs = softmax(scores)` for sampling.

`ACCEPTANCE_RULES` (at the end) is the one table of rules by name: the config and generate's `acceptance=`
are validated against its names, decoding applies a rule by looking it up, and the assisted loop asks it
whether a rule is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .tree import TreeBuffers

GREEDY, LOSSLESS, TYPICAL = "greedy", "lossless", "typical"  # the names of the rules in ACCEPTANCE_RULES
DEFAULT_SAMPLING_RULE = LOSSLESS  # of a call with do_sample=True that names no rule
LEGACY_ACCEPTANCE = {GREEDY: LOSSLESS}  # the only value saved before sampling existed
DEFAULT_POSTERIOR_THRESHOLD = 0.09  # eps of typical acceptance (Medusa / Hydra defaults)
DEFAULT_POSTERIOR_ALPHA = 0.3  # delta of typical acceptance


@dataclass(frozen=True)
class Acceptance:
    """The accepted path and the token the base model itself chose after it."""

    nodes: torch.Tensor  # (a,) node indices from the root down, a = 1 + number of accepted drafts
    bonus_token: torch.Tensor  # () long, the base's next token after the last accepted node


@dataclass(frozen=True)
class AcceptanceRule:
    """How one generate call accepts drafts: a rule of `ACCEPTANCE_RULES` by name ("greedy" for
    do_sample=False, "lossless" or "typical") and its options."""

    name: str
    posterior_threshold: float = DEFAULT_POSTERIOR_THRESHOLD  # eps, typical only
    posterior_alpha: float = DEFAULT_POSTERIOR_ALPHA  # delta, typical only

    @property
    def samples(self) -> bool:
        """Whether the rule draws tokens (do_sample=True) rather than taking the argmax."""
        return ACCEPTANCE_RULES[self.name].samples

    def first_token(self, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The token after the prompt from its processed scores (V,): argmax, or a sample as plain sampling
        draws."""
        return sample_token(scores.softmax(dim=-1), generator) if self.samples else scores.argmax()

    def accept(
        self, tokens: torch.Tensor, scores: torch.Tensor, tree: TreeBuffers, generator: torch.Generator | None
    ) -> Acceptance:
        """The rule applied to a verified tree: tokens (T,), scores (T, V) the base's processed scores at each
        node (a sampling rule reads probs = softmax(scores), float32 as plain sampling computes them)."""
        spec = ACCEPTANCE_RULES[self.name]
        return spec.accept(tokens, scores.softmax(dim=-1) if spec.samples else scores, tree, self, generator)


def sampling_rule_name(acceptance: str | None) -> str:
    """The sampling rule `acceptance` names (None: the default, "lossless"; a legacy value: its rule); a
    ValueError for a name that is no sampling rule."""
    name = DEFAULT_SAMPLING_RULE if acceptance is None else LEGACY_ACCEPTANCE.get(acceptance, acceptance)
    if name not in SAMPLING_RULES:
        raise ValueError(f"acceptance={name!r} is not one of {SAMPLING_RULES}.")
    return name


def acceptance_rule(
    do_sample: bool,
    acceptance: str | None = None,
    posterior_threshold: float | None = None,
    posterior_alpha: float | None = None,
) -> AcceptanceRule:
    """The rule of a call. Greedy decoding is always exact (typical acceptance at temperature 0 is greedy
    too); with sampling, `acceptance` picks a sampling rule (None means lossless)."""
    acceptance = sampling_rule_name(acceptance)
    eps = DEFAULT_POSTERIOR_THRESHOLD if posterior_threshold is None else float(posterior_threshold)
    delta = DEFAULT_POSTERIOR_ALPHA if posterior_alpha is None else float(posterior_alpha)
    if not ACCEPTANCE_RULES[acceptance].posterior and (posterior_threshold is not None or posterior_alpha is not None):
        raise ValueError("posterior_threshold / posterior_alpha belong to acceptance='typical'; pass that too.")
    if not 0.0 <= eps <= 1.0 or not delta >= 0.0:
        raise ValueError(
            f"typical acceptance needs 0 <= posterior_threshold <= 1 and posterior_alpha >= 0; got {eps}, {delta}."
        )
    if not do_sample:
        return AcceptanceRule(GREEDY)
    return AcceptanceRule(acceptance, eps, delta)


# ------------------------------------------------------------------------------------------------------
# Greedy


def greedy_accept(tokens: torch.Tensor, logits: torch.Tensor, tree: TreeBuffers) -> Acceptance:
    """Longest path whose drafts all equal the base model's argmax.

    With y_a = argmax logits[a] the base's greedy choice after node a, and a path r = n_0 .. n_D
    (n_0 the root), the accepted length is
        L(r) = max { j : tokens[n_i] == y_{n_{i-1}} for all 1 <= i <= j },
    the kept path is argmax_r L(r) (first on ties), and the bonus token is y at its last node. Every
    kept token is what greedy decoding would have produced, so the output is unchanged.

    tokens: (T,) drafted tree; logits: (T, V) the base's logits (or processed scores) at each node.
    """
    predicted = row_argmax(logits)  # (T,)
    accepted = _leading_accepted(tokens[tree.leaf_paths[:, 1:]] == predicted[tree.leaf_paths[:, :-1]], tree)  # (P,)
    best, length = torch.stack((accepted.argmax(), accepted.max())).tolist()  # one host synchronisation
    nodes = tree.leaf_paths[best, : length + 1]
    return Acceptance(nodes=nodes, bonus_token=predicted[nodes[-1]])


ARGMAX_BLOCK = 128  # entries of a row reduced at once by `row_argmax`


def row_argmax(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(dim=-1)` of (T, V) scores, bit for bit (the first maximal index; NaN counts as the largest).

    On a CPU, torch's argmax does not vectorise (~80 us per 49k-entry row, most of a greedy acceptance) while its
    max reduction does: each row's maxima per block of `ARGMAX_BLOCK` entries come first, then the argmax over
    them finds the first block that holds the row's first maximum, and the argmax inside that block the entry.
    Entries past the last whole block are compared last, so an earlier index keeps winning ties."""
    rows, width = scores.shape
    blocks = width // ARGMAX_BLOCK
    if scores.device.type != "cpu" or rows < 2 or blocks < 2:
        return scores.argmax(dim=-1)
    blocked = scores[:, : blocks * ARGMAX_BLOCK].view(rows, blocks, ARGMAX_BLOCK)  # (T, blocks, block)
    block = blocked.amax(dim=-1).argmax(dim=-1)  # (T,)
    row = torch.arange(rows, device=scores.device)
    index = block * ARGMAX_BLOCK + blocked[row, block].argmax(dim=-1)  # (T,)
    if blocks * ARGMAX_BLOCK == width:
        return index
    tail = blocks * ARGMAX_BLOCK + scores[:, blocks * ARGMAX_BLOCK :].argmax(dim=-1)  # (T,)
    pair = torch.stack((index, tail), dim=1)  # (T, 2)
    return pair[row, scores.gather(1, pair).argmax(dim=-1)]


def _leading_accepted(ok: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
    """ok: (P, D) whether the i-th draft of each leaf path passes -> (P,) the number of leading passes."""
    depth_index = torch.arange(ok.shape[1], device=ok.device)  # (D,)
    in_path = depth_index[None] < (tree.leaf_path_lengths - 1)[:, None]  # (P, D)
    return (ok & in_path).long().cumprod(dim=1).sum(dim=1)


# ------------------------------------------------------------------------------------------------------
# Lossless: recursive rejection sampling over each node's children (SpecInfer; EAGLE's tree sampling)
#
# At node a, with p_a the base's (processed) distribution after a's prefix and c_1 .. c_m its children in
# rank order:
#     r_1 = p_a
#     for i = 1 .. m:   accept c_i with probability r_i(c_i)                     (then descend into c_i)
#                       else r_{i+1} = norm(r_i with c_i zeroed)                 (`rejection_residual`)
#     none accepted:    the bonus token is sampled from r_{m+1}
# Lossless: r_i is p_a restricted to V \ {c_1 .. c_{i-1}} over R_i = 1 - sum_{j<i} p_a(c_j), trial i is
# reached with probability prod_{j<i} (1 - p_a(c_j) / R_j) = prod_{j<i} R_{j+1} / R_j = R_i, so
#     P(c_i is accepted)       = R_i * p_a(c_i) / R_i         = p_a(c_i)
#     P(bonus = x), x no child = R_{m+1} * p_a(x) / R_{m+1}   = p_a(x).
# The next token is therefore distributed exactly as p_a; an accepted child's node holds the base's
# distribution given that token, so by induction over the depth every appended token is sampled from
# the base model given everything before it, as in plain sampling.
#
# Proposal distributions. The standard rule accepts a candidate x drawn from a proposal q with probability
# min(1, p(x) / q(x)) and resamples from norm(max(p - q, 0)). Our children are the heads' top-k, a
# deterministic function of the prefix, so the proposal of each child is the point mass q = delta_c:
# min(1, p(c) / 1) = p(c) and norm(max(p - delta_c, 0)) = norm(p with c zeroed), the rule above (EAGLE's
# tree sampling sets q(x) = 1 for the same reason). Plugging in the heads' softmax as q would be biased:
# with p = (0.5, 0.5) and a head q = (0.9, 0.1) whose top-1 child is always token 0, min(1, p/q) keeps
# token 0 with probability 0.56, not 0.5. The heads' probabilities decide which tokens become children
# (and so the acceptance rate), not the acceptance test.


def rejection_residual(probs: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """r <- norm(r with the rejected token zeroed), per row. probs: (n, V); rejected: (n,) token ids.
    Rows whose remaining mass is 0 (the rejected token had probability 1, so it cannot have been
    rejected) are returned unchanged, never as NaN."""
    zeroed = probs.scatter(1, rejected[:, None], 0.0)  # (n, V)
    mass = zeroed.sum(dim=1, keepdim=True)  # (n, 1)
    return torch.where(mass > 0, zeroed / mass.clamp_min(torch.finfo(probs.dtype).tiny), probs)


def sample_token(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token from the distribution `probs` (V,) (any non-negative weights): the first index whose
    cumulative weight exceeds u * total, u ~ U[0, 1). Exact, and on CPUs far cheaper than
    `torch.multinomial` for a large vocabulary. Tokens of weight 0 own an empty interval: never drawn."""
    cumulative = probs.double().cumsum(dim=0)  # (V,) in float64: no rounding of u * total up to total
    u = torch.rand((1,), generator=generator, device=probs.device, dtype=torch.float64)
    index = torch.searchsorted(cumulative, u * cumulative[-1], right=True)  # (1,)
    return index.clamp_max(probs.shape[0] - 1)[0]


def child_slots(tree: TreeBuffers) -> torch.Tensor:
    """(T, K) the children of every node in rank order, padded with -1; K = the most children of a node
    (1 for the root alone). Nodes are numbered in (depth, path) order, so siblings are contiguous and sorted
    by rank."""
    parents = tree.parents[1:]  # (N,) non-decreasing
    nodes = torch.arange(1, tree.num_tokens, device=parents.device)  # (N,)
    slot = nodes - 1 - torch.searchsorted(parents, parents)  # (N,) rank order among siblings
    width = int(slot.max()) + 1 if slot.numel() else 1
    slots = torch.full((tree.num_tokens, width), -1, dtype=torch.long, device=parents.device)
    slots[parents, slot] = nodes
    return slots


def lossless_accept(
    tokens: torch.Tensor, probs: torch.Tensor, tree: TreeBuffers, generator: torch.Generator | None = None
) -> Acceptance:
    """Recursive rejection sampling (see the derivation above), every node at once.

    tokens: (T,) drafted tree; probs: (T, V) the base's processed next-token distribution at each node.

    The trials only read r_i at the children's tokens, and zeroing a child only changes children's entries
    and the normaliser, so they run on each node's distribution lumped into K + 1 cells: its children's
    tokens (in slot order, 0 for a token an earlier sibling already has) and "any other token". One
    uniform per (node, slot) is drawn for the whole tree; only the walked path's are used, and unvisited
    nodes' draws are independent of it, so this equals the node-by-node procedure. The bonus is drawn from
    the full residual of the last node.
    """
    slots = child_slots(tree)  # (T, K)
    has_child = slots >= 0  # (T, K)
    child_tokens = tokens[slots.clamp_min(0)]  # (T, K)
    earlier = torch.ones(slots.shape[1], slots.shape[1], dtype=torch.bool, device=slots.device).tril(-1)  # j < k
    repeated = ((child_tokens[:, :, None] == child_tokens[:, None, :]) & earlier).any(dim=2)  # (T, K)
    child_probs = torch.where(has_child & ~repeated, probs.gather(1, child_tokens), 0.0)  # (T, K): p_a(c_k)
    other = (1.0 - child_probs.sum(dim=1, keepdim=True)).clamp_min(0.0)  # (T, 1)
    lumped = torch.cat([child_probs, other], dim=1)  # (T, K + 1): r_1 over the lumped cells
    accept_prob = torch.zeros_like(child_probs)  # (T, K): r_k(c_k)
    for k in range(slots.shape[1]):  # the k-th trial of every node at once (K: the most children of a node)
        accept_prob[:, k] = lumped[:, k]
        rejected = torch.full_like(slots[:, k], k)
        lumped = torch.where(has_child[:, k, None], rejection_residual(lumped, rejected), lumped)
    uniforms = torch.rand(slots.shape, generator=generator, device=probs.device, dtype=probs.dtype)  # (T, K)
    accepted = (uniforms < accept_prob) & has_child  # (T, K)
    first = accepted.long().argmax(dim=1)  # (T,) first accepted slot (0 when none)
    next_node = torch.where(accepted.any(dim=1), slots.gather(1, first[:, None]).squeeze(1), -1).tolist()
    path = [0]
    while next_node[path[-1]] >= 0:
        path.append(next_node[path[-1]])
    residual = probs[path[-1]][None]  # (1, V): every child of the last node was rejected (or it has none)
    for child in slots[path[-1]][has_child[path[-1]]]:
        residual = rejection_residual(residual, tokens[child][None])
    return Acceptance(nodes=torch.tensor(path, device=tokens.device), bonus_token=sample_token(residual[0], generator))


# ------------------------------------------------------------------------------------------------------
# Typical acceptance (Medusa / Hydra; not distribution-preserving)


def typical_accept(
    tokens: torch.Tensor,
    probs: torch.Tensor,
    tree: TreeBuffers,
    posterior_threshold: float = DEFAULT_POSTERIOR_THRESHOLD,
    posterior_alpha: float = DEFAULT_POSTERIOR_ALPHA,
    generator: torch.Generator | None = None,
) -> Acceptance:
    """Typical acceptance of the Medusa and Hydra papers: faster than lossless sampling, but the output
    is NOT distributed as plain sampling (a draft above a probability threshold is kept as drafted, so the
    heads' top-k choices are over-represented).

    With p_b the base's processed distribution after node b, H(p) = -sum_x p(x) log p(x), eps =
    posterior_threshold and delta = posterior_alpha, a node a with parent b passes when
        p_b(tokens[a]) > min(eps, delta * exp(-H(p_b))),
    L(r) counts the leading passing drafts of leaf path r, the kept path has the largest L (ties: the
    largest sum_{i <= L} log p_{n_{i-1}}(tokens[n_i]), then the first), and the bonus token is sampled from
    p at its last node. As the temperature goes to 0, p becomes a point mass on the argmax: the threshold
    becomes eps, only argmax drafts pass and the bonus is the argmax, i.e. greedy decoding.

    tokens: (T,) drafted tree; probs: (T, V) the base's processed next-token distribution at each node.
    """
    internal = tree.parents[1:].unique()  # the nodes with children: only their thresholds are read
    entropy = torch.zeros(tree.num_tokens, dtype=probs.dtype, device=probs.device)
    entropy[internal] = torch.special.entr(probs[internal]).sum(dim=-1)  # (T,), H(p_b)
    threshold = torch.clamp(posterior_alpha * torch.exp(-entropy), max=posterior_threshold)  # (T,)
    parents = tree.leaf_paths[:, :-1]  # (P, D)
    children = tree.leaf_paths[:, 1:]  # (P, D)
    candidate_probs = probs[parents, tokens[children]]  # (P, D): p_parent(child token)
    accepted = _leading_accepted(candidate_probs > threshold[parents], tree)  # (P,)
    depth_index = torch.arange(children.shape[1], device=tokens.device)  # (D,)
    kept = depth_index[None] < accepted[:, None]  # (P, D)
    log_likelihood = torch.where(kept, candidate_probs.clamp_min(1e-30).log(), 0.0).sum(dim=1)  # (P,)
    longest = accepted == accepted.max()
    best = int(torch.where(longest, log_likelihood, -torch.inf).argmax())
    nodes = tree.leaf_paths[best, : int(accepted[best]) + 1]
    return Acceptance(nodes=nodes, bonus_token=sample_token(probs[nodes[-1]], generator))


# ------------------------------------------------------------------------------------------------------
# The rules by name


@dataclass(frozen=True)
class RuleSpec:
    """One acceptance rule: how it keeps a path of a verified tree, and what it reads and guarantees."""

    # (tokens (T,), scores (T, V) or probs (T, V), tree, the call's rule and its options, generator) -> Acceptance
    accept: Callable[[torch.Tensor, torch.Tensor, TreeBuffers, AcceptanceRule, torch.Generator | None], Acceptance]
    samples: bool  # a rule for do_sample=True: reads probs = softmax(scores) and draws; else reads the scores
    exact: bool  # output distributed as plain `generate`'s (greedy: the same tokens); typical acceptance is not
    posterior: bool  # takes posterior_threshold (eps) and posterior_alpha (delta)


ACCEPTANCE_RULES: dict[str, RuleSpec] = {
    GREEDY: RuleSpec(
        lambda tokens, scores, tree, rule, generator: greedy_accept(tokens, scores, tree),
        samples=False, exact=True, posterior=False,
    ),
    LOSSLESS: RuleSpec(
        lambda tokens, probs, tree, rule, generator: lossless_accept(tokens, probs, tree, generator),
        samples=True, exact=True, posterior=False,
    ),
    TYPICAL: RuleSpec(
        lambda tokens, probs, tree, rule, generator: typical_accept(
            tokens, probs, tree, rule.posterior_threshold, rule.posterior_alpha, generator
        ),
        samples=True, exact=False, posterior=True,
    ),
}  # fmt: skip
SAMPLING_RULES = tuple(name for name, spec in ACCEPTANCE_RULES.items() if spec.samples)  # generate's `acceptance=`
