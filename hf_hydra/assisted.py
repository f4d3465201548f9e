"""The heads as a chain drafter inside transformers' own assisted-decoding loop.

transformers has no public registry of candidate generators: `HydraForCausalLM._get_candidate_generator`
(private API) returns `HydraCandidateGenerator`, and `assisted_decoding` runs the private
`GenerationMixin._assisted_decoding` loop. Every use of those private names lives here and there.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.generation import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput

from .drafting import draft_tree, sample_chain
from .heads import DraftHeads
from .tree import build_tree_buffers, chain


class HydraCandidateGenerator(CandidateGenerator):
    """Drafts a chain of `num_candidates` tokens per step from the heads.

    Greedy (`do_sample=False`): the heads' top-1 tokens, and no logits (transformers compares tokens).
    Sampling: each draft is sampled from its head's distribution after `logits_processor` and those
    logits are returned, so transformers' own speculative sampling (`_speculative_sampling`: accept with
    min(1, p/q), else resample from norm(max(p - q, 0))) keeps the output distributed as plain sampling.

    It reads the verifier's own last hidden states (`requires_model_outputs`), so drafting costs no
    extra base forward. The first call returns no candidates so that the verifier's first call is the
    prefill.
    """

    requires_model_outputs = True
    model_kwargs_overrides = {"output_hidden_states": True}

    def __init__(
        self,
        heads: DraftHeads,
        embed_tokens: nn.Embedding,
        num_candidates: int | None = None,
        do_sample: bool = False,
        logits_processor: LogitsProcessorList | None = None,
        vocab_size: int | None = None,
    ) -> None:
        num_candidates = heads.num_heads if num_candidates is None else num_candidates
        if not 1 <= num_candidates <= heads.num_heads:
            raise ValueError(f"num_candidates must be in 1..{heads.num_heads} (one per head), got {num_candidates}.")
        if do_sample and vocab_size is None:
            raise ValueError("HydraCandidateGenerator needs vocab_size (the base's V) to sample drafts.")
        self.heads = heads
        self.embed_tokens = embed_tokens
        self.chain = build_tree_buffers(chain(num_candidates), heads.num_heads)
        self.do_sample = do_sample
        self.logits_processor = LogitsProcessorList() if logits_processor is None else logits_processor
        self.vocab_size = vocab_size
        self.context_cache: DynamicCache | None = heads.new_context_cache()
        self.num_verified = 0  # positions already passed through heads.encode_context

    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict | None = None,
        model_outputs: ModelOutput | None = None,
        is_first_iteration: bool = False,
        n_last_matches: int = 0,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        """input_ids (1, S) ends with the verifier's newest token, not yet verified -> (1, S + c), and with
        sampling the drafts' processed logits (1, c, V)."""
        if is_first_iteration:
            return input_ids, None
        if model_outputs is None or model_outputs.hidden_states is None:
            raise ValueError("HydraCandidateGenerator needs the verifier's hidden states (requires_model_outputs).")
        newly_verified = input_ids.shape[1] - 1 - self.num_verified
        hidden = model_outputs.hidden_states[-1][:, :newly_verified]  # (1, n, d): prefill or bonus + accepted
        positions = (self.num_verified + torch.arange(newly_verified, device=input_ids.device))[None]  # (1, n)
        context = self.heads.encode_context(hidden, positions, self.context_cache)[0, -1]  # (d,)
        self.num_verified += newly_verified
        if self.do_sample:
            length = self.chain.num_tokens - 1
            drafted = sample_chain(
                self.heads, length, context, input_ids, self.embed_tokens, self.logits_processor, self.vocab_size
            )
            return torch.cat([input_ids, drafted.tokens[None]], dim=1), drafted.logits[None]
        self.chain = self.chain.to(input_ids.device)
        draft = draft_tree(self.heads, self.chain, context, input_ids[0, -1], self.embed_tokens)
        return torch.cat([input_ids, draft.tokens[None, 1:]], dim=1), None

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        """The chain length is fixed by the heads; nothing to adapt."""


def assisted_decoding(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    streamer: BaseStreamer | None = None,
    **model_kwargs,
) -> torch.LongTensor | ModelOutput:
    """`custom_generate` callable: transformers' assisted loop, with the streamer `generate` drops for
    callables bound here (it gets the prompt first, as plain `generate` does)."""
    if streamer is not None:
        streamer.put(input_ids.cpu())
    return GenerationMixin._assisted_decoding(
        model, input_ids, logits_processor, stopping_criteria, generation_config, streamer=streamer, **model_kwargs
    )
