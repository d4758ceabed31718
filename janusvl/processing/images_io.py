"""Open the image sources users hand us: file paths, `data:` URLs, raw bytes, PIL images.

Sources may come from anyone (a server request, a table of paths nobody checked), so opening is
bounded before any pixel is decoded: only regular files are read (never a FIFO, a device or a
directory), encoded data is capped at `ImageLimits.max_bytes`, and the pixel count PIL reads
from the header is capped at `ImageLimits.max_pixels` before decoding (PIL decodes lazily).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageLoadError, ImageTooLargeError, InputError
from ..validation import integer

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]

# What PIL raises for bytes it cannot decode (truncated files raise OSError while loading).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel photo (7300 x 5470) decodes to ~120 MB of RGB
DEFAULT_MAX_IMAGE_BYTES = 50 * 2**20
# Grey-level modes whose values go beyond 0..255 (16-bit PNG and TIFF); PIL's convert("RGB")
# clips them, which turns a 16-bit image white.
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class ImageLimits:
    """How images are opened. `max_pixels` (width x height, checked from the header before
    decoding) and `max_bytes` (encoded size) bound what one image may cost. `exif_transpose`
    turns photos upright by their EXIF orientation; off by default, as DeepSeek's pipeline
    ignores it (and the model was trained on images read that way)."""

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    exif_transpose: bool = False

    def __post_init__(self) -> None:
        integer("max_image_pixels", self.max_pixels, minimum=1)
        integer("max_image_bytes", self.max_bytes, minimum=1)
        if not isinstance(self.exif_transpose, bool):
            raise InputError(f"exif_transpose must be True or False, got {self.exif_transpose!r}")


DEFAULT_LIMITS = ImageLimits()


def check_size(image: Image.Image, what: str, limits: ImageLimits) -> None:
    """Refuse an empty image or one over the pixel limit (PIL knows the size from the header).
    The one pixel check of every entry point: the library, the CLI and the server."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageLoadError(f"{what}: the image is empty ({width}x{height} pixels)")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(f"{what}: {width}x{height} is {width * height:,} pixels, more than "
                                 f"max_image_pixels ({limits.max_pixels:,}); downscale it first")


def _check_bytes(size: int, what: str, limits: ImageLimits) -> None:
    if size > limits.max_bytes:
        raise ImageTooLargeError(f"{what}: {size:,} bytes of encoded image, more than max_image_bytes "
                                 f"({limits.max_bytes:,})")


def open_header(data: bytes, what: str, limits: ImageLimits) -> Image.Image:
    """`data` opened lazily: its header is read and checked by `check_size`, no pixel is decoded."""
    _check_bytes(len(data), what, limits)
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own limit (2 x 89 MP), checked at open
        raise ImageTooLargeError(f"{what}: {str(exc).rstrip('.')}; more than max_image_pixels "
                                 f"({limits.max_pixels:,})") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(f"{what}: not a readable image (unknown or unsupported format)") from None
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"{what}: not a readable image ({exc})") from None
    check_size(image, what, limits)
    return image


def _decode(data: bytes, what: str, limits: ImageLimits) -> Image.Image:
    image = open_header(data, what, limits)
    try:
        image.load()  # decode now, so a broken file fails here and not deep inside preprocessing
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"{what}: not a readable image ({exc})") from None
    return image


def _from_data_url(url: str, limits: ImageLimits) -> Image.Image:
    header, sep, payload = url.partition(",")
    header = header.lower()
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageLoadError(
            f"data URL: expected 'data:image/<type>;base64,<data>', got {url[:40]!r}..."
        )
    # Base64 holds 3 bytes per 4 characters: refuse an oversized payload before decoding it.
    _check_bytes(len(payload) // 4 * 3, "data URL", limits)
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ImageLoadError(f"data URL: invalid base64 payload ({exc})") from None
    return _decode(data, "data URL", limits)


def read_image_file(path: Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`. The file is opened without blocking
    and checked by fstat on the open descriptor, so a FIFO cannot hang the read and nothing can
    swap the file between the check and the read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such image file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL or an unencodable character in the path
        raise ImageLoadError(f"{path}: cannot read image file ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageLoadError(f"{path}: is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise ImageLoadError(f"{path}: not a regular file (a pipe, device or socket); only files are read")
        limits = ImageLimits(max_bytes=max_bytes)
        _check_bytes(info.st_size, str(path), limits)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb", buffering=0) as f:
        data = _read_at_most(f, max_bytes + 1, path)
    _check_bytes(len(data), str(path), limits)  # it grew after the check
    return data


def _read_at_most(f: io.RawIOBase, limit: int, path: Path) -> bytes:
    chunks, size = [], 0
    try:
        while size < limit and (chunk := f.read(min(limit - size, 1 << 24))):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read image file ({exc.strerror or exc})") from None
    return b"".join(chunks)


def _is_remote(source: str) -> bool:
    return source[:8].lower().startswith(("http://", "https://"))


def to_8bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth grey image as 8-bit "L", scaled by its real range: 16-bit modes by
    65535 -> 255; 32-bit "I" by the range its values use (8-bit values stay as they are)."""
    values = np.asarray(image).astype(np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if image.mode != "I" or (low >= 0 and high > 255 and high <= 65535):
        scaled = (values * 255 + 32767) // 65535  # rounded
    elif low >= 0 and high <= 255:
        scaled = values
    else:  # negative or wider than 16 bits: stretch what is there
        scaled = (values - low) * 255 // max(high - low, 1)
    return Image.fromarray(scaled.astype(np.uint8), "L")


def to_rgb(image: Image.Image, exif_transpose: bool = False) -> Image.Image:
    """RGB as DeepSeek's pipeline makes it (`convert("RGB")`), except that 16-bit grey images are
    scaled down rather than clipped, and, if asked, the EXIF orientation is applied first."""
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_BIT_MODES:
        image = to_8bit(image)
    return image.convert("RGB")


def open_image(source: ImageSource, limits: ImageLimits | None = None) -> Image.Image:
    """Open `source` and return it as an RGB PIL image (DeepSeek converts every input to RGB).

    `source` is a file path (str or Path), a `data:image/...;base64,` URL, encoded image bytes or a
    PIL image; `limits` bound its size (default `ImageLimits()`: 40 megapixels, 50 MiB encoded).
    Raises ImageLoadError naming the file (or "bytes" / "data URL") when it cannot be read.
    """
    limits = limits or DEFAULT_LIMITS
    if isinstance(source, Image.Image):
        check_size(source, "image", limits)
        image = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode(bytes(source), "bytes", limits)
    elif isinstance(source, str) and source[:5].lower() == "data:":
        image = _from_data_url(source, limits)
    elif isinstance(source, str) and _is_remote(source):
        raise ImageLoadError(f"{source[:80]}: remote URLs are not fetched; download the image first")
    elif isinstance(source, (str, Path)):
        path = Path(source)
        image = _decode(read_image_file(path, limits.max_bytes), str(path), limits)
    else:
        raise ImageLoadError(f"cannot open an image from a {type(source).__name__}")
    return to_rgb(image, limits.exif_transpose)
