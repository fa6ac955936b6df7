"""Running the app: uvicorn in a thread of its own, on a socket bound before it starts.

Binding first gives the caller the real port (``--port 0``) and an :class:`OSError` it can
report in one line; running uvicorn off the main thread leaves the main thread's signal
handling (Ctrl-C exits 130, SIGTERM 0) to ``closedloop serve``, as before the app existed.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

MAX_HEADER_BYTES = 16 * 1024
"""An incomplete request head larger than this is refused by the server (h11)."""


def bind(addr: str, port: int) -> socket.socket:
    """A listening TCP socket on ``addr``:``port`` (0: a free port); an OSError if not.

    Made with ``IPPROTO_TCP`` as its protocol, so that asyncio turns Nagle's algorithm off on
    each connection (it does only for such sockets): otherwise a response written as head
    then body waits ~40 ms for the client's delayed ACK."""
    family, _, _, _, sockaddr = socket.getaddrinfo(addr.strip().strip("[]"), port,
                                                   type=socket.SOCK_STREAM,
                                                   proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(sockaddr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """uvicorn serving ``app`` on ``sock`` from a daemon thread: :meth:`start`, then
    :meth:`stop` (finishes the requests in progress, within ``timeout``)."""

    def __init__(self, app: Any, sock: socket.socket, *, limit_concurrency: int = 100) -> None:
        import uvicorn

        self.app = app
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", server_header=False,
            proxy_headers=False, limit_concurrency=limit_concurrency, timeout_keep_alive=5,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="closedloop-serve",
                                        daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; returns once the server accepts connections. A RuntimeError if it
        did not start within ``timeout``."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop(1.0)
                raise RuntimeError(f"the HTTP server did not start: {self.error or 'timeout'}")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end the dashboard's live streams, finish what is in progress,
        close the socket."""
        dashboard = getattr(getattr(self.app, "state", None), "dashboard", None)
        if dashboard is not None:
            dashboard.close()
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.sock.close()
