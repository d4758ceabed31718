"""Image URLs in requests -> encoded image bytes.

A server reads `data:` URLs only, never a file path or a `file://` URL. With
`--allow-remote-images` it also fetches http(s) URLs, but only from public addresses: every
address a host name resolves to is checked before connecting (private, loopback, link-local,
multicast and reserved ranges are refused), redirects are followed by hand so each hop is
checked again, and the size and the time of a download are capped.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin, urlsplit

from ..errors import ImageLoadError, ImageTooLargeError

MAX_REDIRECTS = 3
FETCH_TIMEOUT_S = 15.0
def decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise ImageLoadError(f"expected a 'data:image/<type>;base64,<data>' URL, got {url[:40]!r}...")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ImageTooLargeError(f"the image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ImageLoadError(f"invalid base64 in the data URL ({exc})") from None


def load_image_url(url: str, allow_remote: bool, max_bytes: int) -> bytes:
    """The bytes behind an image URL of a request (may block: call it from a worker thread)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, max_bytes)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise ImageLoadError("remote image URLs are disabled on this server (it was started without "
                                 "--allow-remote-images); send the image as a data: URL")
        return fetch_public(url, max_bytes)
    raise ImageLoadError(f"unsupported image URL {url[:40]!r}: send a data:image/...;base64, URL")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # redirects are followed by fetch_public, which checks every hop


def _check_public(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageLoadError(f"cannot resolve the image host {host!r} ({exc})") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            raise ImageLoadError(f"image host {host!r} resolves to a non-public address ({address}); refused")


def fetch_public(url: str, max_bytes: int, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_NoRedirect)
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ImageLoadError(f"image URL {url[:60]!r}: only http(s) URLs with a host are fetched")
        _check_public(parts.hostname, parts.port or (443 if parts.scheme.lower() == "https" else 80))
        try:
            response = opener.open(urllib.request.Request(url, headers={"User-Agent": "janusvl"}),
                                   timeout=max(deadline - time.monotonic(), 0.1))
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303, 307, 308) and exc.headers.get("Location"):
                url = urljoin(url, exc.headers["Location"])
                continue
            raise ImageLoadError(f"fetching the image failed: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ImageLoadError(f"fetching the image failed ({exc})") from None
        with response:
            data = b""
            while len(data) <= max_bytes:
                if time.monotonic() > deadline:
                    raise ImageLoadError(f"fetching the image took longer than {timeout:.0f} s")
                block = response.read(65536)
                if not block:
                    return data
                data += block
        raise ImageTooLargeError(f"the image at {url[:60]!r} is larger than {max_bytes} bytes")
    raise ImageLoadError(f"more than {MAX_REDIRECTS} redirects fetching the image")
