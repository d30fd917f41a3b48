"""Photos from the wild through `engine.images.load_photo`, then a few through `prepare`.

Every mode Pillow writes (greyscale, alpha, palette, 1-bit, 16-bit, CMYK), PNG/JPEG/WebP, all 8
EXIF orientations, animated PNG/WebP, the wrong extension, and damage: truncation, zero bytes,
flipped bytes, junk before or after, headers that declare 100000 x 100000 pixels. Each gives an
upright 8-bit RGB array equal to what was encoded (lossless formats exactly), or a JobError
naming the file; nothing else.

What a lab gets, decided here and documented in engine/images.py: the extension does not
matter (PNG bytes named .jpg are read as the PNG they are); an animated PNG or WebP gives its
first frame (the frame count goes to prepare.json); GIF, TIFF, BMP are refused as unsupported.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.errors import JobError
from engine.images import load_photo, png_bytes
from tests.harness.jobs import PREPARE_JOB
from tests.harness.strategies import IMAGE_CODES, check_error, check_failed_copy, tree_snapshot

IMAGES = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
MAX_PIXELS = 40_000_000
WHITE = (255, 255, 255)

# ---- encoding, and what decoding must give (spelled out here, not taken from engine.images) ----


def exif_bytes(orientation: int) -> bytes:
    """A minimal little-endian EXIF block holding only the orientation tag (SHORT)."""
    entry = struct.pack("<HHI", 0x0112, 3, 1) + struct.pack("<HH", orientation, 0)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + struct.pack("<I", 0)


def stored_for(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for an `upright` scene with this EXIF orientation, from the
    EXIF definition (which side of the scene row 0 and column 0 of the stored image show)."""
    return {
        1: lambda u: u,
        2: lambda u: u[:, ::-1],  # row 0 top, column 0 right
        3: lambda u: u[::-1, ::-1],  # row 0 bottom, column 0 right
        4: lambda u: u[::-1, :],  # row 0 bottom, column 0 left
        5: lambda u: u.swapaxes(0, 1),  # row 0 left, column 0 top
        6: lambda u: u[:, ::-1].swapaxes(0, 1),  # row 0 right, column 0 top
        7: lambda u: u[::-1, ::-1].swapaxes(0, 1),  # row 0 right, column 0 bottom
        8: lambda u: u[::-1, :].swapaxes(0, 1),  # row 0 left, column 0 bottom
    }[orientation](upright)


def encode(image: Image.Image | list[Image.Image], fmt: str, orientation: int | None) -> bytes:
    frames = image if isinstance(image, list) else [image]
    options: dict = {}
    if orientation is not None:
        options["exif"] = exif_bytes(orientation)
    if len(frames) > 1:
        options.update(save_all=True, append_images=frames[1:])
    if fmt == "WEBP_LOSSLESS":
        fmt, options["lossless"] = "WEBP", True
    if fmt == "JPEG":
        options["quality"] = 95
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, **options)
    return buffer.getvalue()


def as_rgb(image: Image.Image) -> np.ndarray:
    """What an 8-bit RGB reading of `image` must be: alpha over white, 16 bits scaled to 8."""
    if image.mode == "I;16":
        values = np.asarray(image, dtype=np.float64)
        return np.repeat(np.rint(values / 65535 * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
        alpha = rgba[:, :, 3:] / 255.0
        return np.rint(rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


MODES = {
    "PNG": ["RGB", "L", "LA", "RGBA", "P", "P+transparency", "1", "I;16"],
    "WEBP_LOSSLESS": ["RGB", "RGBA"],
    "WEBP": ["RGB"],
    "JPEG": ["RGB", "L", "CMYK"],
}
LOSSLESS = {"PNG", "WEBP_LOSSLESS"}


def make_image(rgb: np.ndarray, mode: str) -> Image.Image:
    image = Image.fromarray(rgb)
    if mode == "I;16":
        grey = np.asarray(image.convert("L"), dtype=np.uint16)
        image16 = Image.fromarray(grey * 257 + (grey % 7))  # all 16 bits used
        assert image16.mode == "I;16"
        return image16
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(((np.arange(rgb.shape[0] * rgb.shape[1]) * 37) % 256).astype(np.uint8).reshape(rgb.shape[:2]))
        converted = image.convert(mode)
        converted.putalpha(alpha)
        return converted
    if mode == "P+transparency":
        paletted = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        paletted.info["transparency"] = 3
        return paletted
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return image.convert(mode)


@st.composite
def photos(draw):
    """(file bytes, the decoded RGB it must give or None when lossy, stored size, frames, format name)."""
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Smooth content, so that lossy formats stay close to it.
    small = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    upright_source = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    orientation = draw(st.sampled_from([None, 1, 2, 3, 4, 5, 6, 7, 8]))
    stored_rgb = np.ascontiguousarray(stored_for(upright_source, orientation or 1))
    image = make_image(stored_rgb, mode)
    frames = draw(st.integers(1, 3)) if fmt != "JPEG" and mode not in ("P", "P+transparency", "1", "I;16") else 1
    # Later frames differ from the first and from each other (encoders merge equal frames).
    extra = [make_image((stored_rgb.astype(np.int64) + 85 * k).astype(np.uint8), mode) for k in range(1, frames)]
    data = encode([image, *extra] if extra else image, fmt, orientation)
    expected = stored_for_inverse(as_rgb(image), orientation or 1) if fmt in LOSSLESS else None
    return data, expected, image.size, frames, "webp" if fmt.startswith("WEBP") else fmt.lower(), upright_source


def stored_for_inverse(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The upright scene from stored pixels: the inverse of `stored_for`."""
    return {
        1: lambda s: s,
        2: lambda s: s[:, ::-1],
        3: lambda s: s[::-1, ::-1],
        4: lambda s: s[::-1, :],
        5: lambda s: s.swapaxes(0, 1),
        6: lambda s: s.swapaxes(0, 1)[:, ::-1],
        7: lambda s: s.swapaxes(0, 1)[::-1, ::-1],
        8: lambda s: s.swapaxes(0, 1)[::-1, :],
    }[orientation](stored)


damage = st.one_of(
    st.just(("none", 0)),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.99)),
    st.tuples(st.just("flip"), st.floats(0.0, 1.0)),
    st.tuples(st.just("junk_after"), st.integers(1, 64)),
    st.tuples(st.just("junk_before"), st.integers(1, 64)),
    st.just(("zero", 0)),
)


def apply(data: bytes, how: tuple[str, float]) -> bytes:
    kind, amount = how
    if kind == "truncate":
        return data[: int(len(data) * amount)]
    if kind == "flip":
        at = min(len(data) - 1, int(len(data) * amount))
        return data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1 :]
    if kind == "junk_after":
        return data + bytes(range(int(amount)))
    if kind == "junk_before":
        return bytes(range(1, int(amount) + 1)) + data
    if kind == "zero":
        return b""
    return data


def load_or_error(data: bytes, name: str, max_pixels: int = MAX_PIXELS):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / name
        path.write_bytes(data)
        try:
            photo = load_photo(path, name, max_pixels, WHITE)
        except JobError as error:
            check_error(error, IMAGE_CODES, (name,))
            return error
        assert path.read_bytes() == data, "load_photo changed its input"
    assert photo.rgb.dtype == np.uint8 and photo.rgb.ndim == 3 and photo.rgb.shape[2] == 3 and photo.rgb.flags.c_contiguous
    json.dumps(photo.facts(), allow_nan=False)  # goes into prepare.json
    return photo


# ---- load_photo --------------------------------------------------------------------------


@IMAGES
@given(photo=photos(), extension=st.sampled_from([".png", ".jpg", ".webp", ".JPEG", ".txt"]), how=damage)
def test_any_photo_decodes_upright_or_is_named(photo, extension, how):
    data, expected, (width, height), frames, fmt, upright_source = photo
    result = load_or_error(apply(data, how), "photo" + extension)
    if how[0] in ("none", "junk_after"):
        assert not isinstance(result, JobError), f"an intact {fmt} was refused: {result}"
        assert result.format == fmt and result.frames == frames and result.original_size == (width, height)
        if expected is not None:
            assert result.rgb.shape == expected.shape
            assert np.abs(result.rgb.astype(int) - expected.astype(int)).max() <= 1, "decoded pixels differ from the encoded ones"
        else:  # lossy: close to the (upright) original, and the right way up
            assert result.rgb.shape[:2] == upright_source.shape[:2]
    elif how[0] == "zero":  # 0 bytes: an incomplete copy, said as such (not "not an image")
        assert isinstance(result, JobError) and result.code == "empty_file"
    if not isinstance(result, JobError):  # a flipped byte may be a new size in the header: still within the limit
        h, w = result.rgb.shape[:2]
        assert w * h <= MAX_PIXELS and result.original_size[0] * result.original_size[1] == w * h


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP_LOSSLESS"])
def test_every_exif_orientation_ends_upright(face_rgb, orientation, fmt):
    """A non-square real photo stored as a camera stores it for each orientation."""
    upright = np.ascontiguousarray(face_rgb[:, 32:224])  # 256 x 192: rotations are told apart
    stored = np.ascontiguousarray(stored_for(upright, orientation))
    result = load_or_error(encode(Image.fromarray(stored), fmt, orientation), f"o{orientation}.img")
    assert not isinstance(result, JobError), result
    assert result.exif_orientation == orientation
    assert result.rgb.shape == upright.shape
    difference = np.abs(result.rgb.astype(int) - upright.astype(int))
    assert (difference.max() == 0) if fmt != "JPEG" else (difference.mean() < 3.0), f"orientation {orientation} not made upright"


def _raw_exif(kind: int, count: int, value: bytes) -> bytes:
    entry = struct.pack("<HHI", 0x0112, kind, count) + value
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + struct.pack("<I", 0)


@pytest.mark.parametrize("exif, orientation", [
    (_raw_exif(2, 4, b"abc\x00"), 1),  # ASCII where a number belongs
    (_raw_exif(5, 1, struct.pack("<I", 8)), 1),  # a RATIONAL
    (_raw_exif(3, 1, struct.pack("<HH", 9, 0)), 1),  # out of range
    (_raw_exif(4, 1, struct.pack("<I", 70_000)), 1),
    (_raw_exif(3, 1, struct.pack("<HH", 0, 0)), 1),
    (_raw_exif(7, 4, b"\x06\x00\x00\x00"), 1),  # UNDEFINED: bytes, which no JSON can hold
    (_raw_exif(3, 5, struct.pack("<I", 0xFFFFFFF0)), 1),  # an offset far past the end
    (b"Exif\x00\x00II*\x00\xff\xff\xff\xff", 1),  # a first IFD past the end
    (b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00", 1),  # cut mid-entry
], ids=["ascii", "rational", "nine", "long", "zero", "undefined", "far-offset", "far-ifd", "cut"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP_LOSSLESS"])
def test_damaged_exif_costs_the_rotation_hint_only(face_rgb, exif, orientation, fmt):
    buffer = io.BytesIO()
    Image.fromarray(face_rgb).save(buffer, format="WEBP" if fmt.startswith("WEBP") else fmt, exif=exif,
                                   **({"lossless": True} if fmt.startswith("WEBP") else {}))
    result = load_or_error(buffer.getvalue(), "odd-exif.img")
    assert not isinstance(result, JobError), result
    assert result.exif_orientation == orientation and result.rgb.shape == face_rgb.shape


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_only(fmt: str, width: int, height: int) -> bytes:
    """A tiny file whose header declares width x height pixels, with (almost) no pixel data."""
    if fmt == "png":
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00")) + _png_chunk(b"IEND", b"")
    if fmt == "jpeg":
        sof = struct.pack(">BHHB", 8, height, width, 3) + b"".join(struct.pack(">BBB", i, 0x11, 0) for i in (1, 2, 3))
        return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"
    if fmt == "webp":
        vp8x = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
        return b"RIFF" + struct.pack("<I", len(body)) + body
    if fmt == "gif":
        return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b";"
    raise ValueError(fmt)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(fmt=st.sampled_from(["png", "jpeg", "webp", "gif"]), width=st.integers(1, 65535), height=st.integers(1, 65535),
       huge=st.booleans(), max_pixels=st.sampled_from([1_000_000, MAX_PIXELS]))
def test_pixel_bomb_headers_are_refused_before_decoding(fmt, width, height, huge, max_pixels):
    if huge:
        width, height = {"png": (100_000, 100_000), "webp": (16_777_216, 16_777_216)}.get(fmt, (65535, 65535))
    result = load_or_error(header_only(fmt, width, height), f"bomb.{'jpg' if fmt == 'png' else 'png'}", max_pixels)
    assert isinstance(result, JobError), "a header with no pixels behind it was accepted"
    if width * height > max_pixels and fmt in ("png", "jpeg"):
        assert result.code == "pixel_limit", result
        assert f"{max_pixels:,}" in result.message or "decompression bomb" in result.message


def _rgb16_png(rgb: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", rgb[:, :, ::-1].astype(np.uint16) * 257)
    assert ok
    return buffer.tobytes()


def test_deep_colour_and_print_modes_keep_their_pixels(face_rgb):
    """16-bit RGB PNG (as scanners write), I;16 greyscale, CMYK JPEG (as print workflows write)."""
    photo = load_or_error(_rgb16_png(face_rgb), "scan16.png")
    assert not isinstance(photo, JobError) and np.array_equal(photo.rgb, face_rgb)
    grey16 = (np.asarray(Image.fromarray(face_rgb).convert("L"), dtype=np.uint16) * 257)
    photo = load_or_error(encode(Image.fromarray(grey16), "PNG", None), "grey16.png")
    assert not isinstance(photo, JobError) and photo.original_mode == "I;16"
    assert np.array_equal(photo.rgb[:, :, 0], np.asarray(Image.fromarray(face_rgb).convert("L")))
    photo = load_or_error(encode(Image.fromarray(face_rgb).convert("CMYK"), "JPEG", None), "print.jpg")
    assert not isinstance(photo, JobError) and photo.original_mode == "CMYK"
    assert np.abs(photo.rgb.astype(int) - face_rgb.astype(int)).mean() < 4.0, "CMYK colours came back wrong"


@pytest.mark.parametrize("name, data, code", [
    ("anim.gif", None, "unsupported_image"),
    ("ztxt-bomb.png", "ztxt", "unreadable_image"),
    ("text.png", b"this is not an image\n", "unreadable_image"),
    ("photo.tiff.jpg", "tiff", "unsupported_image"),
])
def test_refused_kinds_say_what_they_are(face_rgb, name, data, code):
    if data is None:
        frames = [Image.fromarray(face_rgb), Image.fromarray(255 - face_rgb)]
        data = encode(frames, "GIF", None)
    elif data == "ztxt":  # a 4x4 PNG whose text chunk inflates to 5 MB
        ihdr = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
        data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * 5_000_000))
                + _png_chunk(b"IEND", b""))
    elif data == "tiff":
        data = encode(Image.fromarray(face_rgb), "TIFF", None)
    result = load_or_error(data, name)
    assert isinstance(result, JobError) and result.code == code, result


# ---- through prepare, on a real face -----------------------------------------------------


def _prepare_cases(face_rgb: np.ndarray) -> dict[str, tuple[str, bytes]]:
    landscape = np.ascontiguousarray(stored_for(face_rgb, 6))
    anim = [Image.fromarray(face_rgb), Image.fromarray(np.zeros_like(face_rgb))]
    jpeg = encode(Image.fromarray(face_rgb), "JPEG", None)
    return {
        "cmyk": ("a.jpg", encode(Image.fromarray(face_rgb).convert("CMYK"), "JPEG", None)),
        "rgb16": ("a.png", _rgb16_png(face_rgb)),
        "orientation6": ("a.jpg", encode(Image.fromarray(landscape), "JPEG", 6)),
        "orientation8": ("a.png", encode(Image.fromarray(np.ascontiguousarray(stored_for(face_rgb, 8))), "PNG", 8)),
        "animated_webp": ("a.webp", encode(anim, "WEBP_LOSSLESS", None)),
        "png_named_jpg": ("a.jpg", png_bytes(face_rgb)),
        "jpeg_named_png": ("a.png", jpeg),
        "truncated": ("a.jpg", jpeg[: len(jpeg) // 2]),
        "zero_bytes": ("a.png", b""),
        "gif_named_png": ("a.png", encode(Image.fromarray(face_rgb).convert("P"), "GIF", None)),
        "bomb_named_jpg": ("a.jpg", header_only("png", 100_000, 100_000)),
    }


PREPARED = {"cmyk": ("jpeg", 1), "rgb16": ("png", 1), "orientation6": ("jpeg", 6), "orientation8": ("png", 8),
            "animated_webp": ("webp", 1), "png_named_jpg": ("png", 1), "jpeg_named_png": ("jpeg", 1)}
REFUSED = {"truncated": "truncated_image", "zero_bytes": "empty_file", "gif_named_png": "unsupported_image", "bomb_named_jpg": "pixel_limit"}


@pytest.mark.parametrize("case", [*PREPARED, *REFUSED])
def test_photos_through_prepare(tmp_path, fuzz_engine, face_rgb, case):
    name, data = _prepare_cases(face_rgb)[case]
    source = tmp_path / "alice"
    source.mkdir()
    (source / name).write_bytes(data)
    (source / "job.toml").write_text(PREPARE_JOB, encoding="utf-8")
    before = tree_snapshot(source)
    result = fuzz_engine.run_job(source, tmp_path / "outbox", until="prepare")
    assert tree_snapshot(source) == before, "the engine changed its input"
    if case in REFUSED:
        error = check_failed_copy(result, before, {REFUSED[case]}, (name,))
        assert error["code"] == REFUSED[case]
        return
    assert result.outcome == "partial", result.error
    (photo,) = json.loads((result.output_dir / "prepared" / "prepare.json").read_text())["photos"]
    fmt, orientation = PREPARED[case]
    assert photo["decode"]["format"] == fmt and photo["decode"]["exif_orientation"] == orientation
    assert photo["decode"]["size"] == [256, 256]
    if case == "animated_webp":
        assert photo["decode"]["frames"] == 2
    # The face is upright in the prepared image: both eyes above the mouth corners.
    left_eye, right_eye, _nose, mouth_left, mouth_right = photo["images"][0]["keypoints"]
    assert max(left_eye[1], right_eye[1]) < min(mouth_left[1], mouth_right[1]), f"face not upright: {photo['images'][0]['keypoints']}"
    assert left_eye[0] < right_eye[0], "face mirrored"
