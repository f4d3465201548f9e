"""The heads as a chain drafter inside transformers' own assisted-decoding loop.

transformers has no public registry of candidate generators: `HydraForCausalLM._get_candidate_generator`
(an override of a private hook) returns `HydraCandidateGenerator`, and `assisted_decoding` runs the private
`GenerationMixin._assisted_decoding` loop through `hf_hydra._compat.run_assisted_decoding`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.generation import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput

from . import support
from ._compat import run_assisted_decoding
from .cache_name import CACHE_NAME
from .drafting import draft_tree, sample_chain
from .growing_cache import grow_in_place
from .heads import DraftHeads
from .processors import check_processors_supported
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
        position_limits: support.PositionLimits | None = None,
    ) -> None:
        num_candidates = heads.num_heads if num_candidates is None else num_candidates
        if not 1 <= num_candidates <= heads.num_heads:
            raise ValueError(f"num_candidates must be in 1..{heads.num_heads} (one per head), got {num_candidates}.")
        if do_sample and vocab_size is None:
            raise ValueError("HydraCandidateGenerator needs vocab_size (the base's V) to sample drafts.")
        self.heads = heads
        self.embed_tokens = embed_tokens
        self.chain = build_tree_buffers(chain(num_candidates), heads.num_heads)
        self.position_limits = support.PositionLimits() if position_limits is None else position_limits
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
        hidden = model_outputs.hidden_states[-1]  # (1, forward length, d)
        # the prefill's positions (a prompt of ids or of embeddings), or the last root + its accepted drafts
        newly_verified = hidden.shape[1] if self.num_verified == 0 else n_last_matches + 1
        positions = (self.num_verified + torch.arange(newly_verified, device=input_ids.device))[None]  # (1, n)
        context = self.heads.encode_context(hidden[:, :newly_verified], positions, self.context_cache)[0, -1]  # (d,)
        self.num_verified += newly_verified
        length = self.chain.num_tokens - 1
        allowed = self.position_limits.max_depth(self.num_verified)  # the root sits at position num_verified
        length = length if allowed is None else min(length, allowed)
        if length == 0:
            return input_ids, None
        if self.do_sample:
            drafted = sample_chain(
                self.heads, length, context, input_ids, self.embed_tokens, self.logits_processor, self.vocab_size
            )
            return torch.cat([input_ids, drafted.tokens[None]], dim=1), drafted.logits[None]
        self.chain = self.chain.to(input_ids.device)
        draft = draft_tree(self.heads, self.chain.truncated(length), context, input_ids[0, -1], self.embed_tokens)
        return torch.cat([input_ids, draft.tokens[None, 1:]], dim=1), None

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        """The chain length is fixed by the heads; nothing to adapt."""


class StopInsideChunk(StoppingCriteria):
    """Stopping criteria asked after every token, as plain decoding asks them.

    transformers' assisted loop appends a whole accepted chunk and then asks the criteria about the sequence
    (only its EOS and max-length cuts look inside the chunk), so a stop string or a custom criterion met in
    the middle of a chunk would be run past. This criterion asks `criteria` about every prefix of each new
    chunk, records the length at the first stop (`stop_length`) and streams the tokens up to it: the loop
    itself gets no streamer, which would receive the tokens past the stop.
    """

    def __init__(self, criteria: StoppingCriteriaList, prompt_length: int, streamer: BaseStreamer | None) -> None:
        self.criteria = criteria
        self.checked_length = prompt_length
        self.streamer = streamer
        self.stop_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor | None, **kwargs) -> torch.BoolTensor:
        for length in range(self.checked_length + 1, input_ids.shape[1] + 1):
            if bool(self.criteria(input_ids[:, :length], scores, **kwargs).any()):
                self.stop_length = length
                break
        end = input_ids.shape[1] if self.stop_length is None else self.stop_length
        if self.streamer is not None:
            self.streamer.put(input_ids[0, self.checked_length : end].cpu())
        self.checked_length = input_ids.shape[1]
        return torch.full((input_ids.shape[0],), self.stop_length is not None, device=input_ids.device)


def assisted_decoding(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    streamer: BaseStreamer | None = None,
    **model_kwargs,
) -> torch.LongTensor | ModelOutput:
    """`custom_generate` callable: transformers' assisted loop, with stopping checked after every token
    (`StopInsideChunk`) and the streamer `generate` drops for callables bound here (it gets the prompt first,
    as plain `generate` does). Refuses what the loop would not reproduce (`hf_hydra.support`)."""
    support.check_generation_request(generation_config, input_ids.shape[0], support.ASSISTED)
    check_processors_supported(logits_processor, support.ASSISTED)
    cache = model_kwargs.get(CACHE_NAME)
    support.check_cache(cache, support.ASSISTED)
    grow_in_place(cache)  # the loop appends a few entries per step: no copy of the whole cache each time
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise support.refuse("masked_prompt", support.ASSISTED)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    stop = StopInsideChunk(stopping_criteria, input_ids.shape[1], streamer)
    output = run_assisted_decoding(
        model, input_ids, logits_processor, StoppingCriteriaList([stop]), generation_config, **model_kwargs
    )
    if streamer is not None:
        streamer.end()
    return output if stop.stop_length is None else _cut(output, stop.stop_length, input_ids.shape[1], cache)


def _cut(
    output: torch.LongTensor | ModelOutput, length: int, prompt_length: int, cache: DynamicCache
) -> torch.LongTensor | ModelOutput:
    """The output of a run stopped at sequence length `length`: the tokens after it, their per-token outputs
    and their cache entries dropped (the cache keeps every token but the last, as after plain decoding)."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    if sequences.shape[1] == length:
        return output
    cache.crop(length - sequences.shape[1])
    if isinstance(output, torch.Tensor):
        return output[:, :length]
    output.sequences = sequences[:, :length]
    for name in ("scores", "logits", "attentions", "hidden_states"):
        per_token = getattr(output, name, None)
        if per_token is not None:
            setattr(output, name, per_token[: length - prompt_length])
    return output
