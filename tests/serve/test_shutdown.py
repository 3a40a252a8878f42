"""SIGTERM under load: `python -m hierloc serve` on the tiny model, 16 clients posting images back to back (one
image per model call, so that requests queue), then SIGTERM. Every request sent before the signal is answered
200 or 503 (none is dropped), new connections are refused, and the process exits 0 within the shutdown timeout
plus EXIT_MARGIN_S."""

from __future__ import annotations

import http.client
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from tests.helpers import wait_for_health

pytest.importorskip("uvicorn", reason="uvicorn is not installed")

pytestmark = pytest.mark.integration

N_CLIENTS = 16
SHUTDOWN_TIMEOUT_S = 4.0
EXIT_MARGIN_S = 6.0          # the batch being computed, and the interpreter's exit (torch alone takes ~2 s to exit here)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _jpeg(seed: int, px: int = 768) -> bytes:
    """A smooth colour field with noise (decoding and resizing it is most of a request's cost here)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:px, 0:px] / px
    field = np.stack([x, y, (x + y) / 2], axis=-1) * rng.uniform(80, 200, 3) + rng.normal(0, 12, (px, px, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _client(port: int, body: bytes, content_type: str, stop: threading.Event, log: list) -> None:
    """POST /predict back to back until `stop` or the server goes away; log (sent at, answered at, outcome):
    outcome an HTTP status, or the name of the error when no answer came."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not stop.is_set():
        sent = time.monotonic()
        try:
            conn.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            response.read()
            log.append((sent, time.monotonic(), response.status))
        except (OSError, http.client.HTTPException) as exc:
            log.append((sent, time.monotonic(), type(exc).__name__))
            conn.close()
            if isinstance(exc, ConnectionRefusedError):
                return                           # the listening socket is closed: the server is going away
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.close()


def test_sigterm_answers_the_requests_in_flight_refuses_new_ones_and_exits_0(tiny_model_dir):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "hierloc", "-q", "serve", "--model", str(tiny_model_dir),
                                "--port", str(port), "--threads", "1", "--max-batch", "1",
                                "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)],
                               stderr=subprocess.PIPE, text=True, env=env)
    stop = threading.Event()
    try:
        assert wait_for_health(process, port)["status"] == "ok"
        logs = [[] for _ in range(N_CLIENTS)]
        bodies = [_multipart(f"img{k}.jpg", _jpeg(k)) for k in range(N_CLIENTS)]
        clients = [threading.Thread(target=_client, args=(port, *bodies[k], stop, logs[k]))
                   for k in range(N_CLIENTS)]
        for thread in clients:
            thread.start()
        time.sleep(3.0)                                  # load: every client has requests answered and one queued
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):      # the listening socket is closed at once
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        process.wait(SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S)
        exited = time.monotonic()
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
            process.wait(30)
    for thread in clients:
        thread.join(60)
    stderr = process.stderr.read()
    assert process.returncode == 0, stderr
    assert exited - signalled <= SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S
    assert "Traceback" not in stderr
    records = [record for log in logs for record in log]
    before = [outcome for sent, _, outcome in records if sent < signalled]
    in_flight = [outcome for sent, answered, outcome in records if sent < signalled <= answered]
    after = [outcome for sent, _, outcome in records if sent >= signalled]
    # the load was real: requests answered before the signal, and requests still open when it came
    assert before.count(200) >= N_CLIENTS and len(in_flight) >= N_CLIENTS // 2, (len(before), len(in_flight))
    # every request sent before the signal was answered: 200, or 503 if it still waited at the drain's end
    assert set(before) <= {200, 503}, sorted(map(str, before))
    assert in_flight.count(200) >= 1
    # later requests on the open connections got 503 or found the connection closed; none got another error
    assert set(after) <= {200, 503, "RemoteDisconnected", "ConnectionRefusedError", "ConnectionResetError",
                          "BrokenPipeError"}, after
