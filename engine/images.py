"""Safe photo decoding and deterministic PNG writing.

Photos come from outside (a network share, a phone, a scanner): the pixel count is checked
from the header before any pixel is decoded, truncated or non-image files become a clear
`JobError`, EXIF orientation is applied, and every mode (CMYK, 16-bit, palette, alpha) ends
as 8-bit RGB.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from engine.errors import JobError

ACCEPTED_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Photo:
    """A decoded photo: 8-bit RGB pixels, upright, plus what decoding found."""

    name: str
    rgb: np.ndarray  # H x W x 3, uint8
    format: str
    original_size: tuple[int, int]  # (width, height) as stored, before EXIF rotation
    exif_orientation: int
    original_mode: str
    frames: int

    def facts(self) -> dict[str, object]:
        return {
            "format": self.format,
            "original_size": list(self.original_size),
            "size": [int(self.rgb.shape[1]), int(self.rgb.shape[0])],
            "exif_orientation": self.exif_orientation,
            "original_mode": self.original_mode,
            "frames": self.frames,
        }


def load_photo(path: Path, name: str, max_pixels: int, fill_rgb: tuple[int, ...] = (255, 255, 255)) -> Photo:
    """Decode `path` safely into an upright RGB array. `name` is how errors refer to the file."""
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise JobError("unreadable_image", f"{name}: not an image Pillow can read (jpg, png or webp expected)") from None
    except Image.DecompressionBombError as exc:
        raise JobError("pixel_limit", f"{name}: refused as a decompression bomb ({exc}); photos may have at most {max_pixels:,} pixels (config input.max_pixels)") from None
    except OSError as exc:
        raise JobError("unreadable_image", f"{name}: cannot be opened ({exc})") from None
    with image:
        if image.format not in ACCEPTED_FORMATS:
            raise JobError("unsupported_image", f"{name}: is a {image.format} file; jpg, png or webp are accepted")
        width, height = image.size
        if width * height > max_pixels:
            raise JobError(
                "pixel_limit",
                f"{name}: {width}x{height} = {width * height:,} pixels is above the limit of {max_pixels:,} (config input.max_pixels)",
                details={"width": width, "height": height, "max_pixels": max_pixels},
            )
        if width == 0 or height == 0:
            raise JobError("unreadable_image", f"{name}: has no pixels ({width}x{height})")
        frames = int(getattr(image, "n_frames", 1))
        orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
        mode = image.mode
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.seek(0)
                image.load()
                upright = ImageOps.exif_transpose(image)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise JobError("pixel_limit", f"{name}: refused as a decompression bomb ({exc}); photos may have at most {max_pixels:,} pixels (config input.max_pixels)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            truncated = "truncated" in str(exc).lower() or isinstance(exc, EOFError)
            raise JobError(
                "truncated_image" if truncated else "unreadable_image",
                f"{name}: the file is {'truncated (incomplete copy?)' if truncated else 'damaged'}: {exc}",
            ) from None
        rgb = _to_rgb(upright, fill_rgb)
    return Photo(
        name=name,
        rgb=rgb,
        format=ACCEPTED_FORMATS[image.format],
        original_size=(width, height),
        exif_orientation=orientation,
        original_mode=mode,
        frames=frames,
    )


def _to_rgb(image: Image.Image, fill_rgb: tuple[int, ...]) -> np.ndarray:
    """8-bit RGB from any Pillow mode: 16-bit scaled (not clipped), alpha composited on `fill_rgb`."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values * (255.0 if values.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, tuple(fill_rgb) + (255,))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def png_bytes(rgb: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """Deterministic PNG bytes (no timestamps), with optional tEXt/iTXt metadata."""
    import io

    info = PngImagePlugin.PngInfo()
    for key, value in sorted((text or {}).items()):
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", pnginfo=info, compress_level=6)
    return buffer.getvalue()


def read_rgb(path: Path) -> np.ndarray:
    """Read one of our own PNGs back (trusted: written by this engine)."""
    with Image.open(path) as image:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
