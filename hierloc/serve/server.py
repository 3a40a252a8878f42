"""Running the app (`hierloc.serve.app.create_app`) under uvicorn on one address until a signal stops it.

uvicorn serves every connection on one asyncio event loop: a client that sends its body slowly holds only its
own connection while the loop answers the others (the app's read timeouts, `Limits.stall_timeout_s` and
`Limits.body_timeout_s`, end it), and at most `Limits.max_connections` connections are open at once (a request
on one more is answered 503 by uvicorn).

SIGTERM or Ctrl-C: the listening socket is closed at once (new connections are refused), idle keep-alive
connections are closed, the app's `begin_shutdown` answers the requests still queued for the model for half of
`Limits.shutdown_timeout_s` and 503 after that, and the server waits for the open requests at most
`Limits.shutdown_timeout_s` in all before it cancels what is left. `serve` then returns the signal's name and the
process exits 0: a stop asked for is a clean stop. A second Ctrl-C forces the exit (uvicorn's rule).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

import uvicorn

from hierloc.serve.app import Limits

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    """uvicorn's server that tells the app when the shutdown begins and does not re-raise the stop signal after
    a graceful stop (uvicorn does, which ends the process with the signal's status instead of 0)."""

    def __init__(self, config: uvicorn.Config, on_shutdown):
        super().__init__(config)
        self.on_shutdown = on_shutdown
        self.stop_signals: list[int] = []

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():   # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if not self.stop_signals:
            log.info("received %s: stopping (no new connections; answering the requests in flight)",
                     signal.Signals(sig).name)
        self.stop_signals.append(sig)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets=sockets)


def server_for(app, host: str, port: int, log_level: str = "warning") -> DrainingServer:
    """The server of `app` (from `create_app`: its limits and `begin_shutdown` are read from app.state) on
    host:port (port 0: a free one, read from ``server.servers[0].sockets`` once ``server.started``)."""
    limits: Limits = app.state.limits
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            limit_concurrency=limits.max_connections,
                            timeout_graceful_shutdown=limits.shutdown_timeout_s)
    return DrainingServer(config, app.state.begin_shutdown)


def serve(app, host: str, port: int) -> str | None:
    """Serve `app` until SIGTERM or Ctrl-C -> the name of the signal that stopped it (None: stopped otherwise)."""
    server = server_for(app, host, port)
    server.run()
    stopped_by = signal.Signals(server.stop_signals[0]).name if server.stop_signals else None
    log.info("stopped%s", f" by {stopped_by}" if stopped_by else "")
    return stopped_by
