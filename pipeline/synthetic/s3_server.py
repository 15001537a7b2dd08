"""moto's S3 server on 127.0.0.1, for tests and benchmarks that need a real S3 endpoint: in memory,
every request optionally reported to a callback (to count what a run reads). Needs the `test` extra
(moto's server)."""

from __future__ import annotations

import logging
from collections.abc import Callable


def start_s3_server(on_request: Callable[[str, str], None] | None = None, port: int = 0):
    """A started moto server on a loopback port (0: a free one); `on_request(method, path)` is
    called for every HTTP request it answers (from its threads). Returns the server
    (`get_host_and_port`, `stop`)."""
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, ThreadedMotoServer, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 request

    class Server(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)

            def reported(environ, start_response):
                if on_request is not None:
                    on_request(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))
                return app(environ, start_response)

            self._server = make_server(self._ip_address, self._port, reported, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = Server(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN")
"""Variables that would point a client elsewhere than `client_env`'s server: unset them."""


def client_env(server) -> dict[str, str]:
    """The standard AWS variables that send s3fs, boto3 and pyarrow (so Ray workers too) to the
    moto `server`, with its dummy credentials."""
    host, port = server.get_host_and_port()
    return {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
