"""Open the image sources users hand us: file paths, `data:` URLs, raw bytes, PIL images."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Union

from PIL import Image

from ..errors import ImageLoadError

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]

# What PIL raises for bytes it cannot decode (truncated files raise OSError while loading).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _decode(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now, so a broken file fails here and not deep inside preprocessing
    except Image.UnidentifiedImageError:
        raise ImageLoadError(f"{what}: not a readable image (unknown or unsupported format)") from None
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"{what}: not a readable image ({exc})") from None
    return image


def _from_data_url(url: str) -> Image.Image:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageLoadError(
            f"data URL: expected 'data:image/<type>;base64,<data>', got {url[:40]!r}..."
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ImageLoadError(f"data URL: invalid base64 payload ({exc})") from None
    return _decode(data, "data URL")


def _from_path(path: Path) -> Image.Image:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such image file") from None
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read image file ({exc})") from None
    return _decode(data, str(path))


def open_image(source: ImageSource) -> Image.Image:
    """Open `source` and return it as an RGB PIL image (DeepSeek converts every input to RGB).

    `source` is a file path (str or Path), a `data:image/...;base64,` URL, encoded image bytes or a
    PIL image. Raises ImageLoadError naming the file (or "bytes" / "data URL") when it cannot be read.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode(bytes(source), "bytes")
    elif isinstance(source, str) and source.startswith("data:"):
        image = _from_data_url(source)
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageLoadError(f"{source}: remote URLs are not fetched; download the image first")
    elif isinstance(source, (str, Path)):
        image = _from_path(Path(source))
    else:
        raise ImageLoadError(f"cannot open an image from a {type(source).__name__}")
    return image.convert("RGB")
