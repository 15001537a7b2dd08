"""What ingest may fetch from an untrusted URL list: http(s) only, public addresses only unless a
recipe opts in, a bounded number of bytes in a bounded time, and images of a web format whose
header declares a bounded pixel count.

img2dataset downloads with `urllib.request.urlopen`. `guarded_urllib(guard)` installs, for the
length of one shard task, an opener whose only handlers are http and https (no file, ftp or data
URLs, no proxies), whose connections resolve the host themselves, skip every address the policy
refuses, and check the address actually connected to, so a redirect to an internal host or a DNS
answer that changes between check and use is refused on every hop. Responses stop reading past
`max_bytes`. A refusal happens before a connection is opened: nothing is sent to a refused address.

Each download (its redirects included) must end by its deadline, `deadline_s` after it started:
the socket's timeout bounds one read, so a server sending a byte a second would otherwise hold a
download thread for hours. Every read of the response (status line, headers, body) waits at most
the time left.

Only the formats PIL sizes from the header and OpenCV (img2dataset's decoder) decodes at that size
are decoded (`FORMATS`); anything else is refused unread, since OpenCV decodes formats PIL cannot
size (a 2.3 MB Radiance `.hdr` becomes 6000x6000 float32 pixels). `OPENCV_ENV`, set in every Ray
worker before OpenCV loads, caps OpenCV's own decode at the largest `ingest.max_pixels` too.

Every refusal is an error message that starts with its reason (`REASONS`), which the ingest stage
counts.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import ipaddress
import math
import socket
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO
from urllib.parse import urljoin, urlsplit

SCHEMES = ("http", "https")
REASONS = (
    "disallowed_scheme",
    "disallowed_address",
    "too_many_bytes",
    "too_slow",
    "unsupported_format",
    "too_many_pixels",
)

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
"""The image formats decoded (PIL's names; JPEG includes MPO): PIL reads their size from the
header, and OpenCV picks the same decoder by the same leading bytes, so it decodes the size the
header check saw. TIFF is left out: rare on the web, up to 64-bit float samples, and PIL and
OpenCV read its directories differently."""

MAX_PIXELS = 2 * 89_478_485
"""The largest `ingest.max_pixels` (PIL refuses images above it outright)."""

OPENCV_ENV = {"OPENCV_IO_MAX_IMAGE_PIXELS": str(MAX_PIXELS)}
"""OpenCV's own pixel cap (default 2^30), read once when cv2 loads: so it is set in the Ray
workers' environment, before img2dataset imports cv2. A backstop behind the header check."""

Resolver = Callable[[str, int], list[str]]


class Refused(OSError):
    """A fetch the policy does not allow; its message starts with the reason."""


def scheme_refusal(url: str) -> str | None:
    """The refusal of a URL whose scheme is not fetched (None for http and https)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in SCHEMES:
        return None
    return f"disallowed_scheme: {scheme or 'no scheme'}: only {' and '.join(SCHEMES)} URLs are fetched"


def address_kind(ip: str) -> str | None:
    """The refused range an address lies in (None for a globally routable one)."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind, inside in (
        ("loopback", address.is_loopback),
        ("link-local (cloud metadata)", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("not globally routable", not address.is_global),
    ):
        if inside:
            return kind
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses ingest connects to. Picklable: it travels with each shard task."""

    allow_private: bool = False
    """Connect to every address (the recipe's `ingest.allow_private_addresses`)."""
    allow_networks: tuple[str, ...] = ()
    """CIDR networks allowed on every port (`ingest.allow_networks`)."""
    allow_endpoints: tuple[tuple[str, int], ...] = ()
    """(address, port) pairs allowed: the synthetic set's loopback server, named explicitly."""

    def refusal(self, ip: str, port: int) -> str | None:
        """Why connecting to ip:port is refused, or None."""
        if self.allow_private or (ip, port) in self.allow_endpoints:
            return None
        address = ipaddress.ip_address(ip.split("%", 1)[0])
        if any(address in ipaddress.ip_network(n, strict=False) for n in self.allow_networks):
            return None
        kind = address_kind(ip)
        return None if kind is None else f"{ip} is {kind}"


def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses in the resolver's order, each once."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass(frozen=True)
class FetchGuard:
    """The policy of one shard task's downloads."""

    policy: AddressPolicy
    max_bytes: int
    resolve: Resolver = system_resolver
    deadline_s: float = math.inf
    """Seconds a download may take, redirects included (`ingest.download_deadline_s`)."""

    def connect(
        self, host: str, port: int, timeout: float | None, source_address=None, deadline: Deadline | None = None
    ) -> socket.socket:
        """A socket to the first allowed address of `host`, checked again once connected."""
        refusals: list[str] = []
        error: OSError | None = None
        for ip in self.resolve(host, port):
            why = self.policy.refusal(ip, port)
            if why is not None:
                refusals.append(why)
                continue
            try:
                wait = timeout if deadline is None else deadline.wait(timeout)
                sock = socket.create_connection((ip, port), wait, source_address)
            except OSError as err:
                error = err
                continue
            peer = sock.getpeername()[0]
            why = self.policy.refusal(peer, port)
            if why is not None:
                sock.close()
                raise Refused(f"disallowed_address: {host} connected to {why}")
            return sock
        if error is not None:
            raise error
        raise Refused(f"disallowed_address: {host}: {'; '.join(refusals) or 'no address'}")


@dataclass(frozen=True)
class Deadline:
    """When one download must have ended (`time.monotonic()`), `seconds` after it started."""

    at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def refusal(self) -> Refused:
        return Refused(f"too_slow: the download took more than ingest.download_deadline_s {self.seconds:g} s")

    def wait(self, timeout: float | None) -> float | None:
        """How long the next socket operation may wait: `timeout`, cut to the time left (None:
        no limit); a deadline already past is refused."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.refusal()
        if timeout is None or not isinstance(timeout, int | float):  # http.client's "global default"
            timeout = socket.getdefaulttimeout()
        wait = left if timeout is None else min(timeout, left)
        return None if wait == math.inf else wait


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each waiting at most the read timeout and none past the deadline. The
    socket's own file object underneath keeps it open after urllib closes the connection."""

    def __init__(self, sock: socket.socket, deadline: Deadline, timeout: float | None):
        self._sock, self._raw = sock, sock.makefile("rb", buffering=0)
        self._deadline, self._timeout = deadline, timeout

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, buffer) -> int | None:
        wait = self._deadline.wait(self._timeout)
        self._sock.settimeout(wait)
        try:
            return self._raw.readinto(buffer)
        except TimeoutError:
            if wait is not None and (self._timeout is None or wait < self._timeout):  # the deadline's cut
                raise self._deadline.refusal() from None
            raise

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Reads:
    """What `HTTPResponse` takes for its socket: it only calls `makefile("rb")`."""

    def __init__(self, sock: socket.socket, deadline: Deadline, timeout: float | None):
        self._args = sock, deadline, timeout

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(*self._args))


class BoundedResponse(http.client.HTTPResponse):
    """An HTTP response that refuses a declared length, or a body, over `max_bytes`, and reads
    nothing past `deadline`."""

    def __init__(
        self, sock, *args, max_bytes: int, deadline: Deadline | None = None, timeout: float | None = None, **kwargs
    ):
        super().__init__(sock if deadline is None else _Reads(sock, deadline, timeout), *args, **kwargs)
        self._max_bytes, self._read_bytes = max_bytes, 0

    def begin(self) -> None:
        super().begin()
        if self.length is not None and self.length > self._max_bytes:
            raise Refused(f"too_many_bytes: Content-Length {self.length} > ingest.max_bytes {self._max_bytes}")

    def read(self, amt: int | None = None) -> bytes:
        allowed = self._max_bytes - self._read_bytes + 1  # one byte more tells a body over the limit
        data = super().read(allowed if amt is None else min(amt, allowed))
        self._read_bytes += len(data)
        if self._read_bytes > self._max_bytes:
            self.close()
            raise Refused(f"too_many_bytes: the body passed ingest.max_bytes {self._max_bytes}")
        return data


class _Guarded:
    """Mixin for http.client connections: the socket comes from the guard, the response is bounded
    in bytes and in time."""

    def __init__(self, *args, guard: FetchGuard, deadline: Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = lambda address, timeout, source=None: guard.connect(
            *address, timeout, source, deadline=deadline
        )
        timeout = self.timeout if isinstance(self.timeout, int | float) else socket.getdefaulttimeout()
        self.response_class = functools.partial(
            BoundedResponse, max_bytes=guard.max_bytes, deadline=deadline, timeout=timeout
        )


class _HTTPConnection(_Guarded, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Guarded, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: FetchGuard):
        super().__init__()
        self._guard = guard

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, guard=self._guard, deadline=req.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: FetchGuard):
        super().__init__()
        self._guard = guard

    def https_open(self, req):
        connection = functools.partial(_HTTPSConnection, guard=self._guard, deadline=req.deadline)
        return self.do_open(connection, req, context=self._context)


class _Deadlines(urllib.request.BaseHandler):
    """Gives each download its deadline when it starts; a redirect's request inherits it."""

    def __init__(self, seconds: float):
        self._seconds = seconds

    def http_request(self, req):
        if getattr(req, "deadline", None) is None:
            req.deadline = Deadline.after(self._seconds)
        return req

    https_request = http_request


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Redirects to http(s) only, refused under `disallowed_scheme` (urllib would follow ftp)."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
        refusal = scheme_refusal(target)
        if refusal is not None:
            fp.close()
            raise urllib.request.URLError(Refused(f"{refusal} (a redirect to {target})"))
        return super().http_error_302(req, fp, code, msg, headers)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.deadline = getattr(req, "deadline", None)  # the redirect is the same download
        return new

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _OtherSchemes(urllib.request.BaseHandler):
    def unknown_open(self, req):
        raise urllib.request.URLError(Refused(scheme_refusal(req.full_url)))


def build_opener(guard: FetchGuard) -> urllib.request.OpenerDirector:
    """An opener for http(s) only, every connection through `guard`, redirects followed (each hop
    checked again), no proxies, each download ended at `guard.deadline_s`."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _Deadlines(guard.deadline_s),
        _HTTPHandler(guard),
        _HTTPSHandler(guard),
        _OtherSchemes(),
        urllib.request.HTTPDefaultErrorHandler(),
        _Redirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


@contextlib.contextmanager
def guarded_urllib(guard: FetchGuard) -> Iterator[None]:
    """Routes this process's `urllib.request.urlopen` (img2dataset's downloads) through `guard`
    while the block runs. One shard task runs in a worker process at a time."""
    urllib.request.install_opener(build_opener(guard))
    try:
        yield
    finally:
        urllib.request.install_opener(None)


def header_refusal(stream: IO[bytes], max_pixels: int) -> str | None:
    """The refusal of a body that is not an image of `FORMATS` (`unsupported_format`: PIL cannot
    size it, so nothing may decode it) or whose header declares more than `max_pixels` pixels
    (`too_many_pixels`). Reads only the header; None for an image the decoder may have."""
    from PIL import Image

    position = stream.tell()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream, formats=FORMATS) as img:
                width, height = img.size
    except Image.DecompressionBombError as err:
        return f"too_many_pixels: {err}"
    except (OSError, ValueError, SyntaxError):  # UnidentifiedImageError is an OSError
        names = ", ".join(FORMATS[:-1]) + f" or {FORMATS[-1]}"
        return f"unsupported_format: the body is not a {names} image whose size its header gives"
    finally:
        stream.seek(position)
    if width * height > max_pixels:
        return f"too_many_pixels: {width}x{height} > ingest.max_pixels {max_pixels}"
    return None


class HeaderCheck:
    """Wraps img2dataset's resizer: a body refused from its header (`header_refusal`) never
    reaches the resizer's decoder."""

    def __init__(self, resizer, max_pixels: int):
        self.resizer, self.max_pixels = resizer, max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        refusal = header_refusal(img_stream, self.max_pixels)
        if refusal is not None:
            return None, None, None, None, None, refusal
        return self.resizer(img_stream, blurring_bbox_list)
