"""A hostile URL list, as untrusted lists hold them: local files, decompression bombs, redirects to
refused addresses, HTML pages, 404s, oversized bodies and hosts slower than the timeout, mixed
with good images. Served by the loopback server; used by the fault tests and `make faults`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pipeline.synthetic.server import dead_url


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int) -> bytes:
    """A valid greyscale PNG of side x side black pixels: about side²/1000 bytes on the wire,
    side² bytes once decoded (20000 gives 1.2 MB that decodes to 400 MB)."""
    compress = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0, then the row's pixels
    body = b"".join(compress.compress(row) for _ in range(side)) + compress.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


@dataclass(frozen=True)
class HostileRow:
    path_or_url: str
    """A path on the loopback server, or a whole URL (local files, other schemes)."""
    expect: str
    """The ingest reason it must end under ("success" for a good image)."""


def hostile_rows(
    secret_file: str, max_bytes: int, timeout_s: float
) -> tuple[dict[str, tuple[bytes, str]], list[HostileRow]]:
    """The loopback server's extra files and the hostile rows (good images are the caller's).
    `secret_file` is a local file the list points at; `max_bytes` and `timeout_s` the recipe's."""
    files = {
        "/bomb.png": (png_bomb(12_000), "image/png"),
        "/page.html": (b"<html><body>not an image</body></html>", "text/html"),
        "/huge.jpg": (bytes(max_bytes + 1), "image/jpeg"),
    }
    rows = [
        HostileRow(f"file://{secret_file}", "disallowed_scheme"),
        HostileRow("file:///etc/hostname", "disallowed_scheme"),
        HostileRow("ftp://127.0.0.1/image.jpg", "disallowed_scheme"),
        HostileRow("data:image/png;base64,iVBORw0KGgo=", "disallowed_scheme"),
        HostileRow("/bomb.png", "too_many_pixels"),
        HostileRow("/bomb.png?again", "too_many_pixels"),
        HostileRow("/redirect/302?to=http://169.254.169.254/latest/meta-data/", "disallowed_address"),
        HostileRow("/redirect/301?to=http://10.0.0.1/image.jpg", "disallowed_address"),
        HostileRow("/redirect/302?to=file:///etc/hostname", "disallowed_scheme"),
        HostileRow("/page.html", "decode_error"),
        HostileRow("/status/404/image.jpg", "http_4xx"),
        HostileRow("/huge.jpg", "too_many_bytes"),
        HostileRow("/huge.jpg?nolength", "too_many_bytes"),
        HostileRow(f"/slow/{timeout_s * 3:g}/page.html", "timeout"),
        HostileRow(f"{dead_url()}/image.jpg", "disallowed_address"),
    ]
    return files, rows
