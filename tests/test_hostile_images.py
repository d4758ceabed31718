"""Hostile images: decompression bombs, oversized files, EXIF orientation and 16-bit grey, each a
clear `ImageLoadError` (or the documented behaviour) before anything costly is decoded. Pipes,
devices, empty images, upper-case URLs and the server corpus's image payloads are rows of
tests/hostile_cases.py (run by test_hostile_corpus.py)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from janusvl.errors import ImageLoadError
from janusvl.processing import images_io
from janusvl.processing.images_io import ImageLimits, open_image, to_rgb
from test_hostile_library import png_bytes


def test_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch) -> None:
    big = png_bytes(Image.new("1", (8000, 6000)))  # 48 megapixels in a few kB
    assert len(big) < 100_000

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageLoadError, match=r"^bytes: 8000x6000 is 48,000,000 pixels, more than max_image_pixels \(40,000,000\)"):
        open_image(big)
    data_url = "data:image/png;base64," + base64.b64encode(big).decode()
    with pytest.raises(ImageLoadError, match="^data URL: 8000x6000 is 48,000,000 pixels"):
        open_image(data_url)


def test_a_13000_square_bomb_is_refused(tmp_path: Path) -> None:
    """The issue's case: 13000 x 13000 at one bit per pixel (a 1.3 GB RGB decode) from a tiny file."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(Image.new("1", (13000, 13000))))
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageLoadError, match="169,000,000 pixels"):
        open_image(path)


def test_limits_are_settable(janus, tmp_path: Path) -> None:
    image = Image.new("RGB", (30, 20), "red")  # over max_pixels 599: a row of hostile_cases.py
    assert open_image(image, ImageLimits(max_pixels=600)).size == (30, 20)
    encoded = png_bytes(image)
    with pytest.raises(ImageLoadError, match=rf"^bytes: {len(encoded)} bytes of encoded image, more than max_image_bytes \(10\)"):
        open_image(encoded, ImageLimits(max_bytes=10))
    processor = janus.processor
    old = processor.image_limits
    try:
        processor.image_limits = ImageLimits(max_pixels=100)
        with pytest.raises(ImageLoadError, match="more than max_image_pixels"):
            janus.chat([{"role": "user", "content": [{"type": "image", "image": encoded}]}], max_new_tokens=1)
    finally:
        processor.image_limits = old


def test_from_pretrained_takes_the_image_options(tiny_dir: Path) -> None:
    from janusvl import Janus

    janus = Janus.from_pretrained(tiny_dir, device="cpu", max_image_pixels=1234, max_image_bytes=5678,
                                  exif_transpose=True)
    assert janus.processor.image_limits == ImageLimits(1234, 5678, True)


def test_encoded_size_is_capped_before_reading(tmp_path: Path, monkeypatch) -> None:
    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as f:
        f.truncate(60 * 2**20)  # 60 MiB that take no disk and must not be read
    monkeypatch.setattr(images_io, "_read_at_most", lambda *a: pytest.fail("read"))
    with pytest.raises(ImageLoadError, match=rf"^{sparse}: 62,914,560 bytes of encoded image, more than max_image_bytes"):
        open_image(sparse)
    payload = "A" * (60 * 2**20 // 3 * 4)
    with pytest.raises(ImageLoadError, match="^data URL: .* more than max_image_bytes"):
        open_image("data:image/png;base64," + payload)


def exif_photo(orientation: int) -> bytes:
    """A 40 x 20 JPEG, left half black, whose EXIF says how to turn it upright."""
    image = Image.new("RGB", (40, 20), "white")
    image.paste((0, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_exif_orientation_is_ignored_by_default_and_applied_on_request() -> None:
    photo = exif_photo(6)  # "rotate 90 degrees clockwise to view"
    stored = open_image(photo)
    assert stored.size == (40, 20)  # DeepSeek's pipeline: pixels as stored
    with Image.open(io.BytesIO(photo)) as im:
        assert np.array_equal(np.asarray(stored), np.asarray(im.convert("RGB")))
    upright = open_image(photo, ImageLimits(exif_transpose=True))
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5))[0] < 50 and upright.getpixel((10, 35))[0] > 200  # black half on top


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    values = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    image = open_image(png_bytes(Image.fromarray(values)))
    assert Image.open(io.BytesIO(png_bytes(Image.fromarray(values)))).mode == "I;16"
    want = ((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    got = np.asarray(image)
    assert got.shape == (64, 64, 3) and np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) == 256  # not all white
    wide = Image.fromarray(values.astype(np.int32))  # mode "I", as older Pillow opens 16-bit PNGs
    assert np.array_equal(np.asarray(to_rgb(wide))[..., 1], want)
    small = Image.fromarray((values // 257).astype(np.int32))  # 8-bit values in an "I" image stay
    assert np.array_equal(np.asarray(to_rgb(small)), np.asarray(small.convert("RGB")))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "1", "CMYK", "LA"])
def test_other_modes_convert_exactly_as_deepseek_does(mode: str) -> None:
    from conftest import make_image

    image = make_image(33, 21, "RGB").convert(mode)
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))
