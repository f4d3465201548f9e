"""The tree one decoding step verifies: the heads' candidates and the context's, merged into one trie, cut to
the depth the base's position scheme allows.

Sources (`sources=` of the tree loop): "heads" (the draft heads on the call's tree), "context" (continuations
copied from earlier in the sequence, `hf_hydra.context`), or "heads+context" (both, merged by prefix and
verified in one base forward). The heads' tree is static (the same rank paths every step, merged with the
context's paths) or dynamic (every candidate scored and the best ones kept, `hf_hydra.dynamic_tree`). Every
candidate is a deterministic function of the sequence so far, so greedy output stays plain greedy's and lossless
acceptance stays lossless whatever the sources.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .context import ContextDrafter
from .drafting import draft_tree
from .dynamic_tree import DynamicTreePolicy, ScoredNodes, add_context_paths, expand_heads
from .heads import DraftHeads
from .support import PositionLimits
from .tree import TreeBuffers, merge_token_paths, root_only

SOURCES = ("heads", "context", "heads+context")
DEFAULT_SOURCES = "heads+context"


def check_sources(sources: str, heads: DraftHeads | None) -> None:
    if sources not in SOURCES:
        raise ValueError(f"sources must be one of {SOURCES}; got {sources!r}.")
    if "heads" in sources and heads is None:
        raise ValueError(f"sources={sources!r} needs draft heads; use sources='context', or load heads.")


@dataclass(frozen=True)
class StepDraft:
    """A step's tree and its tokens; `from_context` marks the nodes only the context proposed."""

    tree: TreeBuffers
    tokens: torch.Tensor  # (T,) long, tokens[0] the root
    from_context: torch.Tensor | None  # (T,) bool, None without context candidates


class StepDrafter:
    """Drafts each step's tree from the sources of one call.

    tree: the heads' static tree, or the policy of a dynamic one (`hf_hydra.dynamic_tree`), ignored without
    heads; limits, position_offset: the base's position scheme and where cache row 0 sits
    (`hf_hydra.support`). Cut static trees are made once per depth."""

    def __init__(
        self,
        sources: str,
        heads: DraftHeads | None,
        tree: TreeBuffers | DynamicTreePolicy | None,
        embed_tokens: nn.Embedding,
        limits: PositionLimits,
        position_offset: int,
        device: torch.device,
    ) -> None:
        self.heads = heads if "heads" in sources else None
        self.policy = tree if isinstance(tree, DynamicTreePolicy) and self.heads is not None else None
        self.tree = tree.to(device) if self.heads is not None and self.policy is None else root_only(device)
        self.device = device
        self.context = ContextDrafter() if "context" in sources else None
        self.embed_tokens = embed_tokens
        self.limits = limits
        self.position_offset = position_offset
        self.cut: dict[int, TreeBuffers] = {}

    def draft(self, past: int, heads_context: torch.Tensor | None, root: torch.Tensor) -> StepDraft:
        """The tree after `past` cached tokens, below `root` (); heads_context: (d,) the heads' context vector."""
        depth = self.limits.max_depth(past + self.position_offset)
        if self.policy is not None:
            return self._draft_dynamic(depth, heads_context, root)
        tree = self._cut(self.tree, depth)
        if self.heads is not None:
            tokens = draft_tree(self.heads, tree, heads_context, root, self.embed_tokens).tokens
        else:
            tokens = root[None]
        if self.context is None:
            return StepDraft(tree, tokens, None)
        candidates = [candidate.tokens for candidate in self.context.candidates()]
        if not candidates:
            return StepDraft(tree, tokens, torch.zeros_like(tokens, dtype=torch.bool))
        merged, tokens, from_context = merge_token_paths(tree, tokens, candidates)
        if depth is not None and depth < merged.max_depth:
            merged = merged.truncated(depth)
            tokens, from_context = tokens[: merged.num_tokens], from_context[: merged.num_tokens]
        return StepDraft(merged, tokens, from_context)

    def _draft_dynamic(self, depth: int | None, heads_context: torch.Tensor, root: torch.Tensor) -> StepDraft:
        nodes = ScoredNodes(int(root))
        if self.context is not None:  # first: a likely context candidate makes the heads' tree worth more nodes
            candidates = self.context.candidates(self.policy.floor)
            paths = [candidate.tokens for candidate in candidates]
            path_nodes = add_context_paths(nodes, paths, [c.probabilities for c in candidates], depth)
        expand_heads(nodes, self.heads, self.policy, heads_context, self.embed_tokens, depth)
        chosen = nodes.best(self.policy)
        if self.context is not None:
            verified = set(chosen)
            self.context.verified([sum(node in verified for node in path) for path in path_nodes])
        tree, tokens, from_context = nodes.tree(chosen, self.device)
        return StepDraft(tree, tokens, from_context if self.context is not None else None)

    def _cut(self, tree: TreeBuffers, depth: int | None) -> TreeBuffers:
        if depth is None or depth >= tree.max_depth:
            return tree
        if depth not in self.cut:
            self.cut[depth] = tree.truncated(depth)
        return self.cut[depth]

    def observe(self, appended: list[int], accepted_drafts: list[int]) -> None:
        """Tokens appended to the sequence (the first call: the whole sequence), and the accepted drafts of the
        last step, for the context's index and acceptance rates."""
        if self.context is not None:
            self.context.record(accepted_drafts)
            self.context.extend(appended)
