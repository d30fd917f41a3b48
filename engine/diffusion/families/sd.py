"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a 4-channel latent space, CFG.

Its tiny twin is the demo model (`python -m engine models demo`, `--demo`): a 2-block UNet,
a 4-block VAE (SD's 8x downsampling), a 2-layer CLIP text encoder, DDIM with SD-1.5's noise
schedule; random weights from a fixed seed, byte-identical on every build.
"""

from __future__ import annotations

from typing import Any

from engine.diffusion.families.family import TWIN_RESOLUTION, TWIN_SEED, UNET_ATTENTION, Conditioning, Family, offline_clip_tokenizer


def training_conditioning(pipe: Any, caption: str, resolution: int) -> Conditioning:
    """The caption's CLIP embeddings; the UNet takes no added conditioning."""
    encoded = pipe.encode_prompt(prompt=caption, device=pipe.unet.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return encoded[0], None


def build_twin(inpaint: bool = False) -> tuple[Any, dict[str, int]]:
    """The tiny StableDiffusionPipeline (with `inpaint`, its StableDiffusionInpaintPipeline twin:
    the same text encoder, VAE and tokenizer, a 9-channel UNet), and its tokenizer's vocabulary."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab = offline_clip_tokenizer()

    # fork_rng: the fixed seeds must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TWIN_SEED)
        unet = UNet2DConditionModel(
            sample_size=TWIN_RESOLUTION // 8,
            in_channels=SD.inpaint_channels if inpaint else SD.latent_channels,
            out_channels=SD.latent_channels,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        torch.manual_seed(TWIN_SEED)
        vae = AutoencoderKL(
            sample_size=TWIN_RESOLUTION,
            in_channels=3,
            out_channels=3,
            latent_channels=SD.latent_channels,
            block_out_channels=(8, 16, 32, 32),  # 4 blocks: 3 downsamplings = SD's 8x
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=8,
        )
        torch.manual_seed(TWIN_SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        )
    scheduler = noise_schedule()
    pipe = (StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline)(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe, vocab


def noise_schedule() -> Any:
    """SD-1.5's noise schedule, as DDIM (the twins of both families use it)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


SD = Family(
    name="sd",
    label="SD-1.x/2.x",
    text2img="StableDiffusionPipeline",
    img2img="StableDiffusionImg2ImgPipeline",
    inpaint="StableDiffusionInpaintPipeline",
    components=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    checkpoint_markers=(),  # an LDM checkpoint with no other family's marker
    lora_targets=UNET_ATTENTION,
    latent_channels=4,
    vae_scaling_factor=0.18215,
    default_resolution=512,
    guidance="cfg",
    kohya_base_version="sd_v1",
    kohya_architecture="stable-diffusion-v1/lora",
    training_conditioning=training_conditioning,
    build_twin=build_twin,
)
