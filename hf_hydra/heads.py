"""Draft heads: Medusa (independent), Hydra (sequentially dependent) and Hydra++ (+ prefix layer).

All three share one call signature, `heads(head_index, context, path_embeds) -> logits`, and one
`encode_context` step that turns the base model's post-norm hidden states of *verified* tokens into
the context vector the heads read (identity for Medusa and Hydra, the prefix decoder layer for
Hydra++). Heads hold no decoding logic; `drafting.py` decides which paths to extend.

Notation (method.md): d hidden size, V vocabulary, h_t the base's post-norm hidden state at t,
E the base's frozen input embedding. Head i (0-based) predicts the token i + 2 positions after t.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from ._compat import attn_implementation
from .attention import PACKED_GQA_ATTENTION
from .cache_name import cache_argument
from .configuration_hydra import SHARED_PROJECTIONS, HydraConfig
from .cpu_kernels import PanelCopyLinear, PanelLinear
from .growing_cache import growing_cache
from .head_archs import HEAD_ARCHS, HYDRA, HYDRA_PLUS_PLUS, MEDUSA, HeadArch
from .prepack import DEFAULT_BATCH_SIZE_HINT, PrepackedLinear, PrepackReport, packed_kernel, prepack_linear_layers
from .tree import causal_mask


class ResBlock(nn.Module):
    """`x + SiLU(W x + b)`, with W zero-initialised so a fresh block is the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class ProjectedResBlock(nn.Module):
    """Hydra's first block: `R x + SiLU(W x + b)` from the concatenated input (width d * (i + 2)) to d.

    R starts as the projection onto the first d inputs (the context vector) and W at zero, so a fresh
    head reads the context vector unchanged, like a fresh Medusa head.
    """

    def __init__(self, in_width: int, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_width, width)
        self.res_connection = nn.Linear(in_width, width)
        nn.init.zeros_(self.linear.weight)
        with torch.no_grad():
            self.res_connection.weight.copy_(torch.eye(width, in_width))
            self.res_connection.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_connection(x) + nn.functional.silu(self.linear(x))


class DraftHead(nn.Module):
    """One head: residual blocks, then (optionally) its own projection to the draft vocabulary."""

    def __init__(self, blocks: list[nn.Module], output: nn.Linear | None, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)  # each block a separate module: no weight tying
        self.output = output
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(self.dropout(x))
        return self.dropout(x)


# attention implementations that run causally when given no mask (transformers' sdpa sets is_causal)
CAUSAL_WITHOUT_MASK = frozenset({"sdpa", PACKED_GQA_ATTENTION})


class PrefixLayer(nn.Module):
    """Hydra++: one randomly initialised decoder layer of the base architecture plus a final norm,
    run causally over the hidden states of verified tokens with its own KV cache."""

    def __init__(self, base: PreTrainedModel) -> None:
        super().__init__()
        decoder = base.get_decoder()
        self.layer = type(decoder.layers[0])(base.config, layer_idx=0)
        self.norm = type(decoder.norm)(base.config.hidden_size, eps=_norm_eps(base.config))
        self.rotary_emb = type(decoder.rotary_emb)(config=base.config)  # buffers only, none persistent

    def forward(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache | None
    ) -> torch.Tensor:
        """hidden (B, n, d) of n new verified tokens at `position_ids` (B, n) -> (B, n, d). Over a prompt (nothing
        cached) sdpa runs causally without a mask (no n x n mask in memory); later chunks are a few tokens, and a
        single one sees everything cached: no mask either."""
        past = cache.get_seq_length() if cache is not None else 0
        new = hidden.shape[1]
        mask = None
        if new > 1 and (past > 0 or attn_implementation(self.layer.self_attn.config) not in CAUSAL_WITHOUT_MASK):
            mask = causal_mask(new, past, hidden.dtype, hidden.device)  # (1, 1, n, past + n)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        out = self.layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            **cache_argument(cache),
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
        )
        return self.norm(out)


def _norm_eps(config) -> float:
    for name in ("rms_norm_eps", "layer_norm_eps", "norm_eps"):
        if getattr(config, name, None) is not None:
            return float(getattr(config, name))
    return 1e-6


class DraftHeads(nn.Module):
    """Base class: a list of heads and their projection to the (draft) vocabulary.

    `draft_token_ids` (K,) maps draft-vocabulary rows to base token ids when the projection is onto a
    draft vocabulary (`config.uses_draft_vocab`); it is None when the heads project onto the whole vocabulary.
    The shared projections are the frozen base lm_head (all rows, or the K draft rows): a buffer that is
    used, never saved or trained.

    Each subclass implements one architecture of `hf_hydra.head_archs` (`arch`); what the declaration says
    (sequential, prefix layer, dropout) is read from it here, the subclasses add how their heads are built.
    """

    arch: ClassVar[HeadArch]
    output_bias: bool = True

    def __init__(
        self, config: HydraConfig, base: PreTrainedModel, draft_token_ids: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.config = config
        d = config.base_hidden_size
        base_output = base.get_output_embeddings().weight.detach()  # (V, d)
        if config.uses_draft_vocab:
            draft_token_ids = _check_draft_token_ids(draft_token_ids, config)
            self.register_buffer("draft_token_ids", draft_token_ids)
            output_init = base_output[draft_token_ids]  # (K, d)
        else:
            self.draft_token_ids = None
            output_init = base_output
        if config.vocab_projection in SHARED_PROJECTIONS:
            self.register_buffer("base_output_weight", base_output, persistent=False)  # (V, d), a view
            self.register_buffer("shared_output_weight", output_init, persistent=False)  # (V or K, d)
            self.register_load_state_dict_post_hook(_refresh_shared_draft_rows)
        self.packed_shared_output: PrepackedLinear | PanelLinear | None = None  # `prepack`, `pack_for_drafting`
        self.heads = nn.ModuleList(
            DraftHead(
                blocks=self._blocks(i, d),
                output=self._output(output_init, config.vocab_projection),
                dropout=config.dropout if self.arch.dropout else 0.0,
            )
            for i in range(config.num_heads)
        )
        if self.arch.prefix_layer:
            self.prefix_layer = PrefixLayer(base)

    @property
    def sequential(self) -> bool:
        """Whether head i reads the embeddings of the tokens drafted before it."""
        return self.arch.sequential

    def _blocks(self, head_index: int, d: int) -> list[nn.Module]:
        return [ResBlock(d) for _ in range(self.config.num_layers)]

    def _output(self, init_weight: torch.Tensor, vocab_projection: str) -> nn.Linear | None:
        if vocab_projection in SHARED_PROJECTIONS:
            return None
        rows, d = init_weight.shape
        output = nn.Linear(d, rows, bias=self.output_bias)
        with torch.no_grad():
            output.weight.copy_(init_weight)
            if output.bias is not None:
                output.bias.zero_()
        return output

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def prepacked_dtype(self) -> torch.dtype | None:
        """The compute dtype of the heads' own prepacked layers (`prepack`); None while they are stock (a packed
        copy of the shared projection, `pack_for_drafting`, leaves them stock)."""
        packed = [
            module.compute_dtype
            for name, module in self.named_modules()
            if isinstance(module, PrepackedLinear) and name != "packed_shared_output"
        ]
        return packed[0] if packed else None

    def pack_for_drafting(self, kernel: str, weight_dtype: torch.dtype = torch.bfloat16) -> None:
        """CPU inference on the base's packed `kernel` ("panel" or "onednn"), leaving what the heads save and how
        they train as it was: a copy of the shared vocabulary projection (rows of the frozen base lm_head, read
        once per head call: most of a drafting step's memory traffic), and with the panel kernels every linear
        layer of the heads (the Hydra++ prefix layer's included) as a `PanelCopyLinear`, which computes few-row
        inference on a packed copy of its weight and trains and saves as an `nn.Linear`.

        With the panel kernels the copies hold `weight_dtype` weights: bfloat16 by default, half the bytes a
        drafting step reads, with float32 sums. Drafts may then differ from float32 heads' where two candidates
        are nearly tied; the base verifies every draft, so outputs do not change. The oneDNN copy is float32."""
        if self.config.vocab_projection in SHARED_PROJECTIONS and self.packed_shared_output is None:
            dtype = weight_dtype if kernel == "panel" else torch.float32
            self.packed_shared_output = _packed_projection(self.shared_output_weight, kernel, dtype)
        if kernel != "panel":
            return
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PanelCopyLinear.from_linear(child, weight_dtype))

    def prepack(
        self, compute_dtype: torch.dtype, batch_size_hint: int = DEFAULT_BATCH_SIZE_HINT
    ) -> PrepackReport:
        """CPU inference: every linear layer and the shared vocabulary projection prepacked for oneDNN (in
        place, see `hf_hydra.prepack`), computing in `compute_dtype`; the heads cannot train or save after."""
        report = prepack_linear_layers(self, batch_size_hint, compute_dtype, kernel="onednn")
        if self.config.vocab_projection in SHARED_PROJECTIONS:
            weight = self.shared_output_weight  # (V or K, d)
            self.packed_shared_output = _packed_projection(weight, "onednn", compute_dtype, batch_size_hint)
            report = dataclasses.replace(
                report, layers=report.layers + 1, parameters=report.parameters + weight.numel()
            )
        return report

    def encode_context(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache | None
    ) -> torch.Tensor:
        """Post-norm base hidden states of verified tokens (B, n, d) -> context vectors (B, n, d): the prefix
        layer's output where the architecture has one, else the hidden states themselves."""
        return self.prefix_layer(hidden, position_ids, cache) if self.arch.prefix_layer else hidden

    def new_context_cache(self) -> DynamicCache | None:
        """The cache `encode_context` needs across decoding steps (the prefix layer's; None when it is stateless)."""
        return growing_cache() if self.arch.prefix_layer else None

    def forward(
        self, head_index: int, context: torch.Tensor, path_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of head `head_index` over the draft vocabulary.

        context: (..., d); path_embeds: (..., head_index + 1, d), the embeddings of the base token and of
        the tokens drafted by heads 0..head_index-1 on each path (ignored by Medusa). -> (..., V or K)
        """
        head = self.heads[head_index]
        features = head.features(self._head_input(head_index, context, path_embeds))  # (..., d)
        if head.output is not None:
            return head.output(features)
        if self.packed_shared_output is not None and not (features.requires_grad and torch.is_grad_enabled()):
            return self.packed_shared_output(features)
        return features @ self.shared_output_weight.T

    def _head_input(
        self, head_index: int, context: torch.Tensor, path_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        return context

    def call_weight_bytes(self, head_index: int) -> int:
        """Bytes of weights one call of head `head_index` reads as it drafts: its layers and its vocabulary
        projection, each in the form drafting reads (a packed copy's dtype where there is one)."""
        head = self.heads[head_index]
        total = sum(_weight_read_bytes(module) for module in head.modules())
        if head.output is None:
            projection = self.packed_shared_output
            weight = self.shared_output_weight  # (V or K, d)
            total += weight.numel() * weight.element_size() if projection is None else _weight_read_bytes(projection)
        return total

    def teacher_forced_logits(self, context: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """Every head at every position, reading the true next tokens (training).

        context: (B, T, d); token_embeds: (B, T, d) = E(x) of the sequence. Head i at t reads
        E(x_{t+1}), ..., E(x_{t+i+1}); past the end of the sequence zeros stand in (no target there).
        -> (B, H, T, V or K)
        """
        future = _future_embeds(token_embeds, self.num_heads) if self.sequential else None  # (B, T, H, d)
        return torch.stack(
            [self(i, context, None if future is None else future[:, :, : i + 1]) for i in range(self.num_heads)],
            dim=1,
        )


def _weight_read_bytes(module: nn.Module) -> int:
    """Bytes of the weight a linear layer reads per call, in the dtype it computes with (0 for other modules)."""
    if isinstance(module, PanelCopyLinear):
        return module.weight.numel() * module.copy_dtype.itemsize
    if isinstance(module, nn.Linear):
        return module.weight.numel() * module.weight.element_size()
    if isinstance(module, PanelLinear):
        return module.in_features * module.out_features * module.weight_dtype.itemsize
    if isinstance(module, PrepackedLinear):
        return module.in_features * module.out_features * module.compute_dtype.itemsize
    return 0


def _refresh_shared_draft_rows(module: DraftHeads, incompatible_keys) -> None:
    """After loading saved `draft_token_ids`, take the shared draft rows of the base lm_head again."""
    if module.draft_token_ids is not None:
        module.shared_output_weight = module.base_output_weight[module.draft_token_ids]
        packed = module.packed_shared_output
        if packed is not None:  # a packed copy follows the rows, on its kernel and in its dtype
            dtype = packed.compute_dtype if isinstance(packed, PrepackedLinear) else packed.weight_dtype
            module.packed_shared_output = _packed_projection(module.shared_output_weight, packed_kernel(packed), dtype)


def _packed_projection(
    weight: torch.Tensor,
    kernel: str,
    dtype: torch.dtype = torch.float32,
    batch_size_hint: int = DEFAULT_BATCH_SIZE_HINT,
) -> PanelLinear | PrepackedLinear:
    """(rows, d) -> an inference-only linear layer without bias on `kernel`: "panel" with `dtype` weights, or
    "onednn" computing in `dtype` (float32 unless the caller prepacks the heads for bfloat16)."""
    if kernel == "panel":
        return PanelLinear(weight, weight_dtype=dtype)
    return PrepackedLinear(weight, None, batch_size_hint, dtype)


def _future_embeds(token_embeds: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, d) -> (B, T, H, d) whose [:, t, j] is token_embeds[:, t + j + 1] (zeros past the end)."""
    shifted = [nn.functional.pad(token_embeds[:, j + 1 :], (0, 0, 0, j + 1)) for j in range(num_heads)]
    return torch.stack(shifted, dim=2)


class MedusaHeads(DraftHeads):
    """Medusa: head i reads h_t only; ResBlocks then `Linear(d, V, bias=False)`."""

    arch = MEDUSA
    output_bias = False


class HydraHeads(DraftHeads):
    """Hydra: head i reads `cat(h_t, E(x_{t+1}), ..., E(x_{t+i+1}))` (width d * (i + 2))."""

    arch = HYDRA

    def _blocks(self, head_index: int, d: int) -> list[nn.Module]:
        first = ProjectedResBlock(d * (head_index + 2), d)
        return [first] + [ResBlock(d) for _ in range(self.config.num_layers - 1)]

    def _head_input(
        self, head_index: int, context: torch.Tensor, path_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        if path_embeds is None or path_embeds.shape[-2] != head_index + 1:
            got = None if path_embeds is None else tuple(path_embeds.shape)
            raise ValueError(
                f"Hydra head {head_index} needs the embeddings of {head_index + 1} path tokens "
                f"(shape (..., {head_index + 1}, d)), got {got}."
            )
        flat = path_embeds.flatten(-2)  # (..., (i + 1) * d)
        return torch.cat([context, flat], dim=-1)  # (..., (i + 2) * d)


class HydraPlusPlusHeads(HydraHeads):
    """Hydra++: Hydra heads with dropout, reading the output of a prefix decoder layer instead of h_t."""

    arch = HYDRA_PLUS_PLUS


# The implementation of each declared architecture, by name.
HEAD_CLASSES: dict[str, type[DraftHeads]] = {
    cls.arch.name: cls for cls in (MedusaHeads, HydraHeads, HydraPlusPlusHeads)
}
if set(HEAD_CLASSES) != set(HEAD_ARCHS):
    raise ImportError(f"hf_hydra.heads implements {tuple(HEAD_CLASSES)}; hf_hydra.head_archs declares {HEAD_ARCHS}.")


def build_heads(
    config: HydraConfig, base: PreTrainedModel, draft_token_ids: torch.Tensor | None = None
) -> DraftHeads:
    """The head class of `config.head_arch`, built for `base`."""
    return HEAD_CLASSES[config.head_arch](config, base, draft_token_ids)


def _check_draft_token_ids(draft_token_ids: torch.Tensor | None, config: HydraConfig) -> torch.Tensor:
    if draft_token_ids is None:
        # Placeholder filled by `load_state_dict` when loading saved heads; fresh heads must pass ids.
        return torch.arange(config.draft_vocab_size)
    ids = torch.as_tensor(draft_token_ids, dtype=torch.long).flatten()
    if ids.numel() != config.draft_vocab_size:
        raise ValueError(f"draft_token_ids has {ids.numel()} ids but draft_vocab_size={config.draft_vocab_size}.")
    if ids.unique().numel() != ids.numel() or ids.min() < 0 or ids.max() >= config.base_vocab_size:
        raise ValueError(
            f"draft_token_ids must be {config.draft_vocab_size} distinct token ids in [0, {config.base_vocab_size})."
        )
    return ids
