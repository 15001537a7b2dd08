"""A loopback HTTP server for the synthetic dataset, so that ingest downloads it like a web crawl.

It serves fixed bodies from memory, answers `/status/<code>/...` with that status (the crawl's
HTTP errors), `/redirect/<code>?to=URL` with a redirect to URL, `/slow/<seconds>/<path>` with
`<path>` after a pause and `/drip/<seconds>/<path>` with `<path>`'s body one byte every `<seconds>`
(hostile lists), leaves out Content-Length when the query has `nolength`,
and binds 127.0.0.1 only: nothing here should ever be reachable from outside.
`dead_url` names a loopback address where nothing listens (the crawl's dead hosts).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def dead_endpoint() -> tuple[str, int]:
    """A loopback address and port where nothing listens: connecting is refused at once.

    127.0.0.2 is loopback on Linux, but servers bound to 127.0.0.1 do not answer there, and port 9
    (discard) has no listener on any ordinary machine.
    """
    return "127.0.0.2", 9


def dead_url() -> str:
    """The base URL of `dead_endpoint` (the crawl's dead hosts)."""
    host, port = dead_endpoint()
    return f"http://{host}:{port}"


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    # The default backlog of 5 makes a 64-thread downloader see dropped SYNs and 1 s stalls.
    request_queue_size = 128


def _handler(
    files: Mapping[str, tuple[bytes, str]], latency_s: float, served: list[str]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pipeline-loopback/1"

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def do_GET(self) -> None:
            self._answer(head=False)

        def _answer(self, head: bool) -> None:
            if latency_s:
                time.sleep(latency_s)  # a slow host, as crawls meet them
            served.append(self.path)
            parts = urlsplit(self.path)
            path, headers, drip = parts.path, {}, 0.0
            if path.startswith("/slow/"):
                seconds, _, path = path.removeprefix("/slow/").partition("/")
                time.sleep(float(seconds))
                path = "/" + path
            if path.startswith("/drip/"):
                seconds, _, path = path.removeprefix("/drip/").partition("/")
                drip, path = float(seconds), "/" + path
            status, body, content_type = 200, b"", "text/plain; charset=utf-8"
            if path.startswith("/redirect/"):
                status = int(path.split("/")[2])
                headers["Location"] = parse_qs(parts.query).get("to", ["/"])[0]
            elif path in files:
                body, content_type = files[path]
            elif path.startswith("/status/"):
                code = path.split("/")[2]
                status = int(code) if code.isdigit() and 200 <= int(code) <= 599 else 404
                body = f"status {status}\n".encode()
            else:
                status, body = 404, b"not found\n"
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                if "nolength" not in parts.query:  # else the body ends when the connection closes
                    self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if head:
                    return
                if not drip:
                    self.wfile.write(body)
                for i in range(len(body) if drip else 0):  # a host that answers, slowly, forever
                    self.wfile.write(body[i : i + 1])
                    time.sleep(drip)
            except (BrokenPipeError, ConnectionResetError):
                # A downloader that timed out and hung up; nothing to answer any more.
                logger.debug("client hung up before %s was sent", path)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("%s " + format, self.address_string(), *args)

    return Handler


class LoopbackServer:
    """Serves `files` (path -> (body, content type)) on 127.0.0.1 from a daemon thread.

    Use as a context manager, or call `start()` and `stop()`. `port=0` picks a free port; a fixed
    port that is busy raises OSError naming it.
    """

    def __init__(
        self, files: Mapping[str, tuple[bytes, str]], host: str = LOOPBACK, port: int = 0, latency_s: float = 0.0
    ):
        self._latency_s = latency_s
        if host != LOOPBACK:
            raise ValueError(f"LoopbackServer binds {LOOPBACK} only, not {host!r}")
        self._files, self._host, self._requested_port = files, host, port
        self.served: list[str] = []
        """The path of every request answered, in order (tests check what was fetched)."""
        self._server: _Server | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the free one picked for port 0); still known after `stop()`."""
        if self._port is None:
            raise RuntimeError("LoopbackServer was never started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8123 (no trailing slash)."""
        return f"http://{self._host}:{self.port}"

    def start(self) -> LoopbackServer:
        """Binds and starts serving; returns self."""
        if self._server is not None:
            raise RuntimeError("LoopbackServer is already started")
        try:
            server = _Server((self._host, self._requested_port), _handler(self._files, self._latency_s, self.served))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                busy = f"port {self._requested_port} on {self._host} is already in use"
                raise OSError(errno.EADDRINUSE, f"{busy}; pick another port, or 0 for a free one") from err
            raise
        self._server, self._port = server, server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"loopback-server-{self.port}", daemon=True
        )
        self._thread.start()
        logger.info("serving %d files at %s", len(self._files), self.url)
        return self

    def stop(self) -> None:
        """Stops serving and closes the socket; a no-op when not started."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        logger.info("stopped the server on port %d", self._port)
        self._server, self._thread = None, None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
