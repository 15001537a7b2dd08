"""A hostile URL list, as untrusted lists hold them: local files, decompression bombs (a PNG, and a
Radiance HDR that PIL cannot size but OpenCV decodes), redirects to refused addresses, HTML pages,
404s, oversized bodies, hosts slower than the timeout and hosts that send a byte at a time past the
download's deadline, mixed with good images. Served by the loopback server; used by the fault
tests and `make faults`.
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


def radiance_hdr(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid Radiance RGBE image of width x height black pixels (8 <= width < 32768), run-length
    encoded: about height * (4 + width / 16) bytes on the wire, 12 bytes a pixel once OpenCV
    decodes it to float32 (6000x6000 is 2.3 MB that decodes to 432 MB). PIL cannot read it.
    `rows`: the scanlines written (fewer than `height` make a header that claims more than it holds)."""
    runs, left = [], width
    while left:
        run = min(127, left)
        runs.append(bytes([128 + run, 0]))  # `run` copies of the byte 0
        left -= run
    scanline = bytes([2, 2, width >> 8, width & 0xFF]) + b"".join(runs) * 4  # R, G, B, E in turn
    header = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {height} +X {width}\n".encode()
    return header + scanline * (height if rows is None else rows)


@dataclass(frozen=True)
class HostileRow:
    path_or_url: str
    """A path on the loopback server, or a whole URL (local files, other schemes)."""
    expect: str
    """The ingest reason it must end under ("success" for a good image)."""


def hostile_rows(
    secret_file: str, max_bytes: int, timeout_s: float, deadline_s: float
) -> tuple[dict[str, tuple[bytes, str]], list[HostileRow]]:
    """The loopback server's extra files and the hostile rows (good images are the caller's).
    `secret_file` is a local file the list points at; `max_bytes`, `timeout_s` and `deadline_s`
    (`download_deadline_s`) the recipe's."""
    drip_s = timeout_s / 4  # each byte well within one read's timeout; the whole body 4x the deadline
    files = {
        "/bomb.png": (png_bomb(12_000), "image/png"),
        "/bomb.hdr": (radiance_hdr(1000, 1000), "image/vnd.radiance"),
        "/page.html": (b"<html><body>not an image</body></html>", "text/html"),
        "/huge.jpg": (bytes(max_bytes + 1), "image/jpeg"),
        "/drip.html": (b"<" * int(4 * deadline_s / drip_s), "text/html"),
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
        HostileRow("/bomb.hdr", "unsupported_format"),
        HostileRow("/page.html", "unsupported_format"),
        HostileRow("/status/404/image.jpg", "http_4xx"),
        HostileRow("/huge.jpg", "too_many_bytes"),
        HostileRow("/huge.jpg?nolength", "too_many_bytes"),
        HostileRow(f"/slow/{timeout_s * 3:g}/page.html", "timeout"),
        HostileRow(f"/drip/{drip_s:g}/drip.html", "too_slow"),
        HostileRow(f"/drip/{drip_s:g}/drip.html?nolength", "too_slow"),
        HostileRow(f"{dead_url()}/image.jpg", "disallowed_address"),
    ]
    return files, rows
