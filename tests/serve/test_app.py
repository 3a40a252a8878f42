"""`hierloc serve` through Starlette's test client: every endpoint, the bad-input battery as 4xx JSON, the same
answers as `hierloc predict --format json`, micro-batching, the full queue (503) and the timeout (504)."""

from __future__ import annotations

import base64
import io
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="starlette is not installed")
pytest.importorskip("python_multipart", reason="python-multipart is not installed")
pytest.importorskip("httpx", reason="httpx (Starlette's test client) is not installed")

from starlette.testclient import TestClient  # noqa: E402

from hierloc.cli import build_parser, main  # noqa: E402
from hierloc.serve.app import EXPLAIN_DEFAULTS, PREDICT_DEFAULTS, Limits, create_app  # noqa: E402
from tests.helpers import (REPO, make_bomb_png, make_text_as_jpeg, make_truncated_jpeg, wait_for_health,  # noqa: E402
                           write_gps_jpeg)

STATIC = REPO / "hierloc" / "serve" / "static"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from hierloc.inference.predictor import HierLoc

    return HierLoc.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def client(model, tiny_model_dir):
    with TestClient(create_app(model, tiny_model_dir), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def images(tiny_demo_dir) -> list[Path]:
    return sorted((tiny_demo_dir / "images" / "test_nearby").glob("*.jpg"))[:5]


def uploads(paths, field: str = "file") -> list:
    return [(field, (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p in paths]


def assert_json_error(response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == status and "Traceback" not in body["error"] and "\n" not in body["error"]
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body["error"])
    return body


# ---------------------------------------------------------------------------------------------- endpoints
def test_health_names_the_model_the_gazetteer_and_the_version(client, model):
    from hierloc.version import __version__

    body = client.get("/health").json()
    assert body["status"] == "ok" and body["version"] == __version__
    assert body["model"]["model_dir"] == Path(model.source).name and body["model"]["training"]["n_images"] == 240
    assert body["gazetteer"]["hash"] == model.gazetteer.content_hash
    assert sum(body["gazetteer"]["entities"].values()) == len(model.gazetteer.names)
    assert body["queue"] == {"pending": 0, "max_queue": Limits().max_queue, "max_batch": Limits().max_batch}


@pytest.mark.parametrize("options", [{}, {"top_k": "2", "max_level": "region"},
                                     {"top-k": "4", "min_prob": "0.3", "beam": "3"}, {"flat": "true"}])
def test_predict_answers_what_hierloc_predict_format_json_prints(client, tiny_model_dir, images, capsys, options):
    cli_options = [f"--{name.replace('_', '-')}" + ("" if value == "true" else f"={value}")
                   for name, value in options.items()]
    assert main(["-q", "predict", "--no-progress", "--workers", "0", "--format", "json", "--model",
                 str(tiny_model_dir), *cli_options, *map(str, images)]) == 0
    expected = json.loads(capsys.readouterr().out)
    response = client.post("/predict", files=uploads(images), data=options)
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["model"] == expected["model"]
    for record in expected["predictions"]:
        record["image"] = Path(record["image"]).name      # the server names an image by its upload's file name
    assert got["predictions"] == expected["predictions"]
    counts = ("n_images", "n_predicted", "n_from_exif", "n_failed")
    assert {k: got["summary"][k] for k in counts} == {k: expected["summary"][k] for k in counts}
    assert got["summary"]["n_images"] == len(images) and got["summary"]["seconds"] > 0


def test_options_may_come_as_query_parameters(client, images):
    by_query = client.post("/predict?top_k=1&max_level=country", files=uploads(images[:2])).json()
    by_form = client.post("/predict", files=uploads(images[:2]), data={"top_k": "1", "max_level": "country"}).json()
    assert by_query["predictions"] == by_form["predictions"]
    assert all(len(p["levels"]) == 1 and p["alternatives"] == [] for p in by_query["predictions"])


def test_exif_gps_is_compared_or_used_as_in_the_cli(client, tmp_path):
    photo = write_gps_jpeg(tmp_path / "gps.jpg", {1: "S", 2: (41.0, 17.0, 0.0), 3: "E", 4: (174.0, 46.0, 0.0)})
    compared = client.post("/predict", files=uploads([photo])).json()["predictions"][0]
    assert compared["source"] == "model"
    assert compared["exif"]["lat_deg"] == pytest.approx(-(41 + 17 / 60), abs=1e-4)
    used = client.post("/predict", files=uploads([photo]), data={"exif": "use"}).json()["predictions"][0]
    assert used["source"] == "exif" and used["lon_deg"] == pytest.approx(174 + 46 / 60, abs=1e-4)  # 41 17' S, 174 46' E
    assert client.post("/predict", files=uploads([photo]), data={"exif": "ignore"}).json()["predictions"][0][
        "exif"] is None


def test_explain_gives_the_hierarchy_its_concepts_and_a_png_map(client, model, tiny_model_dir, images):
    from hierloc.data.encoded import EncodedImage
    from hierloc.inference import explain

    response = client.post("/explain", files=uploads(images[:2]))
    assert response.status_code == 200, response.text
    body = response.json()
    direct = json.loads(explain.to_json(explain.explain_images(
        model, [EncodedImage(p.name, p.read_bytes()) for p in images[:2]], model_dir=tiny_model_dir)))
    assert len(body["explanations"]) == 2 and body["model"]["n_train_images"] == 240
    for got, want in zip(body["explanations"], direct):
        picture = got.pop("map_png")
        assert got == want
        assert [lv["level"] for lv in got["levels"]] == ["country", "region", "subregion", "city"]
        assert got["concepts_available"] and got["image_concepts"]
        assert picture.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(picture.split(",", 1)[1]))) as png:
            assert png.format == "PNG" and png.width == EXPLAIN_DEFAULTS["map_width"]
    bare = client.post("/explain", files=uploads(images[:1]), data={"map": "0", "reasons": "1"}).json()
    assert "map_png" not in bare["explanations"][0]
    assert all(len(lv["supporting"]) <= 1 for lv in bare["explanations"][0]["levels"])


def test_the_page_and_its_assets_come_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/static/app.js"' in page.text and 'href="/static/style.css"' in page.text
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text, f"{name} loads something from elsewhere"
    script = client.get("/static/app.js")
    assert script.status_code == 200 and 'fetch("/explain"' in script.text


def test_the_service_defaults_are_the_cli_defaults():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    predict = {a.dest: a.default for a in sub["predict"]._actions}
    explain = {a.dest: a.default for a in sub["explain"]._actions}
    assert {k: predict[k] for k in PREDICT_DEFAULTS} == PREDICT_DEFAULTS
    shared = ("top_k", "beam", "runners_up", "reasons", "candidates", "min_prob", "exif")
    assert {k: explain[k] for k in shared} == {k: EXPLAIN_DEFAULTS[k] for k in shared}
    serve = {a.dest: a.default for a in sub["serve"]._actions}
    assert serve["host"] == "127.0.0.1"
    assert serve["max_upload_mb"] * 1024 * 1024 == Limits().max_upload_bytes


# ------------------------------------------------------------------------------------------ the bad inputs
def _bad_file(kind: str, d: Path) -> tuple[str, bytes]:
    if kind == "empty":
        return "empty.jpg", b""
    maker = {"truncated": make_truncated_jpeg, "text-as-jpg": make_text_as_jpeg, "bomb": make_bomb_png}[kind]
    path = maker(d)
    return path.name, path.read_bytes()


@pytest.mark.parametrize("endpoint", ["/predict", "/explain"])
@pytest.mark.parametrize("kind, fragments", [
    ("empty", ("empty.jpg", "empty file (0 bytes)")),
    ("truncated", ("cut.jpg", "truncated or corrupt")),
    ("text-as-jpg", ("notes.jpg", "not a recognised image file")),
    ("bomb", ("bomb.png", "image too large", "decompression bomb")),
])
def test_unreadable_images_are_422_naming_the_file_and_the_reason(client, images, tmp_path, endpoint, kind,
                                                                  fragments):
    name, data = _bad_file(kind, tmp_path)
    files = uploads(images[:1]) + [("file", (name, data, "image/jpeg"))]
    body = assert_json_error(client.post(endpoint, files=files), 422, *fragments)
    assert [item["image"] for item in body["images"]] == [name]


def test_a_bad_image_in_one_request_does_not_fail_the_requests_batched_with_it(model, tiny_model_dir, images,
                                                                                tmp_path):
    app = create_app(model, tiny_model_dir)
    with TestClient(app, raise_server_exceptions=False) as client:
        batcher = app.state.batcher
        gate = hold_model(app)
        name, data = _bad_file("truncated", tmp_path)
        results = {}

        def post(label, files):
            results[label] = client.post("/explain", files=files, data={"map": "0"})

        threads = [threading.Thread(target=post, args=("first", uploads(images[:1])))]
        threads[0].start()
        _wait_for(lambda: batcher.n_batches == 1)
        threads += [threading.Thread(target=post, args=("good", uploads(images[1:2]))),
                    threading.Thread(target=post, args=("bad", [("file", (name, data, "image/jpeg"))]))]
        for thread in threads[1:]:
            thread.start()
        _wait_for(lambda: batcher.pending() == 2)
        gate.set()
        for thread in threads:
            thread.join(60)
    assert batcher.n_batches == 2          # the good and the bad request shared one model call
    assert results["first"].status_code == 200 and results["good"].status_code == 200
    assert_json_error(results["bad"], 422, name, "truncated")


@pytest.mark.parametrize("files, data, status, fragments", [
    ("image-field", {}, 400, ("field 'image'", "'file'")),
    ("none", {"top_k": "2"}, 400, ("no image",)),
    ("ok", {"top_k": "0"}, 400, ("top_k",)),
    ("ok", {"top_k": "three"}, 400, ("top_k='three'", "integer")),
    ("ok", {"min_prob": "1.5"}, 400, ("min_prob", "[0, 1]")),
    ("ok", {"min_prob": "nan"}, 400, ("min_prob",)),
    ("ok", {"max_level": "street"}, 400, ("max_level", "country")),
    ("ok", {"exif": "trust"}, 400, ("exif", "compare")),
    ("ok", {"flat": "maybe"}, 400, ("flat", "true or false")),
    ("ok", {"colour": "red"}, 400, ("unknown option 'colour'",)),
])
def test_bad_requests_are_400_naming_the_field(client, images, files, data, status, fragments):
    parts = {"image-field": uploads(images[:1], field="image"), "ok": uploads(images[:1])}.get(files)
    if parts is None:  # a multipart body with no file at all
        response = client.post("/predict", data=data, files=[("note", (None, "no file here"))])
    else:
        response = client.post("/predict", files=parts, data=data)
    assert_json_error(response, status, *fragments)


def test_bad_explain_options_are_400(client, images):
    assert_json_error(client.post("/explain", files=uploads(images[:1]), data={"candidates": "all"}), 400,
                      "candidates")
    assert_json_error(client.post("/explain", files=uploads(images[:1]), data={"map_width": "99999"}), 400,
                      "map_width")


def test_a_body_that_is_not_multipart_is_415(client):
    assert_json_error(client.post("/predict", content=b"\xff\xd8 raw jpeg bytes",
                                  headers={"content-type": "image/jpeg"}), 415, "multipart/form-data")


def test_unknown_pages_and_methods_are_json_errors(client):
    assert_json_error(client.get("/nowhere"), 404, "/nowhere")
    assert_json_error(client.get("/predict"), 405, "GET")


def test_oversized_uploads_are_413_declared_or_streamed(model, tiny_model_dir, images):
    limits = Limits(max_upload_bytes=4096, max_files=2)
    big = ("file", ("big.jpg", bytes(8192), "image/jpeg"))
    with TestClient(create_app(model, tiny_model_dir, limits), raise_server_exceptions=False) as small:
        assert_json_error(small.post("/predict", files=[big]), 413, "4,096 bytes")

        def chunks():                       # no Content-Length: the limit is enforced while reading
            body, boundary = _multipart([("file", "big.jpg", bytes(8192))])
            for start in range(0, len(body), 1000):
                yield body[start:start + 1000]

        _, boundary = _multipart([])
        response = small.post("/predict", content=chunks(),
                              headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert_json_error(response, 413, "larger than the limit")
        assert_json_error(small.post("/predict", files=uploads(images[:3])), 400, "Too many files")
        assert small.post("/predict", files=uploads(images[:1])).status_code == 200


def _multipart(parts: list[tuple[str, str, bytes]], boundary: str = "hierloc-test-boundary") -> tuple[bytes, str]:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for field, name, data in parts) + f"--{boundary}--\r\n".encode()
    return body, boundary


def test_uploads_larger_than_the_parsers_spool_stay_in_memory(client, monkeypatch):
    """Starlette spools an upload over 1 MiB to a temporary file; the server's parser must never do so."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (900, 900, 3), dtype=np.uint8)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 2 * 1024 * 1024

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was written to a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_disk)
    response = client.post("/predict", files=[("file", ("noise.png", buffer.getvalue(), "image/png"))])
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["image"] == "noise.png"


# --------------------------------------------------------------------------------- batching, queue, timeout
def assert_close(got, want, where: str = "") -> None:
    """Equal JSON, floats up to float32 summation order (a batch of 4 vs a batch of 1)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for index, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, f"{where}[{index}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), where
    else:
        assert got == want, where


def hold_model(app, sizes: list | None = None) -> threading.Event:
    """Make the app's model calls wait until the returned event is set (then the real model answers); each call's
    number of images is appended to `sizes`."""
    gate = threading.Event()
    batcher = app.state.batcher
    compute = batcher.compute

    def held(key, batch):
        gate.wait(30)
        if sizes is not None:
            sizes.append(len(batch))
        return compute(key, batch)

    batcher.compute = held
    return gate


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_concurrent_requests_share_model_calls_and_get_their_own_answers(model, tiny_model_dir, images):
    app = create_app(model, tiny_model_dir)
    expected = {p.name: r.to_dict() for p, r in zip(images, model.predict([str(p) for p in images],
                                                                        top_k=PREDICT_DEFAULTS["top_k"]))}
    with TestClient(app, raise_server_exceptions=False) as client:
        batcher = app.state.batcher
        sizes = []
        gate = hold_model(app, sizes)
        results = {}

        def post(path):
            results[path.name] = client.post("/predict", files=uploads([path]))

        threads = [threading.Thread(target=post, args=(path,)) for path in images]
        threads[0].start()
        _wait_for(lambda: batcher.n_batches == 1)       # the first request holds the worker
        for thread in threads[1:]:
            thread.start()
        _wait_for(lambda: batcher.pending() == len(images) - 1)
        gate.set()
        for thread in threads:
            thread.join(60)
    assert sizes == [1, len(images) - 1]
    for name, response in results.items():
        record = response.json()["predictions"]
        assert len(record) == 1
        record[0]["image"] = expected[name]["image"] = name
        # batched with others vs alone: the same answer, floats equal up to float32 summation order
        assert_close(record[0], json.loads(json.dumps(expected[name])))


def test_a_full_queue_is_503_with_retry_after_and_the_waiting_requests_still_complete(model, tiny_model_dir,
                                                                                       images):
    app = create_app(model, tiny_model_dir, Limits(max_queue=1))
    with TestClient(app, raise_server_exceptions=False) as client:
        batcher = app.state.batcher
        gate = hold_model(app)
        results = []
        threads = [threading.Thread(target=lambda: results.append(client.post("/predict", files=uploads(images[:1]))))
                   for _ in range(2)]
        threads[0].start()
        _wait_for(lambda: batcher.n_batches == 1)
        threads[1].start()
        _wait_for(lambda: batcher.pending() == 1)
        refused = client.post("/predict", files=uploads(images[:1]))
        gate.set()
        for thread in threads:
            thread.join(60)
    assert_json_error(refused, 503, "busy")
    assert refused.headers["retry-after"] == "1"
    assert [r.status_code for r in results] == [200, 200]


def test_a_request_that_waits_longer_than_the_timeout_is_504(model, tiny_model_dir, images):
    app = create_app(model, tiny_model_dir, Limits(timeout_s=0.3))
    with TestClient(app, raise_server_exceptions=False) as client:
        batcher = app.state.batcher
        compute = batcher.compute
        gate = hold_model(app)
        response = client.post("/predict", files=uploads(images[:1]))
        gate.set()
        assert_json_error(response, 504, "0.3 s")
        batcher.compute = compute
        assert client.post("/predict", files=uploads(images[:1])).status_code == 200   # the worker lives on


def test_once_the_server_is_stopping_health_and_new_requests_are_503_and_close_the_connection(model, tiny_model_dir,
                                                                                               images):
    app = create_app(model, tiny_model_dir)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/health").status_code == 200
        assert client.post("/predict", files=uploads(images[:1])).status_code == 200
        client.portal.call(app.state.begin_shutdown)     # what hierloc.serve.server calls on SIGTERM
        health = client.get("/health")
        refused = client.post("/predict", files=uploads(images[:1]))
    assert health.status_code == 503 and health.json()["status"] == "shutting down"
    assert health.headers["connection"] == "close"
    assert_json_error(refused, 503, "shutting down")
    assert refused.headers["connection"] == "close" and refused.headers["retry-after"] == "1"


def test_an_internal_error_is_a_one_line_json_500_without_traceback(model, tiny_model_dir, images):
    app = create_app(model, tiny_model_dir)
    with TestClient(app, raise_server_exceptions=False) as client:
        def broken(key, batch):
            raise RuntimeError("the model fell over\nsecond line")

        app.state.batcher.compute = broken
        body = assert_json_error(client.post("/predict", files=uploads(images[:1])), 500, "RuntimeError",
                                 "the model fell over")
        assert "second line" not in body["error"]


# ----------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, message", [(["--max-upload-mb", "0"], "--max-upload-mb"),
                                           (["--max-queue", "0"], "--max-queue"), (["--timeout", "-1"], "--timeout"),
                                           (["--port", "70000"], "--port"), (["--threads", "-1"], "--threads"),
                                           (["--stall-timeout", "0"], "--stall-timeout"),
                                           (["--body-timeout", "-5"], "--body-timeout"),
                                           (["--shutdown-timeout", "0"], "--shutdown-timeout"),
                                           (["--max-connections", "0"], "--max-connections")])
def test_serve_refuses_bad_limits_in_one_line(tiny_model_dir, capsys, argv, message):
    code = main(["serve", "--model", str(tiny_model_dir), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("hierloc: error:") and message in err and len(err.strip().splitlines()) == 1


def test_the_command_serves_on_loopback_until_stopped(tiny_model_dir):
    """`hierloc serve` as a user runs it: a process on 127.0.0.1 answering /health, stopped by a signal."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "hierloc", "-q", "serve", "--model", str(tiny_model_dir),
                                "--port", str(port), "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        body = wait_for_health(process, port)
        assert body["status"] == "ok" and body["model"]["model_dir"] == tiny_model_dir.name
        listening = [c for c in _listening_sockets(port)]
        assert listening and all(address.startswith("127.0.0.1") for address in listening)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    assert process.returncode == 0
    assert "Traceback" not in process.stderr.read()


def _listening_sockets(port: int) -> list[str]:
    """Local addresses listening on `port` (from /proc/net/tcp and tcp6, state 0A = LISTEN)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append("127.0.0.1" if address in ("0100007F", "00000000000000000000000001000000")
                             else address)
    return found


def test_without_the_server_packages_the_command_says_what_to_install(tiny_model_dir, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)       # as if uvicorn were not installed
    code = main(["serve", "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "needs uvicorn" in err and "pip install" in err and len(err.strip().splitlines()) == 1, err
