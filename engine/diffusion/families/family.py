"""What a model family is (`Family`), and what the tiny random-weight twins of every family share.

A family is the set of facts that differ between Stable Diffusion 1.x/2.x and SDXL (and later
FLUX): how a staged model is recognised, which diffusers pipelines render it, how a caption is
encoded for training, what LoRA trains, the latent space, the default resolution, how guidance
is given, its tiny twin, and the names its LoRA export carries in kohya's format. Each family is
one module beside this one (sd.py, sdxl.py) holding one `Family`; engine.diffusion.families looks
them up. This module is apart from the package's __init__ only so that the family modules can
import the dataclass without an import cycle (tests/unit/test_layers.py).

Importing it imports neither torch nor diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The tiny twins: random weights from this seed, at this side in pixels (every twin's VAE
# downsamples 8x, like the real models: 16 x 16 latents).
TWIN_SEED = 0
TWIN_RESOLUTION = 128
# The UNet's attention projections: what the LoRA trains in SD-1.x/2.x and SDXL alike.
UNET_ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")

# Conditioning for a training step: the text embeddings the UNet cross-attends to, and the
# UNet's added conditioning (`added_cond_kwargs`: SDXL's pooled embedding and time ids) or None.
Conditioning = tuple[Any, "dict[str, Any] | None"]


@dataclass(frozen=True)
class Family:
    """One model family. The pipeline names are diffusers class names; the callables take a
    loaded pipeline of the family.

    name                 "sd", "sdxl": what records and messages call it
    label                how a person calls it ("SD-1.x/2.x", "SDXL")
    text2img, img2img, inpaint   the diffusers pipelines that render it (text2img and inpaint
                         are also what a model_index.json may name; img2img is only made from
                         a loaded pipeline, `img2img_from`)
    components           the model_index.json entries a staged folder needs (`models check`)
    checkpoint_markers   tensor-name prefixes only this family's single-file checkpoints hold
                         (empty: the family of a checkpoint with none of the others' markers)
    lora_targets         the UNet modules the LoRA trains
    latent_channels      channels of the VAE's latents; an inpainting UNet takes 2 x + 1
                         (latents, mask, masked-image latents)
    vae_scaling_factor   the published VAE's latent scale (a loaded VAE's own config is what
                         training reads; the twin is built with this one)
    default_resolution   the side, in pixels, the published base models were trained at
    guidance             "cfg": classifier-free guidance, given as the pipeline's guidance_scale
    kohya_base_version, kohya_architecture   ss_base_model_version and modelspec.architecture
                         of its kohya-format LoRA (engine.diffusion.kohya)
    training_conditioning(pipe, caption, resolution) -> Conditioning, computed once per run
    build_twin(inpaint=False) -> (pipeline, tokenizer vocabulary): the tiny random-weight twin
    """

    name: str
    label: str
    text2img: str
    img2img: str
    inpaint: str
    components: tuple[str, ...]
    checkpoint_markers: tuple[str, ...]
    lora_targets: tuple[str, ...]
    latent_channels: int
    vae_scaling_factor: float
    default_resolution: int
    guidance: str
    kohya_base_version: str
    kohya_architecture: str
    training_conditioning: Callable[[Any, str, int], Conditioning]
    build_twin: Callable[..., tuple[Any, dict[str, int]]]

    @property
    def inpaint_channels(self) -> int:
        """Input channels of an inpainting UNet of this family."""
        return 2 * self.latent_channels + 1

    @property
    def index_classes(self) -> tuple[str, str]:
        """The pipelines a model_index.json of this family may name: text-to-image, inpainting."""
        return self.text2img, self.inpaint

    @property
    def pipeline_classes(self) -> tuple[str, str, str]:
        return self.text2img, self.img2img, self.inpaint

    def is_inpaint(self, class_name: str) -> bool:
        return class_name == self.inpaint

    def img2img_from(self, pipe: Any) -> Any:
        """The image-to-image pipeline on `pipe`'s components (`from_pipe`: no second copy of the weights)."""
        import diffusers

        return getattr(diffusers, self.img2img).from_pipe(pipe)

    def inpaint_from(self, pipe: Any) -> Any:
        """The inpainting pipeline on `pipe`'s components (`from_pipe`; its UNet keeps its channels)."""
        import diffusers

        return getattr(diffusers, self.inpaint).from_pipe(pipe)

    def guidance_kwargs(self, guidance: float) -> dict[str, float]:
        """How the pipeline call takes the guidance a job asks for."""
        if self.guidance == "cfg":
            return {"guidance_scale": guidance}
        raise ValueError(f"family {self.name}: unknown guidance {self.guidance!r}")


def offline_clip_tokenizer() -> tuple[Any, dict[str, int]]:
    """A CLIP tokenizer made with no files and no download, and its vocabulary: every
    byte-level symbol alone and word-final, so any prompt tokenizes with no merges
    (FINDINGS: transformers 5's CLIPTokenizer(vocab=..., merges=[])). Used by the twins and
    by bench/bench_gpu.py's real-size random-weight pipelines."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({f"{symbol}</w>": len(alphabet) + index for index, symbol in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), vocab
