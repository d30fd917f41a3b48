"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL, one module each
(sd.py, sdxl.py; `Family` in family.py says what a family holds). Everything else in the engine
asks the family of the model it has, and names no pipeline class:

    family_of(pipe)           the family of a loaded pipeline (text-to-image, img2img or inpainting)
    family_of(index)          the family of a model_index.json's contents
    family_of_checkpoint(names)   the family of a single-file checkpoint, from its tensor names
    family_named("sdxl")      by name

A new family (FLUX) is a module here with its `Family`, listed in FAMILIES.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from engine.diffusion.families.family import TWIN_RESOLUTION, TWIN_SEED, UNET_ATTENTION, Family, offline_clip_tokenizer
from engine.diffusion.families.sd import SD
from engine.diffusion.families.sdxl import SDXL

__all__ = ["FAMILIES", "Family", "TWIN_RESOLUTION", "TWIN_SEED", "UNET_ATTENTION", "family_named", "family_of", "family_of_checkpoint", "family_of_class",
           "index_classes", "offline_clip_tokenizer"]

FAMILIES: tuple[Family, ...] = (SD, SDXL)


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def index_classes() -> tuple[str, ...]:
    """Every pipeline a model_index.json may name, text-to-image before inpainting in each family."""
    return tuple(name for family in FAMILIES for name in family.index_classes)


def family_of_class(class_name: str) -> Family | None:
    """The family whose pipelines include `class_name`, or None."""
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family
    return None


def family_of(pipe_or_index: Any) -> Family:
    """The family of a loaded pipeline (its class or a class it derives from is one of a
    family's), or of a model_index.json's contents (its `_class_name`). ValueError otherwise."""
    if isinstance(pipe_or_index, dict):
        class_name = pipe_or_index.get("_class_name")
        family = family_of_class(class_name) if isinstance(class_name, str) and class_name in index_classes() else None
        if family is None:
            raise ValueError(f"model_index.json names the pipeline {class_name!r}; supported: {', '.join(index_classes())}")
        return family
    for cls in type(pipe_or_index).__mro__:
        family = family_of_class(cls.__name__)
        if family is not None:
            return family
    raise ValueError(f"a {type(pipe_or_index).__name__} is of no known model family; known: {', '.join(f.name for f in FAMILIES)}")


def family_of_checkpoint(tensor_names: Iterable[str]) -> Family:
    """The family of a single-file checkpoint (LDM / SGM layout): the one whose markers it holds,
    else the family that has none (SD)."""
    names = list(tensor_names)
    for family in FAMILIES:
        if family.checkpoint_markers and any(name.startswith(marker) for name in names for marker in family.checkpoint_markers):
            return family
    return next(family for family in FAMILIES if not family.checkpoint_markers)
