"""HydraConfig: what a set of draft heads is, which base model it belongs to, and how it decodes."""

from __future__ import annotations

from transformers import PretrainedConfig

from .acceptance import DEFAULT_SAMPLING_RULE, LEGACY_ACCEPTANCE, SAMPLING_RULES
from .head_archs import DEFAULT_HEAD_ARCH, HEAD_ARCHS
from .tree import DEFAULT_TREE_NAME, NAMED_TREES, resolve_tree

VOCAB_PROJECTIONS = ("per_head", "shared", "draft_vocab", "shared_draft_vocab")
# Projections onto a reduced draft vocabulary of K token ids (`draft_token_ids`).
DRAFT_VOCAB_PROJECTIONS = ("draft_vocab", "shared_draft_vocab")
# Projections that are the frozen base lm_head (all its rows, or those of the draft tokens): nothing saved.
SHARED_PROJECTIONS = ("shared", "shared_draft_vocab")


class HydraConfig(PretrainedConfig):
    """Configuration of Medusa / Hydra / Hydra++ draft heads on a frozen base causal LM.

    The base model is referenced, never embedded: `base_model_name_or_path` (+ `base_model_revision`)
    say where to load it from, `base_hidden_size` / `base_vocab_size` let loaders check that a given
    base fits the heads before any weight is touched.
    """

    model_type = "hydra"

    def __init__(
        self,
        base_model_name_or_path: str | None = None,  # Hub id or local folder of the frozen base model
        base_model_revision: str | None = None,  # branch / tag / commit of the base on the Hub
        base_tokenizer_fingerprint: str | None = None,  # hub.tokenizer_fingerprint of the base's tokenizer
        base_hidden_size: int | None = None,  # d of the base (the heads' width)
        base_vocab_size: int | None = None,  # V of the base
        head_arch: str = DEFAULT_HEAD_ARCH,  # one of `hf_hydra.head_archs.HEAD_ARCHS`
        num_heads: int = 4,  # head i drafts the token i+2 positions after the last verified one
        num_layers: int = 1,  # residual blocks per head
        dropout: float = 0.0,  # Hydra++ only: dropout before each block and the output layer
        # "per_head" (own lm_head), "shared" (base lm_head, frozen), "draft_vocab" (own projection onto K
        # draft tokens), "shared_draft_vocab" (the base lm_head's rows of the K draft tokens, frozen)
        vocab_projection: str = "per_head",
        draft_vocab_size: int | None = None,  # K, the size of the reduced draft vocabulary (draft projections)
        tree: str | list[list[int]] | None = None,  # default draft tree: a name or a list of rank paths
        acceptance: str = DEFAULT_SAMPLING_RULE,  # default rule for do_sample=True, one of SAMPLING_RULES
        **kwargs,
    ) -> None:
        self.base_model_name_or_path = base_model_name_or_path
        self.base_model_revision = base_model_revision
        self.base_tokenizer_fingerprint = base_tokenizer_fingerprint
        self.base_hidden_size = base_hidden_size
        self.base_vocab_size = base_vocab_size
        self.head_arch = head_arch
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.dropout = dropout
        self.vocab_projection = vocab_projection
        self.draft_vocab_size = draft_vocab_size
        if tree is None:  # the default tree, cut to the number of heads
            default = NAMED_TREES[DEFAULT_TREE_NAME]
            fits = isinstance(num_heads, int) and max(len(p) for p in default) <= num_heads
            tree = DEFAULT_TREE_NAME if fits else [list(p) for p in default if len(p) <= num_heads]
        self.tree = tree
        self.acceptance = LEGACY_ACCEPTANCE.get(acceptance, acceptance)
        super().__init__(**kwargs)
        self.validate_heads()

    @property
    def uses_draft_vocab(self) -> bool:
        """Whether the heads choose among K draft tokens (`draft_token_ids`) instead of the whole vocabulary."""
        return self.vocab_projection in DRAFT_VOCAB_PROJECTIONS

    def validate_heads(self) -> None:
        """Raise a `ValueError` that says what to change when the head configuration is inconsistent."""
        if self.head_arch not in HEAD_ARCHS:
            raise ValueError(f"head_arch={self.head_arch!r} is not one of {HEAD_ARCHS}.")
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"num_heads must be a positive integer, got {self.num_heads!r}.")
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {self.num_layers!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.vocab_projection not in VOCAB_PROJECTIONS:
            raise ValueError(f"vocab_projection={self.vocab_projection!r} is not one of {VOCAB_PROJECTIONS}.")
        if self.uses_draft_vocab:
            if not isinstance(self.draft_vocab_size, int) or self.draft_vocab_size < 1:
                raise ValueError(
                    f"vocab_projection={self.vocab_projection!r} needs draft_vocab_size=K, the number of most frequent "
                    f"target tokens the heads project onto; got {self.draft_vocab_size!r}."
                )
            if self.base_vocab_size is not None and self.draft_vocab_size > self.base_vocab_size:
                raise ValueError(
                    f"draft_vocab_size={self.draft_vocab_size} exceeds the base vocabulary "
                    f"({self.base_vocab_size}); use vocab_projection='per_head' instead."
                )
        if self.acceptance not in SAMPLING_RULES:
            raise ValueError(f"acceptance={self.acceptance!r} is not one of {SAMPLING_RULES}.")
        resolve_tree(self.tree, num_heads=self.num_heads)  # raises on unknown names / too deep trees
