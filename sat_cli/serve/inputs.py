"""What a request may carry as images: data URLs, bare base64, multipart files, and http(s) URLs
from allowed hosts only. Every refusal is a :class:`BadRequest` with the HTTP status to answer;
nothing here ever reads a path named by a request."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit


class BadRequest(Exception):
    """A request the server refuses: ``status`` is the HTTP status (4xx, or 503 when busy)."""

    def __init__(self, message: str, status: int = 400, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass
class Upload:
    """One image as sent: its bytes and a name to show (the multipart file name, or "images[i]")."""

    data: bytes
    name: str


def decode_base64(text, name: str) -> bytes:
    """A data URL (``data:image/jpeg;base64,...``) or bare base64 (standard or URL-safe alphabet,
    padding optional, whitespace ignored) -> bytes; anything else is a 400."""
    if not isinstance(text, str):
        raise BadRequest(f"{name}: an image must be a base64 string or a data URL, not {type(text).__name__}")
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest(f"{name}: a data URL must be base64-encoded (data:image/jpeg;base64,...)")
    text = "".join(text.split())
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{name}: not valid base64") from None
    if not data:
        raise BadRequest(f"{name}: empty image (zero bytes)")
    return data


def check_pixels(upload: Upload, max_pixels: int) -> None:
    """Refuse (413) an image whose header declares more than ``max_pixels`` pixels, before any
    decoding; a header Pillow cannot read is left to the decoder, which reports it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(upload.data)) as im:
            w, h = im.size
    except Exception:  # not an image, truncated, a format only the full decoder knows: decided later
        return
    if w * h > max_pixels:
        raise BadRequest(f"{upload.name}: {w}x{h} = {w * h} pixels, more than the server's limit of {max_pixels} "
                         "(--max-pixels)", 413)


@dataclass
class FetchPolicy:
    """Where `url` images may come from: only these hosts (``--fetch-from``), at most ``max_bytes``,
    within ``timeout`` seconds, following at most ``max_redirects`` redirects on the same host."""

    hosts: frozenset[str] = frozenset()
    max_bytes: int = 32 << 20
    timeout: float = 20.0
    max_redirects: int = 3

    def check(self, url: str, name: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise BadRequest(f"{name}: only http and https URLs are fetched, not {parts.scheme or 'a bare path'!r}")
        host = (parts.hostname or "").lower()
        if not self.hosts:
            raise BadRequest(f"{name}: this server fetches no URLs (start it with --fetch-from HOST)", 403)
        if host not in self.hosts and f"{host}:{parts.port}" not in self.hosts:
            raise BadRequest(f"{name}: host {host!r} is not one this server fetches from (--fetch-from)", 403)


async def fetch(url: str, policy: FetchPolicy, name: str) -> bytes:
    """GET an image URL under ``policy``: allowed hosts only, redirects only to allowed hosts, a
    size cap while reading, one timeout for the whole fetch. Failures are 4xx BadRequests (502/504
    when the other server fails or stalls)."""
    import asyncio

    import httpx

    policy.check(url, name)

    async def get(url: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            for _ in range(policy.max_redirects + 1):
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        policy.check(url, name)
                        continue
                    if response.status_code != 200:
                        raise BadRequest(f"{name}: fetching the URL answered HTTP {response.status_code}", 502)
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                        raise BadRequest(f"{name}: the image at the URL is larger than {policy.max_bytes} bytes", 413)
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > policy.max_bytes:
                            raise BadRequest(f"{name}: the image at the URL is larger than {policy.max_bytes} bytes", 413)
                        chunks.append(chunk)
                    if not size:
                        raise BadRequest(f"{name}: the URL gave an empty body (zero bytes)")
                    return b"".join(chunks)
            raise BadRequest(f"{name}: more than {policy.max_redirects} redirects", 502)

    try:
        return await asyncio.wait_for(get(url), policy.timeout)
    except asyncio.TimeoutError:
        raise BadRequest(f"{name}: fetching the URL took longer than {policy.timeout:g} s", 504) from None
    except httpx.HTTPError as exc:
        raise BadRequest(f"{name}: cannot fetch the URL ({type(exc).__name__}: {exc})", 502) from None
