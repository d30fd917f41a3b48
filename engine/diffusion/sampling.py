"""What the verify and render stages share: rendering a batch of seeds, loading the job's
LoRA into the shared pipeline (and taking it out again), naming and labelling a render.
(Scoring a render's identity is engine.identity.faces.score.)"""

from __future__ import annotations

import contextlib
import math
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from engine.diffusion.families import family_of

IDENTITY_ADAPTER = "identity"


@contextlib.contextmanager
def identity_lora(pipe: Any, lora: Path) -> Iterator["LoraSwitch"]:
    """A LoRA (a folder in diffusers' layout, or one .safetensors file) loaded into `pipe` for
    the duration of the block, then removed, so the pipeline goes back to the next job as it
    came; removed as well when loading fails half-way."""
    try:
        pipe.load_lora_weights(str(lora), adapter_name=IDENTITY_ADAPTER)
    except BaseException:
        if IDENTITY_ADAPTER in getattr(pipe, "get_list_adapters", lambda: {})().get("unet", []):
            pipe.enable_lora()
            pipe.delete_adapters(IDENTITY_ADAPTER)
        raise
    try:
        yield LoraSwitch(pipe)
    finally:
        # Enabled again before it goes: `disable_lora` is a flag on the LoRA layers that outlives
        # the adapter, and a block that ended with the LoRA off (a control render, a demo realism
        # pass, an interruption) left every later adapter of the pipeline without effect.
        pipe.enable_lora()
        pipe.delete_adapters(IDENTITY_ADAPTER)


class LoraSwitch:
    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def weight(self, weight: float) -> None:
        """LoRA on at `weight` (1.0 = as trained); 0.0 renders exactly the base model."""
        self._pipe.enable_lora()
        self._pipe.set_adapters([IDENTITY_ADAPTER], adapter_weights=[weight])

    def off(self) -> None:
        self._pipe.disable_lora()


def render(
    pipe: Any,
    prompt: str,
    negative_prompt: str,
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    size: int,
    init_images: np.ndarray | None = None,
    img2img: Any = None,
    strength: float = 0.5,
    on_step: Callable[[], None] | None = None,
    ip_adapter_image_embeds: list[Any] | None = None,
) -> np.ndarray:
    """Render one image per seed in one batched call: N x H x W x 3 uint8.

    Each seed has its own CPU torch.Generator, so a seed gives the same image on any device
    and in any batch (to within ~1 grey level on CPU, where kernels depend on batch size).
    With `init_images` the call is image-to-image at `strength`, through `img2img`: the pipeline
    engine.resources made from `pipe` (the same components, LoRA included). `on_step` is
    called after every denoising step (the stage's stop check: what it raises ends the call, so
    a SIGTERM waits for one step, not for the whole image). `ip_adapter_image_embeds`: a loaded
    FaceID adapter's conditioning (engine.identity.faceid.FaceIDSwitch.embeds), shared by every seed.
    """
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
    count = len(seeds)
    common = dict(
        prompt=[prompt] * count,
        negative_prompt=[negative_prompt] * count,
        generator=generators,
        num_inference_steps=steps,
        output_type="np",
        **family_of(pipe).guidance_kwargs(guidance),  # CFG scale in SD and SDXL
    )
    if on_step is not None:
        def after_step(_pipe: Any, _step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step()
            return tensors

        common["callback_on_step_end"] = after_step
    if ip_adapter_image_embeds is not None:
        common["ip_adapter_image_embeds"] = [e.to(pipe.unet.device, pipe.unet.dtype) for e in ip_adapter_image_embeds]
    if init_images is None:
        result = pipe(height=size, width=size, **common)
    else:
        if img2img is None:
            raise ValueError("init_images needs the img2img pipeline of `pipe` (engine.resources.Resources.img2img)")
        images = torch.from_numpy(init_images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        # img2img denoises int(steps x strength) steps: never let that be zero.
        common["num_inference_steps"] = max(steps, math.ceil(1.0 / strength))
        result = img2img(image=images, strength=strength, **common)
    return np.clip(np.rint(np.asarray(result.images) * 255.0), 0, 255).astype(np.uint8)


def inpaint(
    pipe: Any,
    prompt: str,
    negative_prompt: str,
    seeds: Sequence[int],
    image: np.ndarray,
    mask: np.ndarray,
    *,
    steps: int,
    guidance: float,
    strength: float,
    on_step: Callable[[], None] | None = None,
) -> np.ndarray:
    """Inpaint `image` (H x W x 3 uint8, H and W the model's size) where `mask` (H x W bool) is set,
    one image per seed in one batched call: N x H x W x 3 uint8. Each seed has its own CPU
    generator (as `render`). The pipeline decodes the whole image, so pixels outside the mask
    change too: callers paste the result back through their own alpha (engine.measure.texture.composite)."""
    count = len(seeds)
    height, width = image.shape[:2]
    images = torch.from_numpy(np.repeat(image[None].astype(np.float32) / 255.0, count, axis=0)).permute(0, 3, 1, 2)
    masks = torch.from_numpy(np.repeat(mask[None, None].astype(np.float32), count, axis=0))
    options: dict[str, Any] = {}
    if on_step is not None:
        def after_step(_pipe: Any, _step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step()
            return tensors

        options["callback_on_step_end"] = after_step
    result = pipe(prompt=[prompt] * count, negative_prompt=[negative_prompt] * count, image=images, mask_image=masks, height=height, width=width,
                  strength=strength, num_inference_steps=steps, **family_of(pipe).guidance_kwargs(guidance),
                  generator=[torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds], output_type="np", **options)
    return np.clip(np.rint(np.asarray(result.images) * 255.0), 0, 255).astype(np.uint8)


def inpaint_in_photo(pipe: Any, picture: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int], size: int, prompt: str,
                     negative_prompt: str, seeds: Sequence[int], *, steps: int, guidance: float, strength: float,
                     on_step: Callable[[], None] | None = None) -> list[np.ndarray]:
    """`inpaint` on the square `box` (x0, y0, x1, y1) of a photo at its native size: the square is
    scaled to the model's `size`, inpainted where `mask` (the photo's size) is set (grown by one
    model pixel, so the repaint reaches past the caller's feathered edge), and scaled back into a
    full-size copy per seed. The caller pastes each back through its own alpha."""
    x0, y0, x1, y1 = box
    crop = cv2.resize(picture[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)
    small = cv2.resize(mask[y0:y1, x0:x1].astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    small = cv2.dilate(small, np.ones((3, 3), np.uint8)).astype(bool)
    made = inpaint(pipe, prompt, negative_prompt, seeds, crop, small, steps=steps, guidance=guidance, strength=strength, on_step=on_step)
    out = []
    for image in made:
        full = picture.copy()
        full[y0:y1, x0:x1] = cv2.resize(image, (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC)
        out.append(full)
    return out


def square_around(support: np.ndarray, margin: float, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The square (x0, y0, x1, y1) around the set pixels of `support`, grown by `margin` px, inside a photo of `shape`."""
    height, width = shape
    if not support.any():
        return 0, 0, min(width, height), min(width, height)
    ys, xs = np.nonzero(support)
    cx, cy = (xs.min() + xs.max()) / 2.0, (ys.min() + ys.max()) / 2.0
    side = min(int(np.ceil(max(xs.max() - xs.min(), ys.max() - ys.min()) + 2 * margin)), width, height)
    x0 = int(np.clip(round(cx - side / 2.0), 0, width - side))
    y0 = int(np.clip(round(cy - side / 2.0), 0, height - side))
    return x0, y0, x0 + side, y0 + side


def drift_label(value: float | None) -> str:
    return "noface" if value is None else f"{value:.4f}"


def png_text(**fields: Any) -> dict[str, str]:
    """PNG text chunks: strings as they are, everything else as JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value, sort_keys=True) for key, value in fields.items()}
