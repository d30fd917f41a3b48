"""Safe decoding: every way a photo can be wrong gives its own clear JobError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.errors import JobError
from engine.images import load_photo, png_bytes, read_rgb
from tests.harness.jobs import png_header_only


def _jpeg(rgb: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _load(path, max_pixels=40_000_000):
    return load_photo(path, path.name, max_pixels)


def test_truncated_jpeg(tmp_path, astronaut_rgb):
    data = _jpeg(astronaut_rgb)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(JobError) as excinfo:
        _load(path)
    assert excinfo.value.code == "truncated_image"
    assert "cut.jpg" in excinfo.value.message and "truncated" in excinfo.value.message


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (70_000, 1_000)])
def test_pixel_bomb_refused_before_decoding(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(width, height))
    with pytest.raises(JobError) as excinfo:
        _load(path)
    assert excinfo.value.code == "pixel_limit"
    assert "bomb.png" in excinfo.value.message and "input.max_pixels" in excinfo.value.message


def test_configured_pixel_limit(tmp_path, astronaut_rgb):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(astronaut_rgb))
    with pytest.raises(JobError) as excinfo:
        _load(path, max_pixels=512 * 512 - 1)
    assert excinfo.value.details == {"width": 512, "height": 512, "max_pixels": 512 * 512 - 1}
    assert _load(path, max_pixels=512 * 512).rgb.shape == (512, 512, 3)


@pytest.mark.parametrize("content", [b"hello, not a photo", b"GIF89a" + b"\x00" * 20])
def test_non_images(tmp_path, content):
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(JobError) as excinfo:
        _load(path)
    assert excinfo.value.code in ("unreadable_image", "unsupported_image")


def test_an_empty_file_is_called_empty_not_a_non_image(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"")
    with pytest.raises(JobError) as excinfo:
        _load(path)
    assert excinfo.value.code == "empty_file" and "photo.jpg" in excinfo.value.message and "0 bytes" in excinfo.value.message
    assert "photo.jpg" in excinfo.value.message


def test_unsupported_format_is_named(tmp_path, astronaut_rgb):
    path = tmp_path / "photo.jpg"
    Image.fromarray(astronaut_rgb).save(path, format="BMP")
    with pytest.raises(JobError) as excinfo:
        _load(path)
    assert excinfo.value.code == "unsupported_image" and "BMP" in excinfo.value.message


def test_wrong_extension_but_good_content_is_decoded(tmp_path, astronaut_rgb):
    path = tmp_path / "photo.jpg"
    path.write_bytes(png_bytes(astronaut_rgb))
    photo = _load(path)
    assert photo.format == "png" and np.array_equal(photo.rgb, astronaut_rgb)


@pytest.mark.parametrize("orientation, expect_shape", [(1, (300, 200)), (6, (200, 300)), (8, (200, 300)), (3, (300, 200))])
def test_exif_orientation_is_applied(tmp_path, orientation, expect_shape):
    rgb = np.zeros((300, 200, 3), dtype=np.uint8)
    rgb[:20, :20] = 255  # a white mark at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    path.write_bytes(_jpeg(rgb, exif=exif.tobytes()))
    photo = _load(path)
    assert photo.exif_orientation == orientation
    assert photo.rgb.shape[:2] == expect_shape
    corners = {"tl": photo.rgb[:10, :10], "tr": photo.rgb[:10, -10:], "bl": photo.rgb[-10:, :10], "br": photo.rgb[-10:, -10:]}
    bright = max(corners, key=lambda k: corners[k].mean())
    # EXIF 6 = rotate 90 CW to view: the stored top-left ends top-right; 8 -> bottom-left; 3 -> bottom-right.
    assert bright == {1: "tl", 6: "tr", 8: "bl", 3: "br"}[orientation]


def test_modes_become_8bit_rgb(tmp_path, astronaut_rgb):
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(astronaut_rgb).convert("CMYK").save(cmyk, format="JPEG", quality=95)
    photo = _load(cmyk)
    assert photo.original_mode == "CMYK" and photo.rgb.dtype == np.uint8 and photo.rgb.shape == (512, 512, 3)
    assert np.abs(photo.rgb.astype(int) - astronaut_rgb.astype(int)).mean() < 12

    grey16 = tmp_path / "g16.png"
    ramp = np.tile(np.linspace(0, 65535, 256), (64, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(grey16)
    photo = _load(grey16)
    assert photo.rgb.shape == (64, 256, 3)
    assert photo.rgb[:, 0].max() == 0 and photo.rgb[:, -1].min() == 255  # scaled, not clipped to white
    assert 120 <= photo.rgb[32, 128, 0] <= 135

    rgba = tmp_path / "rgba.png"
    transparent = np.zeros((32, 32, 4), dtype=np.uint8)
    Image.fromarray(transparent, mode="RGBA").save(rgba)
    assert (load_photo(rgba, "rgba.png", 10**6, (10, 20, 30)).rgb == [10, 20, 30]).all()  # composited on the fill


def test_animated_webp_takes_first_frame(tmp_path):
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True)
    photo = _load(path)
    assert photo.frames == 2 and tuple(photo.rgb[32, 32]) == (255, 0, 0)


def test_png_bytes_are_deterministic_and_carry_text(tmp_path, astronaut_rgb):
    first = png_bytes(astronaut_rgb, {"seed": "7", "demo": "true"})
    assert first == png_bytes(astronaut_rgb, {"demo": "true", "seed": "7"})
    path = tmp_path / "x.png"
    path.write_bytes(first)
    assert np.array_equal(read_rgb(path), astronaut_rgb)
    with Image.open(path) as image:
        assert image.text == {"demo": "true", "seed": "7"}
