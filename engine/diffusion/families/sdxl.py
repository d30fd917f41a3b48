"""SDXL: two text encoders (CLIP ViT-L and OpenCLIP bigG, the second with a projection whose
pooled output conditions the UNet with six size/crop numbers, the "time ids"), a 4-channel
latent space at another scale than SD's, CFG, 1024-px base models.

Its tiny twin has the same shape at toy size: a 2-block UNet with `addition_embed_type="text_time"`
cross-attending to both encoders' hidden states side by side, two 2-layer CLIP text encoders
(the second `CLIPTextModelWithProjection`), SD's twin VAE at SDXL's latent scale, DDIM with the
noise schedule SD and SDXL share; random weights from a fixed seed. The tests build it (and its
inpainting twin) through `build_twin`.
"""

from __future__ import annotations

from typing import Any

from engine.diffusion.families.family import TWIN_RESOLUTION, TWIN_SEED, UNET_ATTENTION, Conditioning, Family, offline_clip_tokenizer
from engine.diffusion.families.sd import noise_schedule

TWIN_TEXT_HIDDEN = 32  # each twin text encoder's width; the UNet cross-attends to both: 2 x this
TWIN_TIME_EMBED = 8  # the twin UNet's embedding width per time id


def training_conditioning(pipe: Any, caption: str, resolution: int) -> Conditioning:
    """Both encoders' embeddings of the caption, and the UNet's added conditioning: the pooled
    embedding of the second encoder and the time ids (original size, crop's top-left corner,
    target size) of a whole, uncropped square training image of `resolution` px."""
    import torch

    device = pipe.unet.device
    embeds, _negative, pooled, _negative_pooled = pipe.encode_prompt(prompt=caption, device=device, num_images_per_prompt=1,
                                                                      do_classifier_free_guidance=False)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=embeds.dtype, device=device)
    return embeds, {"text_embeds": pooled, "time_ids": time_ids}


def build_twin(inpaint: bool = False) -> tuple[Any, dict[str, int]]:
    """The tiny StableDiffusionXLPipeline (with `inpaint`, its StableDiffusionXLInpaintPipeline twin:
    the same encoders, VAE and tokenizers, a 9-channel UNet), and its tokenizers' vocabulary."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, vocab = offline_clip_tokenizer()
    text_config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=TWIN_TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, projection_dim=TWIN_TEXT_HIDDEN,
                                 bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    with torch.random.fork_rng(devices=[]):  # the fixed seeds must not disturb the caller's global RNG stream
        torch.manual_seed(TWIN_SEED)
        unet = UNet2DConditionModel(
            sample_size=TWIN_RESOLUTION // 8,
            in_channels=SDXL.inpaint_channels if inpaint else SDXL.latent_channels,
            out_channels=SDXL.latent_channels,
            block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            cross_attention_dim=2 * TWIN_TEXT_HIDDEN,  # the two text encoders' hidden states side by side
            addition_embed_type="text_time", addition_time_embed_dim=TWIN_TIME_EMBED,
            projection_class_embeddings_input_dim=6 * TWIN_TIME_EMBED + TWIN_TEXT_HIDDEN,  # six time ids + the pooled embedding
        )
        torch.manual_seed(TWIN_SEED)
        vae = AutoencoderKL(
            sample_size=TWIN_RESOLUTION, in_channels=3, out_channels=3, latent_channels=SDXL.latent_channels,
            block_out_channels=(8, 16, 32, 32),  # 4 blocks: 3 downsamplings = SDXL's 8x
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=8, scaling_factor=SDXL.vae_scaling_factor,
        )
        torch.manual_seed(TWIN_SEED)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(TWIN_SEED + 1)  # another draw than the first encoder's
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
    components = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
                      unet=unet, scheduler=noise_schedule())
    if inpaint:
        return StableDiffusionXLInpaintPipeline(**components, requires_aesthetics_score=False), vocab
    return StableDiffusionXLPipeline(**components), vocab


SDXL = Family(
    name="sdxl",
    label="SDXL",
    text2img="StableDiffusionXLPipeline",
    img2img="StableDiffusionXLImg2ImgPipeline",
    inpaint="StableDiffusionXLInpaintPipeline",
    components=("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    checkpoint_markers=("conditioner.embedders.1.",),  # the second text encoder, in the SGM layout
    lora_targets=UNET_ATTENTION,
    latent_channels=4,
    vae_scaling_factor=0.13025,
    default_resolution=1024,
    guidance="cfg",
    kohya_base_version="sdxl_base_v1-0",
    kohya_architecture="stable-diffusion-xl-v1-base/lora",
    training_conditioning=training_conditioning,
    build_twin=build_twin,
)
