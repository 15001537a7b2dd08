"""What ingest may fetch (`pipeline/data/fetch_policy.py`): schemes, addresses after DNS and on
every redirect, bounded bodies, a deadline per download, formats and pixel counts from the header,
OpenCV's own pixel cap; and img2dataset's own downloader running under the guard on a shard of
hostile rows.

Only 127.0.0.1 is ever connected to: every test runs with `socket.create_connection` wrapped so
that any other address fails the test before a packet leaves, and the other ranges are reached
through an injected resolver whose answers the guard must refuse before connecting.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cluster.driver import WORKER_ENV
from pipeline.data.fetch_policy import (
    AddressPolicy,
    FetchGuard,
    address_kind,
    guarded_urllib,
    header_refusal,
    scheme_refusal,
)
from pipeline.data.images import png_bytes
from pipeline.stages.ingest import FAILURES, classify_error
from pipeline.synthetic.hostile import hostile_rows, png_bomb, radiance_hdr
from pipeline.synthetic.server import LoopbackServer


def png_image(seed: int = 0, side: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return png_bytes(pixels)


NAMES = {
    "images.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "intranet.test": ["10.20.30.40", "fd00::1"],
    "mixed.test": ["192.168.1.1", "127.0.0.1"],
}


def fake_dns(host: str, port: int) -> list[str]:
    return NAMES.get(host, [host])


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fails the test at once if anything connects to an address other than 127.0.0.1."""
    real = socket.create_connection

    def create_connection(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"a connection to {address[0]} was attempted"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)


@pytest.fixture
def server():
    files = {
        "/a.png": (png_image(), "image/png"),
        "/big.bin": (bytes(5000), "application/octet-stream"),
        "/six.txt": (b"abcdef", "text/plain"),
    }
    with LoopbackServer(files) as srv:
        yield srv


def fetch(guard: FetchGuard, url: str) -> bytes:
    with guarded_urllib(guard), urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def refusal(guard: FetchGuard, url: str) -> str:
    with pytest.raises(OSError) as err:
        fetch(guard, url)
    return classify_error(str(err.value))


def test_only_http_and_https_are_fetched():
    for url in ("file:///etc/hostname", "ftp://example.org/a.jpg", "data:image/png;base64,AAAA", "example.org/a.jpg"):
        assert scheme_refusal(url).startswith("disallowed_scheme"), url
    for url in ("http://example.org/a.jpg", "HTTPS://example.org/a.jpg"):
        assert scheme_refusal(url) is None
    guard = FetchGuard(AddressPolicy(allow_private=True), 1 << 20)
    assert refusal(guard, "file:///etc/hostname") == "disallowed_scheme"
    assert refusal(guard, "data:text/plain,secret") == "disallowed_scheme"


@pytest.mark.parametrize(
    ("ip", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local (cloud metadata)"),
        ("fe80::1", "link-local (cloud metadata)"),
        ("10.0.0.1", "private"),
        ("192.168.1.1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "not globally routable"),
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
    ],
)
def test_address_ranges(ip, kind):
    assert address_kind(ip) == kind


def test_loopback_is_refused_by_default_and_nothing_reaches_the_server(server):
    guard = FetchGuard(AddressPolicy(), 1 << 20)
    assert refusal(guard, f"{server.url}/a.png") == "disallowed_address"
    assert server.served == []
    opted_in = FetchGuard(AddressPolicy(allow_private=True), 1 << 20)
    assert fetch(opted_in, f"{server.url}/a.png") == png_image()
    endpoint = FetchGuard(AddressPolicy(allow_endpoints=(("127.0.0.1", server.port),)), 1 << 20)
    assert fetch(endpoint, f"{server.url}/a.png") == png_image()
    network = FetchGuard(AddressPolicy(allow_networks=("127.0.0.0/30",)), 1 << 20)
    assert fetch(network, f"{server.url}/a.png") == png_image()
    other_port = FetchGuard(AddressPolicy(allow_endpoints=(("127.0.0.1", server.port + 1),)), 1 << 20)
    assert refusal(other_port, f"{server.url}/a.png") == "disallowed_address"


def test_names_are_checked_after_dns_and_every_redirect_hop(server):
    policy = AddressPolicy(allow_endpoints=(("127.0.0.1", server.port),))
    guard = FetchGuard(policy, 1 << 20, resolve=fake_dns)
    port = server.port
    assert fetch(guard, f"http://images.test:{port}/a.png") == png_image()
    assert server.served == ["/a.png"]
    for host in ("metadata.test", "intranet.test"):
        with pytest.raises(OSError, match=r"disallowed_address: .*(link-local|private)"):
            fetch(guard, f"http://{host}:{port}/a.png")
    # one refused and one allowed answer: the allowed one is used
    assert fetch(guard, f"http://mixed.test:{port}/a.png") == png_image()
    served = len(server.served)
    for target in (
        "http://169.254.169.254/latest/meta-data/",
        f"http://metadata.test:{port}/a.png",
        "http://[::1]/a.png",
        f"http://127.0.0.2:{port}/a.png",
    ):
        assert refusal(guard, f"{server.url}/redirect/302?to={target}") == "disallowed_address", target
    assert refusal(guard, f"{server.url}/redirect/301?to=file:///etc/hostname") == "disallowed_scheme"
    assert refusal(guard, f"{server.url}/redirect/302?to=ftp://127.0.0.1/a.png") == "disallowed_scheme"
    assert server.served[served:] == [p.removeprefix(server.url) for p in server.served[served:]]
    assert all(p.startswith("/redirect/") for p in server.served[served:])
    assert fetch(guard, f"{server.url}/redirect/302?to=/a.png") == png_image()


def test_bodies_are_bounded_with_and_without_a_declared_length(server):
    guard = FetchGuard(AddressPolicy(allow_private=True), 4096)
    assert refusal(guard, f"{server.url}/big.bin") == "too_many_bytes"
    assert refusal(guard, f"{server.url}/big.bin?nolength") == "too_many_bytes"
    assert len(fetch(FetchGuard(AddressPolicy(allow_private=True), 5000), f"{server.url}/big.bin?nolength")) == 5000


def test_a_download_ends_at_its_deadline_redirects_included(server):
    """A host sending a byte every 0.1 s never lets a read time out; the deadline, started with the
    first request and kept across its redirect, ends the download (a fresh one per hop would not)."""
    guard = FetchGuard(AddressPolicy(allow_private=True), 1 << 20, deadline_s=1.0)
    assert refusal(guard, f"{server.url}/slow/0.6/redirect/302?to=/drip/0.1/six.txt") == "too_slow"
    assert fetch(guard, f"{server.url}/drip/0.1/six.txt") == b"abcdef"  # 0.6 s: within its own deadline


def test_pixels_and_formats_are_read_from_the_header_before_any_decode():
    bomb = png_bomb(12_000)
    assert len(bomb) < 300_000
    stream = io.BytesIO(bomb)
    assert header_refusal(stream, 89_478_485).startswith("too_many_pixels: 12000x12000")
    assert stream.tell() == 0
    assert header_refusal(io.BytesIO(bomb), 200_000_000) is None
    assert header_refusal(io.BytesIO(png_image()), 100) is not None
    assert header_refusal(io.BytesIO(png_image()), 89_478_485) is None
    assert header_refusal(io.BytesIO(png_bomb(20_000)), 89_478_485).startswith("too_many_pixels")
    # what PIL cannot size is never decoded: OpenCV reads Radiance HDR (and TIFF) past the limit
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    for body in (radiance_hdr(6000, 6000, rows=1), tiff.getvalue(), b"<html>not an image</html>"):
        stream = io.BytesIO(body)
        assert header_refusal(stream, 89_478_485).startswith("unsupported_format: "), body[:16]
        assert stream.tell() == 0
    for fmt in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP"):  # MPO: a camera's JPEG with more frames
        image, frame = io.BytesIO(), Image.new("RGB", (8, 8))
        frame.save(image, fmt, save_all=fmt == "MPO", append_images=[frame])
        assert Image.open(image).format == fmt
        assert header_refusal(io.BytesIO(image.getvalue()), 64) is None, fmt


def test_opencv_in_a_ray_worker_refuses_what_passes_its_pixel_cap():
    """The backstop behind the header check: with the workers' environment, OpenCV (loaded fresh)
    refuses a header over the cap before allocating, and ingest counts that as `too_many_pixels`."""
    claims = radiance_hdr(14_000, 13_000, rows=0)  # 182M pixels claimed, none sent
    probe = (
        "import sys, cv2, numpy as np\n"
        "try:\n"
        "    cv2.imdecode(np.frombuffer(sys.stdin.buffer.read(), np.uint8), cv2.IMREAD_UNCHANGED)\n"
        "except cv2.error as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, **WORKER_ENV}
    done = subprocess.run([sys.executable, "-c", probe], input=claims, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert classify_error(done.stdout.decode()) == "too_many_pixels", done.stdout


def test_img2dataset_under_the_guard_counts_every_hostile_row_and_keeps_every_good_one(tmp_path, monkeypatch):
    """img2dataset's real `Downloader` on one shard of good images among hostile rows."""
    from pipeline.config.data import IngestSection
    from pipeline.engine.ledger import Attempt, Ledger
    from pipeline.stages.ingest import IngestTask, download_shard

    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")  # its import-time version check goes online
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(png_image())
    cfg = IngestSection(
        url_lists=("unused.parquet",),
        image_size=32,
        timeout_s=1.0,
        download_deadline_s=2.0,
        max_bytes=200_000,
        threads=8,
    )
    extra, rows = hostile_rows(str(secret), cfg.max_bytes, cfg.timeout_s, cfg.download_deadline_s)
    good = {f"/good{i}.png": (png_image(seed=i), "image/png") for i in range(6)}
    with LoopbackServer({**good, **extra}) as srv:
        urls = [r.path_or_url if ":" in r.path_or_url.split("/")[0] else srv.url + r.path_or_url for r in rows]
        urls += [srv.url + path for path in good]
        expect = [r.expect for r in rows] + ["success"] * len(good)
        table = pa.table({"url": urls, "caption": [f"row {i}" for i in range(len(urls))]})
        pq.write_table(table, tmp_path / "input.parquet")
        policy = AddressPolicy(allow_endpoints=(("127.0.0.1", srv.port),))
        task = IngestTask("00000", 0, 5, str(tmp_path / "input.parquet"), policy)
        attempt = Attempt(Ledger(str(tmp_path / "out")), "00000", "test")
        result = download_shard(cfg, task, attempt)
    manifest = pq.read_table(f"{attempt.folder}/00000.parquet").to_pylist()
    got = {
        row["url"]: classify_error(row["error_message"]) if row["status"] != "success" else "success"
        for row in manifest
    }
    assert got == dict(zip(urls, expect))
    assert result.samples_in == len(urls)
    assert result.samples_out == len(good)
    want = {reason: expect.count(reason) for reason in FAILURES}
    assert {k: v for k, v in result.counts.items() if v} == {k: v for k, v in want.items() if v}
    with tarfile.open(f"{attempt.folder}/00000.tar") as tar:
        assert sum(name.endswith(".jpg") for name in tar.getnames()) == len(good)
