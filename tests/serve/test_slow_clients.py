"""Slow clients on a real server (uvicorn on 127.0.0.1, in a thread of this process): uploads sent one byte every
50 ms do not hold up the other clients, and the server ends them itself: a body that stalls is answered 408 after
`Limits.stall_timeout_s`, one that trickles on for longer than `Limits.body_timeout_s` is answered 408 then, and
the connection is closed either way."""

from __future__ import annotations

import http.client
import select
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="uvicorn is not installed")
pytest.importorskip("python_multipart", reason="python-multipart is not installed")

from hierloc.serve.app import Limits, create_app  # noqa: E402
from hierloc.serve.server import server_for  # noqa: E402

LIMITS = Limits(stall_timeout_s=1.0, body_timeout_s=5.0)
BYTE_EVERY_S = 0.05          # the slow uploaders' pace: 20 bytes/s
NORMAL_BOUND_S = 2.5         # each normal request meanwhile answers within this (the tiny model takes ~0.05 s)


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    """(port, app) of `hierloc serve`'s app under uvicorn on a free port of 127.0.0.1."""
    from hierloc.inference.predictor import HierLoc

    app = create_app(HierLoc.from_pretrained(tiny_model_dir, device="cpu"), tiny_model_dir, LIMITS)
    server = server_for(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield server.servers[0].sockets[0].getsockname()[1], app
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def image(tiny_demo_dir) -> Path:
    return sorted((tiny_demo_dir / "images" / "test_nearby").glob("*.jpg"))[0]


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def request_head(port: int, body: bytes, content_type: str) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, str, bool]:
    """(status, body, whether the server closed the connection after it)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    text = response.read().decode()
    sock.settimeout(5)
    try:
        closed = sock.recv(1) == b""
    except (ConnectionResetError, socket.timeout):
        closed = False
    return response.status, text, closed


def slow_upload(port: int, body: bytes, content_type: str, stall_after: int | None, out: dict) -> None:
    """Send the head, then the body one byte every BYTE_EVERY_S (stopping for good after `stall_after` bytes)
    until the server answers; out: status, body, closed, seconds (from the first body byte), bytes sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(request_head(port, body, content_type))
        start, sent = time.monotonic(), 0
        while not select.select([sock], [], [], BYTE_EVERY_S)[0]:      # nothing from the server yet
            if sent < len(body) and (stall_after is None or sent < stall_after):
                sock.sendall(body[sent:sent + 1])
                sent += 1
            if time.monotonic() - start > 60:
                raise AssertionError("the server never answered the slow upload")
        status, text, closed = read_response(sock)
        out.update(status=status, body=text, closed=closed, seconds=time.monotonic() - start, sent=sent,
                   answered_at=time.monotonic())
    finally:
        sock.close()


def test_slow_uploaders_do_not_hold_up_other_clients_and_are_cut_off(live, image):
    port, _ = live
    body, content_type = multipart(image.name, image.read_bytes())
    assert len(body) * BYTE_EVERY_S > 4 * LIMITS.body_timeout_s      # a trickle would take far longer
    results = [{} for _ in range(8)]
    slow = [threading.Thread(target=slow_upload, args=(port, body, content_type, None, out)) for out in results]
    for thread in slow:
        thread.start()
    time.sleep(0.5)                                                   # every slow upload is under way
    normal = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(6):
        t0 = time.monotonic()
        conn.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        answer = response.read()
        normal.append((response.status, time.monotonic() - t0, answer))
        conn.request("GET", "/health")
        assert conn.getresponse().read() and time.monotonic() - t0 < 2 * NORMAL_BOUND_S
    conn.close()
    finished_normal = time.monotonic()
    for thread in slow:
        thread.join(60)
    assert [status for status, _, _ in normal] == [200] * 6
    assert max(seconds for _, seconds, _ in normal) < NORMAL_BOUND_S, [s for _, s, _ in normal]
    for out in results:
        # each trickled until the whole-body limit, never stalling, and was then refused and disconnected
        assert out["status"] == 408 and "not complete after 5 s" in out["body"] and out["closed"], out
        assert LIMITS.body_timeout_s - 0.5 <= out["seconds"] <= LIMITS.body_timeout_s + 2.0, out
        assert out["sent"] < len(body)
    # the normal requests were all answered while the slow uploads were still being received
    assert finished_normal < min(out["answered_at"] for out in results)


def test_a_stalled_body_is_408_and_the_connection_closed(live, image):
    port, _ = live
    body, content_type = multipart(image.name, image.read_bytes())
    out: dict = {}
    slow_upload(port, body, content_type, 10, out)          # ten bytes, then silence
    assert out["status"] == 408 and "stalled: nothing received for 1 s (10 bytes received)" in out["body"], out
    assert out["closed"]
    assert LIMITS.stall_timeout_s <= out["seconds"] <= LIMITS.stall_timeout_s + 0.5 + 10 * BYTE_EVERY_S + 1.0
    # the server goes on answering
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
    assert conn.getresponse().status == 200
    conn.close()
