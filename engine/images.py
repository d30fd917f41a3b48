"""Safe photo decoding and deterministic PNG writing.

Photos come from outside (a network share, a phone, a scanner): the pixel count is checked
from the header before any pixel is decoded, truncated or non-image files become a clear
`JobError`, EXIF orientation is applied, and every mode (CMYK, 16-bit, palette, alpha) ends
as 8-bit RGB. An animated PNG or WebP gives its first frame (the frame count is recorded in
`Photo.frames`, hence prepare.json): the same file always gives the same pixels, and a
burst or "live photo" still shows the subject. GIF is not accepted (it holds 256 colours:
not evidence-grade).
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

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
    bomb = f"photos may have at most {max_pixels:,} pixels (config input.max_pixels)"
    if Path(path).stat().st_size == 0:
        raise JobError("empty_file", f"{name}: is empty (0 bytes): a copy that did not complete, or a placeholder; drop the photo again")
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 M pixels on; our own limit (config) is checked right below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": only the rotation hint is lost
            image = Image.open(path)
    except UnidentifiedImageError:
        raise JobError("unreadable_image", f"{name}: not an image Pillow can read (jpg, png or webp expected)") from None
    except Image.DecompressionBombError as exc:
        raise JobError("pixel_limit", f"{name}: refused as a decompression bomb ({exc}); {bomb}") from None
    except _DECODE_ERRORS as exc:
        raise JobError("unreadable_image", f"{name}: cannot be opened: damaged or incomplete ({exc})") from None
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
        mode = image.mode
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                warnings.simplefilter("ignore", UserWarning)  # Pillow's "Corrupt EXIF data": handled below
                frames = int(getattr(image, "n_frames", 1))
                image.seek(0)  # an animated PNG/WebP: its first frame
                image.load()
                orientation = _exif_orientation(image)
                upright = image.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else image
                rgb = _to_rgb(upright, fill_rgb)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise JobError("pixel_limit", f"{name}: refused as a decompression bomb ({exc}); {bomb}") from None
        except _DECODE_ERRORS as exc:
            truncated = "truncated" in str(exc).lower() or isinstance(exc, EOFError)
            raise JobError(
                "truncated_image" if truncated else "unreadable_image",
                f"{name}: the file is {'truncated (incomplete copy?)' if truncated else 'damaged'}: {exc}",
            ) from None
    return Photo(
        name=name,
        rgb=rgb,
        format=ACCEPTED_FORMATS[image.format],
        original_size=(width, height),
        exif_orientation=orientation,
        original_mode=mode,
        frames=frames,
    )


# What Pillow raises on damaged files: OSError from decoders, SyntaxError/struct.error from
# parsers, ValueError for a PNG text chunk that inflates past Pillow's limit, EOFError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)

# EXIF orientation -> the transpose that makes the photo upright (1: already upright).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation 1-8; 1 when absent or not a valid value (damaged EXIF is common
    and harmless: it only loses the rotation hint)."""
    value = image.getexif().get(_EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


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
