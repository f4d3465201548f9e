"""What speculative decoding supports, decided in one place, with the reason for every refusal.

Each `Limitation` names inputs that one or both speculative paths refuse (`speculative=True`, the tree loop;
`speculative="assisted"`, transformers' assisted loop with the heads as drafter), why, and what to do; the
checks below raise its `ValueError`, and the README's "Not supported yet" list is `limitations_markdown()`
(a test keeps the two equal). Everything not refused gives exactly plain `generate`'s tokens (greedy) or
plain sampling's distribution.

Position schemes are decided here too. RoPE with fixed frequencies needs nothing. A tree verified after
`past` tokens places its node at depth k at position `past + k`; three schemes constrain how deep a step may
go so that each accepted token sees what one-token decoding would have shown it (`PositionLimits`):
learned absolute positions end at the table's last row (GPT-2, OPT); transformers picks dynamic and longrope
RoPE frequencies from the LARGEST position in a forward, so a forward must not cross the original context
length, and past it dynamic RoPE (new frequencies at every length) allows one token per forward only.
ALiBi builds its biases from a 2D mask, which a tree cannot express: refused for the tree loop.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from transformers import DynamicCache, GenerationConfig, PretrainedConfig
from transformers.generation.configuration_utils import GenerationMode

from ._compat import attn_implementation
from .attention import PACKED_GQA_ATTENTION

TREE = "speculative=True"
ASSISTED = "speculative='assisted'"
BOTH = (TREE, ASSISTED)
# attention implementations that take the tree's 4D additive mask as transformers defines it
TREE_ATTENTION_IMPLEMENTATIONS = frozenset({"eager", "sdpa", PACKED_GQA_ATTENTION})
ALIBI_MODEL_TYPES = frozenset({"bloom", "mpt"})
SPECULATIVE_MODES = frozenset({GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE})
OTHER_DRAFTERS = ("prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


@dataclass(frozen=True)
class Limitation:
    """Inputs that `paths` refuse, with the reason and the remedy the error message gives."""

    what: str
    paths: tuple[str, ...]
    reason: str
    remedy: str

    def error(self, path: str, detail: str = "") -> ValueError:
        """The ValueError `path` raises for this limitation; `detail` names the offending value."""
        found = f" ({detail})" if detail else ""
        return ValueError(f"{path} does not support {self.what}{found}: {self.reason}. {self.remedy}.")

    def markdown(self) -> str:
        paths = "both paths" if self.paths == BOTH else f"`{self.paths[0]}`"
        return textwrap.fill(f"* {self.what} ({paths}): {self.reason}. {self.remedy}.", 110, subsequent_indent="  ")


LIMITATIONS: dict[str, Limitation] = {
    "batch": Limitation(
        "batches of more than one prompt", (ASSISTED,),
        "transformers' assisted loop accepts one path per step for one sequence",
        "Use speculative=True (its rows are verified together in one forward), or loop over the prompts",
    ),
    "batch_rope": Limitation(
        "batches of more than one prompt on a base with dynamic or longrope RoPE", (TREE,),
        "transformers picks those frequencies from the largest position in a forward, so one row's tokens "
        "would depend on the other rows' lengths", "Loop over the prompts",
    ),
    "batch_embeds": Limitation(
        "batches of more than one prompt given as `inputs_embeds`", (TREE,),
        "each row's drafts and stopping criteria read its token ids", "Pass input_ids, or loop over the prompts",
    ),
    "search": Limitation(
        "beam search, beam sampling, group or constrained beam search, contrastive search, DoLa and "
        "`num_return_sequences` > 1",
        BOTH,
        "speculation reproduces greedy search and sampling, one sequence per prompt",
        "Use speculative=False (contrastive search and DoLa: plain `generate` with their Hub "
        "`custom_generate` repos)",
    ),
    "drafters": Limitation(
        "a second drafter (`assistant_model`, `prompt_lookup_num_tokens`, `assistant_early_exit`, `use_mtp`)",
        BOTH, "the heads are the drafter", "Drop the option, or use speculative=False to draft with it alone",
    ),
    "outputs": Limitation(
        "`output_scores`, `output_logits`, `output_attentions` and `output_hidden_states`", (TREE,),
        "the tree loop does not collect per-token outputs", "Leave them off, or use speculative='assisted'",
    ),
    "processors": Limitation(
        "logits processors that are not row-wise (classifier-free guidance, watermarking, custom "
        "`logits_processor=` objects; the supported ones are `hf_hydra.processors.ROW_WISE_PROCESSORS`)",
        (TREE,),
        "every depth of the tree is processed as one batch of prefixes",
        "Remove the option that creates it, or use speculative='assisted'",
    ),
    "attention": Limitation(
        "attention implementations other than eager and sdpa (flash_attention_2 / _3, flex, paged)", (TREE,),
        "tree verification passes a 4D attention mask, which these kernels do not take",
        "Load the base with attn_implementation='sdpa', or use speculative='assisted'",
    ),
    "alibi": Limitation(
        "ALiBi position biases (Bloom, MPT, Falcon with alibi=True)", (TREE,),
        "the biases are built from a 2D mask, which cannot describe a tree", "Use speculative='assisted'",
    ),
    "cache_layers": Limitation(
        "sliding-window or linear-attention cache layers", (TREE,),
        "verification rewrites cache rows in place, which only full-attention layers allow",
        "Use speculative=False",
    ),
    "cache": Limitation(
        "a cache other than an empty `DynamicCache` (`cache_implementation=`, a filled cache)", BOTH,
        "rejected drafts are cropped from a dynamic cache, which starts empty",
        "Drop cache_implementation and the cache argument",
    ),
    "stateful_processors": Limitation(
        "logits processors that keep state or run the model (classifier-free guidance, watermarking, custom "
        "`logits_processor=` objects; the supported ones are `hf_hydra.processors.PER_PREFIX_PROCESSORS`)",
        (ASSISTED,),
        "transformers' assisted loop calls them again on the prefixes after a rejected draft",
        "Remove the option that creates it, or use speculative=False",
    ),
    "masked_prompt": Limitation(
        "masked prompt positions (padding, or a prompt token equal to `pad_token_id`)", (ASSISTED,),
        "transformers' assisted loop places the tokens after them at other positions than plain `generate`",
        "Use speculative=True, or pass attention_mask=torch.ones_like(input_ids) to attend to every token",
    ),
}


def limitations_markdown() -> str:
    """The README's "Not supported yet" list."""
    return "\n".join(limitation.markdown() for limitation in LIMITATIONS.values())


def refuse(key: str, path: str, detail: str = "") -> ValueError:
    return LIMITATIONS[key].error(path, detail)


def check_options(kwargs: dict, default_config: GenerationConfig, path: str) -> None:
    """Refuse, before `generate` builds anything, options it would build a cache or processor for that `path`
    cannot use. kwargs: the call's; default_config: the model's generation config."""
    if kwargs.get("assistant_model") is not None:
        raise refuse("drafters", path, "assistant_model")
    implementation = requested_option(kwargs, default_config, "cache_implementation")
    if implementation not in (None, "dynamic"):
        raise refuse("cache", path, f"cache_implementation={implementation!r}")
    if path == ASSISTED and requested_option(kwargs, default_config, "watermarking_config") is not None:
        raise refuse("stateful_processors", path, "watermarking_config")  # transformers could not even build it


def requested_option(kwargs: dict, default_config: GenerationConfig, name: str) -> object:
    """The value `generate` will use: the call's keyword, else its `generation_config`'s, else (generate fills
    unset fields from it) the model's."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    for config in (kwargs.get("generation_config"), default_config):
        if config is not None and getattr(config, name, None) is not None:
            return getattr(config, name)
    return None


def check_generation_request(generation_config: GenerationConfig, batch_size: int, path: str) -> None:
    """Refuse generation modes, drafters and caches that `path` does not reproduce exactly."""
    drafters = [name for name in OTHER_DRAFTERS if getattr(generation_config, name, None) not in (None, False)]
    if drafters:
        raise refuse("drafters", path, ", ".join(drafters))
    mode = generation_config.get_generation_mode()  # before the batch: generate expands the batch for beams
    if mode not in SPECULATIVE_MODES or (generation_config.num_return_sequences or 1) > 1:
        raise refuse("search", path, _mode_name(generation_config, mode))
    if batch_size != 1 and path == ASSISTED:
        raise refuse("batch", path, f"got {batch_size}")
    if generation_config.cache_implementation not in (None, "dynamic"):
        raise refuse("cache", path, f"cache_implementation={generation_config.cache_implementation!r}")


def _mode_name(generation_config: GenerationConfig, mode: GenerationMode) -> str:
    if mode in SPECULATIVE_MODES:
        return f"num_return_sequences={generation_config.num_return_sequences}"
    if generation_config.dola_layers is not None:
        return "dola_layers is set"
    return mode.value.replace("_", " ")


def check_cache(cache: object, path: str) -> None:
    """The cache `generate` prepared must be an empty DynamicCache."""
    if not isinstance(cache, DynamicCache):
        raise refuse("cache", path, type(cache).__name__)
    if cache.get_seq_length() != 0:
        raise refuse("cache", path, f"it already holds {cache.get_seq_length()} tokens")


def check_tree_base(config: PretrainedConfig) -> None:
    """Refuse bases whose attention or positions a tree forward cannot reproduce."""
    implementation = attn_implementation(config)
    if implementation not in TREE_ATTENTION_IMPLEMENTATIONS:
        raise refuse("attention", TREE, f"attn_implementation={implementation!r}")
    if uses_alibi(config):
        raise refuse("alibi", TREE, config.get_text_config().model_type)


def uses_alibi(config: PretrainedConfig) -> bool:
    text_config = config.get_text_config()
    attn_config = getattr(text_config, "attn_config", None)  # MPT keeps the switch there
    return bool(
        getattr(text_config, "alibi", False)
        or getattr(attn_config, "alibi", False)
        or (text_config.model_type in ALIBI_MODEL_TYPES and not hasattr(text_config, "alibi"))
    )


@dataclass(frozen=True)
class PositionLimits:
    """How deep a verification forward after `past` tokens may reach (see the module docstring).

    `table_size`: learned absolute positions 0..table_size-1. `rope_type` "dynamic" or "longrope" with its
    `original_length` (the length up to which the original frequencies apply)."""

    table_size: int | None = None
    rope_type: str | None = None
    original_length: int | None = None

    def max_depth(self, past: int) -> int | None:
        """The deepest node (root = depth 0, at position `past`) the next forward may hold; None: no limit."""
        depth = None
        if self.table_size is not None:
            depth = max(0, self.table_size - 1 - past)
        if self.rope_type is not None and (past < self.original_length or self.rope_type == "dynamic"):
            crossing = max(0, self.original_length - 1 - past)  # all positions on one side of the original length
            depth = crossing if depth is None else min(depth, crossing)
        return depth


def position_limits(config: PretrainedConfig) -> PositionLimits:
    """The position scheme of a base's config: RoPE (its type), ALiBi (no limit), else learned absolute
    positions as large as `max_position_embeddings` (GPT-2's `n_positions`)."""
    text_config = config.get_text_config()
    rope = getattr(text_config, "rope_parameters", None)
    if rope:
        return _rope_limits(rope, text_config.max_position_embeddings)
    size = getattr(text_config, "max_position_embeddings", None)
    if uses_alibi(config) or size is None:
        return PositionLimits()
    return PositionLimits(table_size=int(size))


def _rope_limits(rope: dict, max_position_embeddings: int) -> PositionLimits:
    """Per-layer-type RoPE (Gemma 3) is a dict of dicts; the strictest dynamic or longrope entry decides."""
    entries = rope.values() if "rope_type" not in rope else [rope]
    limits = PositionLimits()
    for entry in entries:
        rope_type = entry.get("rope_type", "default")
        if "dynamic" in rope_type:  # transformers recomputes frequencies above max_position_embeddings
            return PositionLimits(rope_type="dynamic", original_length=int(max_position_embeddings))
        if rope_type == "longrope":
            original_length = int(entry["original_max_position_embeddings"])
            limits = PositionLimits(rope_type="longrope", original_length=original_length)
    return limits
