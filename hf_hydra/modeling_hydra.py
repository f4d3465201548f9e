"""HydraForCausalLM: a frozen Hugging Face causal LM plus trainable draft heads.

Loading is explicit first, as in PEFT: `HydraForCausalLM.from_pretrained(heads, base_model=base)`;
without `base_model` the base named in the heads' config is loaded. Saving writes the heads only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.generation import StoppingCriteriaList, StopStringCriteria
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput, cached_file

from . import assets, hub, model_card, reference_checkpoints
from ._compat import cached_file_or_none, keep_hydra_generation_fields
from .acceptance import ACCEPTANCE_RULES, LEGACY_ACCEPTANCE, LOSSLESS
from .assisted import HydraCandidateGenerator, assisted_decoding
from .attention import use_packed_gqa_attention
from .cache_name import CACHE_NAME, CACHE_NAMES, cache_argument, output_cache
from .configuration_hydra import DRAFT_VOCAB_PROJECTIONS, HydraConfig
from .decoding import tree_speculative_generate
from .dynamic_tree import DynamicTreePolicy, HeadCalibration, shared_verify_cost
from .growing_cache import growing_cache
from .head_archs import DEFAULT_HEAD_ARCH
from .heads import DraftHeads, build_heads
from .prepack import (
    DEFAULT_BATCH_SIZE_HINT,
    PrepackReport,
    bfloat16_supported,
    packable_on_cpu,
    prepack_linear_layers,
)
from .roofline import linear_weight_bytes, machine_forward_seconds, machine_identity
from .step_drafts import DEFAULT_SOURCES
from .support import ASSISTED, TREE, check_options, position_limits
from .tree import DYNAMIC_TREE, TreeBuffers, TreeSpec, build_tree_buffers, choose_tree, resolve_tree, static_default

logger = logging.getLogger(__name__)
# generate() options only the tree loop takes: a call that passes one speculates, whatever the machine
TREE_ONLY_OPTIONS = frozenset({"acceptance", "posterior_threshold", "posterior_alpha", "generator", "sources"})

HEADS_WEIGHTS_NAME = "model.safetensors"
_HUB_KWARGS = ("revision", "token", "cache_dir", "force_download", "local_files_only", "subfolder")


@dataclass
class HydraOutput(CausalLMOutputWithPast):
    """The base model's causal-LM output plus what head training needs."""

    last_hidden_state: torch.Tensor | None = None  # (B, T, d) base post-norm last hidden states
    head_logits: torch.Tensor | None = None  # (B, H, T, V or K): head i at t predicts token t + i + 2


class HydraForCausalLM(PreTrainedModel, GenerationMixin):
    """Draft heads (`self.heads`) on a frozen base causal LM (`self.base_lm`).

    Create fresh heads with `from_base`, load saved ones with `from_pretrained`, decode faster with
    `generate(..., speculative=True)` (greedy output identical to plain `generate`).
    """

    config_class = HydraConfig
    _supports_sdpa = True

    def __init__(
        self, config: HydraConfig, base_model: PreTrainedModel, draft_token_ids: torch.Tensor | None = None
    ) -> None:
        check_base_compatible(config, base_model)
        super().__init__(config)
        head_weights = base_model.get_output_embeddings().weight  # the heads read the base's last hidden states
        self.heads: DraftHeads = build_heads(config, base_model, draft_token_ids).to(
            device=head_weights.device, dtype=base_model.dtype
        )
        self.post_init()
        # Attached after post_init, and not named `base_model` (a PreTrainedModel property).
        self.base_lm = base_model
        self.base_lm.requires_grad_(False)
        # The policy of `tree="dynamic"`: the heads' calibration and the verification curve of `tune-tree`.
        self.dynamic_tree: DynamicTreePolicy | None = None
        self.tree_tuning: LoadedTuning | None = None  # the heads' tree_tuning.json as loaded (saved with them)
        self.base_prepack: PrepackReport | None = None  # what prepack_base packed, None while the base is stock
        # why no tree pays on this machine (then default speculative calls decode plainly), None where one does
        self.plain_is_faster: str | None = None
        self._fitted: tuple[list[list[float]], list[float]] | None = None  # rank accuracy, this machine's curve
        self._said_plain: set[str] = set()
        use_packed_gqa_attention(base_model)  # sdpa without copying the KV cache in tree verification (exact)
        # One GenerationConfig object for the wrapper and the base: every mode reads the same defaults.
        self.generation_config = base_model.generation_config = speculative_generation_config(
            base_model.generation_config, config
        )

    def train(self, mode: bool = True) -> HydraForCausalLM:
        """Only the heads train: the frozen base stays in eval mode (no dropout in its outputs)."""
        super().train(mode)
        self.base_lm.eval()
        return self

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Heads initialise themselves (identity blocks, projections copied from the base lm_head)."""

    # ----------------------------------------------------------------------------------------------
    # Construction, loading, saving

    @classmethod
    def from_base(
        cls,
        base_model: PreTrainedModel,
        head_arch: str = DEFAULT_HEAD_ARCH,
        num_heads: int = 4,
        draft_token_ids: torch.Tensor | None = None,
        **config_kwargs,
    ) -> HydraForCausalLM:
        """Fresh (untrained) heads on an already loaded base model, in eval mode (call `.train()` to train)."""
        if config_kwargs.get("vocab_projection") in DRAFT_VOCAB_PROJECTIONS and draft_token_ids is None:
            raise ValueError(
                f"vocab_projection={config_kwargs['vocab_projection']!r} needs draft_token_ids: the K most "
                "frequent target token ids of your training data, as a 1-D tensor."
            )
        if draft_token_ids is not None:
            config_kwargs.setdefault("draft_vocab_size", int(torch.as_tensor(draft_token_ids).numel()))
        text_config = base_model.config.get_text_config()
        config = HydraConfig(
            base_model_name_or_path=config_kwargs.pop(
                "base_model_name_or_path", assets.portable_model_id(base_model.name_or_path)
            ),
            base_model_revision=_base_revision(base_model, config_kwargs.pop("base_model_revision", None)),
            base_tokenizer_fingerprint=config_kwargs.pop("base_tokenizer_fingerprint", None)
            or hub.base_tokenizer_fingerprint(base_model),
            base_hidden_size=text_config.hidden_size,
            base_vocab_size=base_model.get_output_embeddings().weight.shape[0],
            head_arch=head_arch,
            num_heads=num_heads,
            **config_kwargs,
        )
        return cls(config, base_model, draft_token_ids).eval()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        base_model: PreTrainedModel | None = None,
        config: HydraConfig | None = None,
        prepack: bool | None = None,
        **kwargs,
    ) -> HydraForCausalLM:
        """Load heads from a folder or Hub repo; the base comes from `base_model` or from the config.

        prepack: pack the base's linear layers for fast CPU inference (`prepack_base`). None (the default): yes
        when this call loads the base itself onto the CPU in float32; a `base_model` you pass stays as it is.
        False keeps torch's own layers (a packed base cannot train, move device or change dtype); True packs
        a `base_model` you pass too, and is a ValueError where the base cannot be packed.

        Hub options (`revision`, `token`, `cache_dir`, `local_files_only`, ...) apply to the heads (`token`,
        `cache_dir` and `local_files_only` to the base too); other keyword arguments (e.g. `dtype`, `device_map`)
        go to the base model's `from_pretrained`. Also loads the heads published with the Hydra and Medusa papers
        (their own layouts, see `reference_checkpoints.py`); `hf-hydra convert` saves them in ours. A Medusa-1.0 /
        Medusa-2 repo (heads inside a full model) is its own base: all Hub options apply to the base too. Reference
        heads default to the references' tree (`mc_sim_7b_63`) where the base sits on an accelerator and to the
        CPU tree where it sits on the CPU, chosen from the base's device here (a converted artifact keeps it).
        """
        if model_args:
            raise TypeError("HydraForCausalLM.from_pretrained takes no extra positional arguments.")
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        source = str(pretrained_model_name_or_path)
        reference = reference_checkpoints.read_reference_checkpoint(source, hub_kwargs) if config is None else None
        if config is None:
            config = reference.config if reference is not None else HydraConfig.from_pretrained(source, **hub_kwargs)
        loads_base = base_model is None
        if loads_base:
            same_repo = reference is not None and reference.base_in_checkpoint
            base_model = _load_base(config, hub_kwargs, same_repo=same_repo, **kwargs)
        else:
            hub.warn_if_base_differs(config, base_model)
        if prepack is None:
            prepack = loads_base and packable_on_cpu(base_model)
        if reference is not None:
            model = cls(reference_checkpoints.config_for_base(reference, base_model), base_model)
            reference_checkpoints.load_reference_weights(model, reference)
            return model._loaded(prepack)
        weights = _load_heads_state(source, hub_kwargs)
        model = cls(config, base_model, weights.get("heads.draft_token_ids"))
        _load_heads_weights(model, weights, source)
        model.generation_config = base_model.generation_config = _load_generation_config(
            source, hub_kwargs, base_model, config
        )
        record = _load_tree_tuning(source, hub_kwargs)
        if record is not None:
            model.tree_tuning = LoadedTuning(record, heads_fingerprint(model.heads))
            model.dynamic_tree = dynamic_tree_policy(record)
        return model._loaded(prepack)

    def _loaded(self, prepack: bool) -> HydraForCausalLM:
        if prepack:
            self.prepack_base()  # which fits the trees to the packed kernels
        else:
            self.fit_trees_to_machine()
        return self.eval()

    def fit_trees_to_machine(self) -> None:
        """On a CPU, the loaded heads' trees are fitted to this machine's verification curve for the base as
        it now runs (`roofline.machine_forward_seconds`: measured once, cached), not to the tuning machine's:
        CPUs differ by 1.5x in what a few extra tokens cost. The dynamic tree is sized on it, and where even
        the best tree is expected to be clearly slower than plain decoding, `plain_is_faster` says so. A tuning
        measured on this very machine, threads and kernel (`tune-tree` records them) is kept as it is.
        `from_pretrained` and `prepack_base` call it; call it again after changing the base's kernels otherwise."""
        record = self.tree_tuning.record if self.tree_tuning is not None else {}
        if len(record.get("verify_seconds") or ()) < 2 or self.base_lm.device.type != "cpu":
            return
        kernel = self.base_prepack.kernel if self.base_prepack is not None else "stock"
        seconds = record["verify_seconds"]
        if record.get("machine") != machine_identity(kernel):
            seconds = machine_forward_seconds(self.base_lm)
            self.dynamic_tree = dynamic_tree_policy(record, seconds)
        if self.dynamic_tree is not None:
            self.dynamic_tree = dataclasses.replace(
                self.dynamic_tree, head_call_cost=head_call_costs(self), rank_accuracy=_rank_accuracy(record)
            )
        self.plain_is_faster = _plain_is_faster(record.get("rank_accuracy"), seconds)
        self._fitted = (record["rank_accuracy"], list(seconds)) if record.get("rank_accuracy") else None

    def plain_is_faster_for(self, rows: int) -> str | None:
        """`plain_is_faster` for a batch of `rows` prompts: the rows share each verification forward, so a tree
        costs its share of the curve at rows times its size (`shared_verify_cost`) while drafting stays per row;
        on CPUs plain batched decoding often wins from a few rows on."""
        if rows == 1 or self._fitted is None:
            return self.plain_is_faster
        rank_accuracy, seconds = self._fitted
        return _plain_is_faster(rank_accuracy, shared_verify_cost(seconds, rows), seconds[0], rows)

    def save_pretrained(
        self, save_directory: str | os.PathLike, benchmark: str | os.PathLike | None = None, **kwargs
    ) -> None:
        """Write `config.json`, `generation_config.json`, the heads' `model.safetensors` and the model card
        `README.md`; never base weights. `benchmark`: an `hf-hydra bench` JSON, copied beside the heads as
        `benchmark.json`, whose tau / speed-up table the card shows."""
        kwargs.pop("state_dict", None)
        if kwargs.pop("safe_serialization", True) is False:
            raise ValueError("hf_hydra saves safetensors only; drop safe_serialization=False.")
        push = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr") if k in kwargs}
        push_to_hub = kwargs.pop("push_to_hub", False)
        if self.heads.prepacked_dtype is not None:
            raise ValueError(
                "These heads are prepacked for inference (prepack_heads) and no longer hold savable weights; "
                "save them before prepacking, or reload them from their folder."
            )
        heads_state = {f"heads.{k}": v.contiguous() for k, v in self.heads.state_dict().items()}
        super().save_pretrained(save_directory, state_dict=heads_state, **kwargs)
        self._save_tree_tuning(Path(save_directory))
        model_card.write_model_card(save_directory, benchmark=benchmark)
        if push_to_hub:  # after the card is written (transformers' own push would upload a generic one)
            model_card.push_folder(save_directory, push.pop("repo_id", Path(save_directory).name), **push)

    def _save_tree_tuning(self, folder: Path) -> None:
        """The loaded tree_tuning.json goes with the heads it measured: written beside them when the heads are
        unchanged since loading (renewing its weights digest), dropped with a warning when they changed."""
        if self.tree_tuning is None:
            return
        if heads_fingerprint(self.heads) != self.tree_tuning.fingerprint:
            logger.warning(
                "The heads changed since they were loaded: their %s (accuracy, calibration) is not saved with "
                "them; run `hf-hydra tune-tree --heads %s --features ...` to measure them again.",
                hub.TREE_TUNING_NAME, folder,
            )
            return
        record = {**self.tree_tuning.record, "heads_sha256": hub.heads_digest(folder)}
        (folder / hub.TREE_TUNING_NAME).write_text(json.dumps(record, indent=1))

    def push_to_hub(
        self, repo_id: str, *, benchmark: str | os.PathLike | None = None, tags: list[str] | None = None, **kwargs
    ):
        """Upload the heads (never base weights) with our model card to the Hub repo `repo_id`, created when
        missing. Options as transformers' `push_to_hub` (`token`, `private`, `revision`, `commit_message`,
        `commit_description`, `create_pr`); `benchmark`: an `hf-hydra bench` JSON for the card's speed table."""
        kwargs.pop("max_shard_size", None)  # the heads are one small file
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return model_card.push_folder(folder, repo_id, benchmark=benchmark, tags=tags, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # Training forward

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        return_head_logits: bool = False,
        **base_kwargs,
    ) -> HydraOutput:
        """The base model's forward (so `generate` can drive this model); with `return_head_logits=True`
        also every head's logits at every position, for training (teacher forcing: Hydra heads read the
        embeddings of the true next tokens). input_ids: (B, T)."""
        base_kwargs["output_hidden_states"] = True
        with torch.no_grad():
            out = self.base_lm(input_ids=input_ids, attention_mask=attention_mask, **base_kwargs)
        hidden = out.hidden_states[-1]  # (B, T, d)
        head_logits = self._head_logits(input_ids, hidden) if return_head_logits else None
        return HydraOutput(
            logits=out.logits,
            **cache_argument(output_cache(out)),
            hidden_states=out.hidden_states,
            last_hidden_state=hidden,
            head_logits=head_logits,
        )

    def _head_logits(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            token_embeds = self.base_lm.get_input_embeddings()(input_ids)  # (B, T, d)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
        context = self.heads.encode_context(hidden, positions, None)  # (B, T, d)
        return self.heads.teacher_forced_logits(context, token_embeds)  # (B, H, T, V or K)

    # ----------------------------------------------------------------------------------------------
    # Generation

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        speculative: bool | str = False,
        tree: TreeSpec | None = None,
        **kwargs,
    ) -> torch.LongTensor | ModelOutput:
        """Generate like the base model's `generate`, optionally with speculative decoding.

        speculative: False -> the base model's plain `generate`. True or "tree" -> tree speculative
        decoding with the heads (fewer base forwards): greedy gives the same tokens as plain greedy; with
        `do_sample=True`, `acceptance="lossless"` (default: `generation_config.hydra_acceptance`) samples
        exactly from the base's distribution after temperature / top-k / top-p / min-p / repetition
        penalty, and `acceptance="typical"` (`posterior_threshold`=0.09, `posterior_alpha`=0.3) is the
        papers' faster, not distribution-preserving rule; `generator=` a `torch.Generator` for the draws
        (else torch's global RNG). `tree` overrides the default tree of `generation_config.hydra_tree`,
        and `return_dict_in_generate=True` adds `speculation` statistics (steps, tokens, tau). The heads'
        tree is merged with candidates copied from earlier in the text (`sources="heads+context"`, default
        `generation_config.hydra_sources`; "heads" drafts with the heads alone). "context" -> the tree
        loop with context candidates only (no heads: prompt lookup, verified as a tree).
        "assisted" -> transformers' own assisted-decoding loop with the heads as a chain drafter
        (`HydraCandidateGenerator`; with sampling, transformers' lossless speculative sampling).
        """
        if speculative is False:
            return self.base_lm.generate(inputs, **kwargs)
        if speculative not in (True, "tree", "context", "assisted"):
            raise ValueError(
                f"speculative must be False, True, 'tree', 'context' or 'assisted'; got {speculative!r}."
            )
        # the generation config the running generate() fills unset fields from: the wrapper's or the base's
        defaults = self.generation_config if speculative == "assisted" else self.base_lm.generation_config
        check_options(kwargs, defaults, ASSISTED if speculative == "assisted" else TREE)
        streamer = kwargs.pop("streamer", None)
        stop_strings_moved = _move_stop_strings_to_criteria(kwargs, defaults)
        if speculative == "assisted":
            if tree is not None:
                raise ValueError(
                    "speculative='assisted' drafts a chain, not a tree: drop tree= or use speculative=True."
                )
            _check_assisted_options(kwargs, self.generation_config)
            decode = functools.partial(assisted_decoding, streamer=streamer)
            with _stop_strings_hidden(defaults, stop_strings_moved):
                return super().generate(inputs, custom_generate=decode, **self._assisted_cache(kwargs), **kwargs)
        if speculative is True and tree is None and self._decodes_plainly(kwargs, _batch_size(inputs, kwargs)):
            with _stop_strings_hidden(defaults, stop_strings_moved):
                return self.base_lm.generate(inputs, streamer=streamer, **self._plain_cache(kwargs), **kwargs)
        drafted = self._drafted_tree(tree, kwargs.get("generation_config") or self.generation_config)
        decode = functools.partial(tree_speculative_generate, heads=self.heads, tree=drafted, streamer=streamer)
        if speculative == "context":
            kwargs["sources"] = "context"
        with _stop_strings_hidden(defaults, stop_strings_moved):
            return self.base_lm.generate(inputs, custom_generate=decode, **kwargs)

    def _decodes_plainly(self, kwargs: dict, rows: int) -> bool:
        """Whether this default speculative call decodes plainly: no tree pays on this machine for this many
        rows (`plain_is_faster_for`, from the curve the heads were fitted to) and the call asks for nothing that
        only the tree loop does. Said once per model and reason."""
        reason = self.plain_is_faster_for(rows)
        if reason is None or TREE_ONLY_OPTIONS & kwargs.keys():
            return False
        if reason not in self._said_plain:
            logger.warning("%s generate(speculative=True) decodes plainly; pass tree= to speculate anyway.", reason)
            self._said_plain.add(reason)
        return True

    def _plain_cache(self, kwargs: dict) -> dict:
        """The plain fallback decodes on a growing cache (`hf_hydra.growing_cache`: no copy of the whole cache per
        token), unless the call brings its own cache, asks for a cache implementation or turns caching off."""
        config = kwargs.get("generation_config") or self.base_lm.generation_config
        chosen = any(name in kwargs for name in CACHE_NAMES) or kwargs.get(
            "cache_implementation", config.cache_implementation
        )
        if chosen or not kwargs.get("use_cache", config.use_cache):
            return {}
        return cache_argument(growing_cache(self.base_lm.config))

    def _assisted_cache(self, kwargs: dict) -> dict:
        """transformers makes no cache for this wrapper: the caller's, else a new DynamicCache (the loop checks
        it and makes its layers grow in place)."""
        kwargs.pop("cache_implementation", None)  # "dynamic" at most (check_options)
        cache = kwargs.pop(CACHE_NAME, None)
        return cache_argument(DynamicCache(config=self.base_lm.config) if cache is None else cache)

    def prepack_base(self, batch_size_hint: int = DEFAULT_BATCH_SIZE_HINT, kernel: str = "auto") -> PrepackReport:
        """CPU inference: replace the base's float32 `nn.Linear` layers by packed ones (in place; see
        `hf_hydra.prepack`; the faster of oneDNN's and the panel kernels on this machine by default), so
        that verifying a few tokens costs about a stock one-token forward. `from_pretrained` does this itself
        for a base it loads onto the CPU. Speculative and plain `generate` both use them; outputs agree with the
        stock kernels' up to float rounding. The heads draft on the same kernel (`DraftHeads.pack_for_drafting`)
        and save and train as before. The base cannot train or move device after."""
        return self.use_packed_base(prepack_linear_layers(self.base_lm, batch_size_hint, kernel=kernel))

    def use_packed_base(self, report: PrepackReport) -> PrepackReport:
        """After the base was packed as `report` says (by `prepack_base`, or by `prepack_linear_layers` on a base
        several models share): the heads draft on the same kernel and the trees are fitted to the packed base."""
        self.base_prepack = report
        self.heads.pack_for_drafting(report.kernel)
        self.fit_trees_to_machine()
        return report

    def prepack_heads(
        self, compute_dtype: torch.dtype | None = None, batch_size_hint: int = DEFAULT_BATCH_SIZE_HINT
    ) -> PrepackReport:
        """CPU inference: replace the heads' float32 linear layers and vocabulary projection by oneDNN-prepacked
        ones computing in `compute_dtype` (in place; see `hf_hydra.prepack`). The default is bfloat16 where
        this CPU has oneDNN bfloat16 kernels (float32 elsewhere): half the memory a drafting step reads. The
        drafts may differ in rare near-ties; greedy output does not, the base verifies every token. The heads
        cannot train, save or move device after; save them before, or reload."""
        if compute_dtype is None:
            compute_dtype = torch.bfloat16 if bfloat16_supported() else torch.float32
        return self.heads.prepack(compute_dtype, batch_size_hint)

    def _get_candidate_generator(self, *args, **kwargs) -> HydraCandidateGenerator:
        """Private transformers hook used by its assisted loop: our heads are the drafter."""
        return HydraCandidateGenerator(
            self.heads,
            self.base_lm.get_input_embeddings(),
            do_sample=bool(kwargs["generation_config"].do_sample),
            logits_processor=kwargs.get("logits_processor"),
            vocab_size=self.config.base_vocab_size,
            position_limits=position_limits(self.base_lm.config),
        )

    def _drafted_tree(
        self, tree: TreeSpec | None, generation_config: GenerationConfig
    ) -> TreeBuffers | DynamicTreePolicy:
        """The call's tree: `tree`, else the default (`generation_config.hydra_tree`); a default "dynamic"
        without a policy (heads never tuned on this machine's curve) is the heads' static tree."""
        if tree is None:
            tree = getattr(generation_config, "hydra_tree", None) or self.config.tree
            if self.dynamic_tree is None:
                tree = static_default(tree, self.config.tree)
        return self._dynamic_tree_policy() if tree == DYNAMIC_TREE else self.tree_buffers(tree)

    def _dynamic_tree_policy(self) -> DynamicTreePolicy:
        if self.dynamic_tree is None:
            raise ValueError(
                'tree="dynamic" needs the verification cost curve of `hf-hydra tune-tree` beside the heads '
                f"({hub.TREE_TUNING_NAME}); run it on the heads' folder, or set model.dynamic_tree, or pass a "
                "static tree such as tree=\"cpu_small_11\"."
            )
        return self.dynamic_tree

    def set_tree(self, tree: TreeSpec, dynamic_default: bool = False) -> None:
        """Make `tree` (a name or rank paths) the heads' static tree (`config.tree`, the source of truth) and
        derive the default of generate calls from it (`generation_config.hydra_tree`: the same rank paths, or
        "dynamic" with `dynamic_default`, which falls back to it); a ValueError when it is too deep."""
        self.config.tree = [list(p) for p in resolve_tree(tree, self.config.num_heads)]
        self.generation_config.hydra_tree = DYNAMIC_TREE if dynamic_default else default_tree_paths(self.config)

    def tree_buffers(self, tree: TreeSpec) -> TreeBuffers:
        """Validated buffers of a tree for these heads (cached per tree)."""
        buffers = _cached_tree_buffers(resolve_tree(tree, self.config.num_heads), self.config.num_heads)
        width = self.config.draft_vocab_size if self.config.uses_draft_vocab else self.config.base_vocab_size
        needed = max(level.topk for level in buffers.levels)
        if width is not None and needed > width:
            raise ValueError(
                f"The tree asks a head for its top {needed} tokens, but the heads choose among only {width} "
                "tokens; use a tree whose ranks are below that."
            )
        return buffers


@functools.lru_cache(maxsize=32)
def _cached_tree_buffers(paths: tuple[tuple[int, ...], ...], num_heads: int) -> TreeBuffers:
    return build_tree_buffers(paths, num_heads)


def _check_assisted_options(kwargs: dict, default_config: GenerationConfig) -> None:
    """transformers' assisted loop samples losslessly, from torch's global RNG: refuse the tree loop's options."""
    generation_config = kwargs.get("generation_config") or default_config
    acceptance = kwargs.pop("acceptance", None) or getattr(generation_config, "hydra_acceptance", None)
    rule = ACCEPTANCE_RULES.get(LEGACY_ACCEPTANCE.get(acceptance, acceptance))
    if kwargs.get("do_sample", generation_config.do_sample) and rule is not None and not rule.exact:
        raise ValueError(
            f"speculative='assisted' uses transformers' lossless speculative sampling; {acceptance} acceptance "
            f"needs speculative=True (or pass acceptance={LOSSLESS!r})."
        )
    for name in ("posterior_threshold", "posterior_alpha", "generator"):
        if kwargs.pop(name, None) is not None:
            raise ValueError(
                f"speculative='assisted' does not take {name} (transformers' loop draws from torch's global RNG; "
                "seed it with torch.manual_seed); use speculative=True."
            )


@contextlib.contextmanager
def _stop_strings_hidden(default_config: GenerationConfig, hidden: bool):
    """generate() refills unset fields from the model's own generation config, so stop strings (already a
    criterion, see _move_stop_strings_to_criteria) are hidden there for the call."""
    saved = default_config.stop_strings
    if hidden:
        default_config.stop_strings = None
    try:
        yield
    finally:
        default_config.stop_strings = saved


def _move_stop_strings_to_criteria(kwargs: dict, default_config: GenerationConfig) -> bool:
    """`generate(custom_generate=...)` drops the tokenizer, so stop strings become a criterion here; True when
    there were any. They come from the call, else from its `generation_config`, else (generate's refill of
    unset fields) from the model's."""
    user_config = kwargs.get("generation_config")
    stop_strings = (
        kwargs.pop("stop_strings", None)
        or (user_config.stop_strings if user_config is not None else None)
        or default_config.stop_strings
    )
    tokenizer = kwargs.pop("tokenizer", None)
    if stop_strings is None:
        return False
    if tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: pass tokenizer=... to generate.")
    criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    kwargs["stopping_criteria"] = criteria
    if user_config is not None and user_config.stop_strings is not None:
        kwargs["generation_config"] = copy.deepcopy(user_config)
        kwargs["generation_config"].stop_strings = None
    return True


def default_tree_paths(config: HydraConfig) -> list[list[int]]:
    """The heads' static tree, `config.tree`, as rank paths: what `generation_config.hydra_tree` holds unless a
    tuned (dynamic) or hand-set default was saved there."""
    return [list(p) for p in resolve_tree(config.tree, config.num_heads)]


def speculative_generation_config(base_config: GenerationConfig, config: HydraConfig) -> GenerationConfig:
    """The base's generation defaults plus the speculation defaults (`hydra_tree`, `hydra_acceptance`,
    `hydra_sources`), derived from the heads' config.

    The default tree is kept in two saved places, both part of the file formats (and of the shipped heads):
    config.json's `tree`, the heads' static tree, and generation_config.json's `hydra_tree`, the tree a
    generate call uses when it names none ("dynamic" after `tune-tree`, else rank paths). `config.tree` is the
    source of truth: `hydra_tree` is derived from it here, on creation, and on loading a folder whose
    generation_config.json has none (`_load_generation_config`); `HydraForCausalLM.set_tree` changes both
    together. A `hydra_tree` saved in generation_config.json is kept as the call default, like any
    generation default; "dynamic" falls back to `config.tree` where no dynamic policy is loaded.
    """
    generation_config = copy.deepcopy(base_config)
    generation_config.hydra_tree = default_tree_paths(config)
    generation_config.hydra_acceptance = config.acceptance
    generation_config.hydra_sources = DEFAULT_SOURCES
    keep_hydra_generation_fields(generation_config)  # else GenerationConfig drops hydra_* when loading it
    return generation_config


def check_base_compatible(config: HydraConfig, base_model: PreTrainedModel) -> None:
    """Heads only fit a base with their hidden size and vocabulary."""
    text_config = base_model.config.get_text_config()
    hidden = text_config.hidden_size
    vocab = base_model.get_output_embeddings().weight.shape[0]
    if (config.base_hidden_size, config.base_vocab_size) != (hidden, vocab):
        raise ValueError(
            f"These heads were trained for {config.base_model_name_or_path!r} (hidden size "
            f"{config.base_hidden_size}, vocabulary {config.base_vocab_size}), but the given base model "
            f"{base_model.name_or_path!r} has hidden size {hidden} and vocabulary {vocab}. Load the base model "
            "the heads were trained for, or train heads for this one."
        )


def _base_revision(base_model: PreTrainedModel, revision: str | None = None) -> str | None:
    """The commit sha of a base loaded from the Hub (from the Hub cache), else `revision` as given."""
    return hub.resolve_base_revision(base_model.name_or_path, revision)


def _load_base(config: HydraConfig, hub_kwargs: dict, same_repo: bool = False, **kwargs) -> PreTrainedModel:
    """The base the heads' config names. same_repo: the base is the heads' own repo (a Medusa-1.0 / Medusa-2
    model with the heads inside), so every Hub option of the heads (revision, subfolder, ...) is the base's too."""
    if not config.base_model_name_or_path:
        raise ValueError("The heads' config names no base model; pass base_model=... to from_pretrained.")
    # where and how to reach the Hub: the base's too
    for name in _HUB_KWARGS if same_repo else ("token", "cache_dir", "local_files_only"):
        if name in hub_kwargs:
            kwargs.setdefault(name, hub_kwargs[name])
    kwargs.setdefault("revision", config.base_model_revision)
    return reference_checkpoints.load_base_model(assets.local_model_source(config.base_model_name_or_path), **kwargs)


@dataclass(frozen=True)
class LoadedTuning:
    """A tree_tuning.json as loaded, and the fingerprint of the heads it was loaded with."""

    record: dict
    fingerprint: str


def heads_fingerprint(heads: torch.nn.Module) -> str:
    """sha256 of the heads' state as held in memory: tells whether they changed since loading."""
    digest = hashlib.sha256()
    for name, tensor in sorted(heads.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_tree_tuning(source: str, hub_kwargs: dict) -> dict | None:
    """The heads' tree_tuning.json (None without one)."""
    try:
        path = cached_file_or_none(source, hub.TREE_TUNING_NAME, **hub_kwargs)
    except OSError as error:  # Hub mirrors (olah) answer 401, not 404, for a file the repo lacks
        logger.info("No %s served for %s (%s): the default tree is the heads' static tree.", hub.TREE_TUNING_NAME,
                    source, error)
        return None
    return json.loads(Path(path).read_text()) if path is not None else None


def dynamic_tree_policy(record: dict, verify_seconds: list[float] | None = None) -> DynamicTreePolicy | None:
    """The dynamic tree's policy from a tree_tuning.json record (None without a verification curve), on
    `verify_seconds` (this machine's curve) where given, else on the record's."""
    if len(record.get("verify_seconds") or ()) < 2:
        return None
    calibration = HeadCalibration.from_record(record.get("calibration"))
    return DynamicTreePolicy.from_tuning(verify_seconds or record["verify_seconds"], calibration)


def head_call_costs(model: HydraForCausalLM) -> tuple[float, ...]:
    """Each head's call in one-token base forwards, estimated as the share of weight bytes it reads (on a CPU both
    stream their weights from memory at about the same rate)."""
    base_bytes = linear_weight_bytes(model.base_lm)
    return tuple(model.heads.call_weight_bytes(k) / base_bytes for k in range(model.heads.num_heads))


def _rank_accuracy(record: dict) -> tuple[tuple[float, ...], ...]:
    """The heads' rank accuracy of a tree_tuning.json record (empty where it holds none)."""
    return tuple(tuple(float(rate) for rate in head) for head in record.get("rank_accuracy") or ())


PLAIN_DECODING_OVERHEAD = 0.15  # a step's drafting and bookkeeping, in one-token forwards (as DynamicTreePolicy)
# The estimate counts the heads' static trees only, not the context candidates nor a dynamic tree's per-step
# sizing: on an AVX2 EPYC's stock kernels it said 0.99x where decoding measured 1.08x. Only a clearly slower
# estimate decodes plainly.
PLAIN_DECODING_THRESHOLD = 0.9


def _plain_is_faster(
    rank_accuracy: list[list[float]] | None,
    verify_seconds: list[float],
    drafting_unit: float | None = None,
    rows: int = 1,
) -> str | None:
    """Why no tree of these heads pays on this curve (the best expected speed-up is below 0.9), or None.
    verify_seconds: a row's cost of verifying 1, 2, ... tokens (for a batch: its share, `shared_verify_cost`);
    drafting_unit: the one-token forward the drafting overhead is counted in (default: verify_seconds[0])."""
    if not rank_accuracy:
        return None
    one_token = verify_seconds[0]
    overhead = PLAIN_DECODING_OVERHEAD * (one_token if drafting_unit is None else drafting_unit)
    choice = choose_tree(rank_accuracy, verify_seconds, lambda paths: overhead)
    speedup = choice.expected_tokens_per_second * one_token
    if speedup >= PLAIN_DECODING_THRESHOLD:
        return None
    batch = f" with {rows} prompts per forward" if rows > 1 else ""
    return (
        f"On this machine{batch} a forward over {len(choice.paths) + 1} tokens per prompt costs "
        f"{verify_seconds[len(choice.paths)] / one_token:.2f}x one over a single token per prompt: the best tree of "
        f"these heads (expected tau {choice.expected_tau:.2f}) would be {speedup:.2f}x plain decoding."
    )


def _batch_size(inputs: torch.Tensor | None, kwargs: dict) -> int:
    """The rows of a generate call's prompt (input_ids positional or by keyword, else inputs_embeds)."""
    prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    return 1 if prompt is None else int(prompt.shape[0])


def _load_heads_state(source: str, hub_kwargs: dict) -> dict[str, torch.Tensor]:
    path = cached_file(source, HEADS_WEIGHTS_NAME, **hub_kwargs)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"Could not read the heads' weights {path} ({error}). The file is corrupted or incomplete: "
            "download it again (force_download=True) or re-save the heads."
        ) from error


def _load_heads_weights(model: HydraForCausalLM, weights: dict[str, torch.Tensor], source: str) -> None:
    expected = {f"heads.{k}" for k in model.heads.state_dict()}
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"The weights in {source} do not match a {model.config.head_arch!r} head set of this config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}."
        )
    current = model.heads.state_dict()
    wrong = [
        f"heads.{k} {tuple(weights[f'heads.{k}'].shape)} (expected {tuple(v.shape)})"
        for k, v in current.items()
        if weights[f"heads.{k}"].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"The weights in {source} have the wrong shapes for this config: {wrong[:8]}.")
    state = {k.removeprefix("heads."): v for k, v in weights.items()}
    model.heads.load_state_dict(state, strict=True)


def _load_generation_config(
    source: str, hub_kwargs: dict, base_model: PreTrainedModel, config: HydraConfig
) -> GenerationConfig:
    path = cached_file_or_none(source, "generation_config.json", **hub_kwargs)
    if path is None:
        return speculative_generation_config(base_model.generation_config, config)
    # the saved speculation defaults over those derived from the config (files saved with
    # _from_model_config=true lose hydra_* in GenerationConfig.from_pretrained: they are read from the JSON)
    generation_config = speculative_generation_config(GenerationConfig.from_pretrained(Path(path).parent), config)
    raw = json.loads(Path(path).read_text())
    generation_config.hydra_tree = raw.get("hydra_tree") or generation_config.hydra_tree
    generation_config.hydra_acceptance = raw.get("hydra_acceptance", generation_config.hydra_acceptance)
    generation_config.hydra_sources = raw.get("hydra_sources", generation_config.hydra_sources)
    return generation_config
