"""Where media bytes come from: data: URLs, file:// inside an allowed directory, allow-listed
http(s) URLs. Nothing else is read, and nothing larger than max_input_bytes."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx

from preprocess.config import MediaConfig
from preprocess.errors import MediaError


def data_url(data: bytes, mime: str) -> str:
    """The data: URL that carries `data` inline (how clients send media without a server)."""
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def read_source(url: str, config: MediaConfig) -> bytes:
    if not isinstance(url, str) or not url:
        raise MediaError("a media part needs a non-empty url")
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        return _read_data_url(url, config)
    if scheme == "file":
        return _read_file(url, config)
    if scheme in ("http", "https"):
        return _fetch(url, config)
    raise MediaError(f"unsupported media URL scheme {scheme!r}: send a data: URL"
                     + (", a file:// URL" if config.allowed_local_dir else "")
                     + (" or an allow-listed http(s) URL" if config.allowed_url_prefixes else ""))


def _too_large(size: int, config: MediaConfig) -> MediaError:
    return MediaError(f"the media item is {size} bytes; this server takes at most "
                      f"{config.max_input_bytes} bytes per item")


def _read_data_url(url: str, config: MediaConfig) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError("data: URLs must be base64 encoded (data:<type>;base64,<data>)")
    if len(payload) * 3 // 4 > config.max_input_bytes:
        raise _too_large(len(payload) * 3 // 4, config)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"the data: URL is not valid base64: {exc}") from None


def _read_file(url: str, config: MediaConfig) -> bytes:
    if config.allowed_local_dir is None:
        raise MediaError("file:// URLs are disabled on this server (no allowed_local_dir)")
    root = config.allowed_local_dir.resolve()
    path = Path(unquote(urlparse(url).path)).resolve()  # resolves .. and symlinks
    if not path.is_relative_to(root):
        raise MediaError(f"{path} is outside the allowed directory {root}")
    try:
        size = path.stat().st_size
        if size > config.max_input_bytes:
            raise _too_large(size, config)
        return path.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read {path}: {exc.strerror or exc}") from None


def _fetch(url: str, config: MediaConfig) -> bytes:
    if not config.allowed_url_prefixes:
        raise MediaError("fetching media from URLs is off on this server; send a data: URL")
    if not any(url.startswith(prefix) for prefix in config.allowed_url_prefixes):
        raise MediaError(f"{url} is not under an allowed URL prefix")
    try:
        # No redirects: a redirect could leave the allow-list.
        with httpx.stream("GET", url, timeout=config.fetch_timeout_s,
                          follow_redirects=False) as response:
            if response.status_code != 200:
                raise MediaError(f"fetching {url} answered HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > config.max_input_bytes:
                    raise _too_large(len(body), config)
            return bytes(body)
    except httpx.HTTPError as exc:
        raise MediaError(f"fetching {url} failed: {exc}") from None
