"""The head architectures, each declared once: what configs, the CLI, model cards, the benchmark and the shipped
artifacts know about it.

This module imports nothing from the package, so every module may read it: `configuration_hydra` validates
`head_arch` against it, `model_card` takes the display names and Hub tags, `assets` the shipped folders, `bench`
and `cli` the names. The head classes live in `hf_hydra.heads`, each pointing at its `HeadArch` (class attribute
`arch`); `heads.HEAD_CLASSES` is built from those classes and checked against `HEAD_ARCHS` when it is imported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadArch:
    """One head architecture."""

    name: str  # the value of `HydraConfig.head_arch` (config.json), of `--arch` and of bench's method label
    display_name: str  # how model cards and reports write it
    hub_tag: str  # the model card's Hub tag (tags cannot contain "+")
    sequential: bool  # head i reads the embeddings of the tokens drafted before it (Hydra), not only h_t
    prefix_layer: bool  # a decoder layer of the base's architecture turns h_t into the heads' context vector
    dropout: bool  # whether `HydraConfig.dropout` applies to its heads (0 otherwise)
    pretrained_folder: str | None = None  # the folder of hf_hydra/pretrained/ holding its shipped heads, if any


MEDUSA = HeadArch(
    "medusa", "Medusa", "medusa", sequential=False, prefix_layer=False, dropout=False,
    pretrained_folder="smollm2-135m-instruct-medusa",
)  # fmt: skip
HYDRA = HeadArch(
    "hydra", "Hydra", "hydra", sequential=True, prefix_layer=False, dropout=False,
    pretrained_folder="smollm2-135m-instruct-hydra",
)  # fmt: skip
HYDRA_PLUS_PLUS = HeadArch(
    "hydra++", "Hydra++", "hydra-plus-plus", sequential=True, prefix_layer=True, dropout=True,
    pretrained_folder="smollm2-135m-instruct-hydra-plus-plus",
)  # fmt: skip

HEAD_ARCH_REGISTRY: dict[str, HeadArch] = {arch.name: arch for arch in (MEDUSA, HYDRA, HYDRA_PLUS_PLUS)}
HEAD_ARCHS = tuple(HEAD_ARCH_REGISTRY)  # the names, in the order listings and benchmarks use
DEFAULT_HEAD_ARCH = HYDRA.name  # of a config or training run that names none
