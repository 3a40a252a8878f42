"""Nothing about the server's file system reaches a client: every endpoint the app exposes (enumerated from its
routes, so that a new one is covered without editing this test), with good and bad requests, answers bodies and
headers that hold none of the absolute paths of the model directory, the training CSV, the backbone, the
gazetteer, the temporary directory or the home directory."""

from __future__ import annotations

import base64
import io
import re
import tempfile
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("starlette", reason="starlette is not installed")
pytest.importorskip("python_multipart", reason="python-multipart is not installed")
pytest.importorskip("httpx", reason="httpx (Starlette's test client) is not installed")

from starlette.routing import Mount, Route  # noqa: E402
from starlette.staticfiles import StaticFiles  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from hierloc.inference.explain import provenance_line  # noqa: E402
from hierloc.serve.app import Limits, create_app  # noqa: E402
from tests.helpers import make_bomb_png, make_text_as_jpeg, make_truncated_jpeg  # noqa: E402

DATA_URL = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
LIMITS = Limits(max_upload_bytes=256 * 1024)       # small enough to send an oversized body cheaply


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from hierloc.inference.predictor import HierLoc

    return HierLoc.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def secrets(tiny_model_dir, tiny_demo_dir, tiny_backbone_dir) -> dict[str, str]:
    """{what: absolute path} a client must never see. Long paths are also searched in the decoded PNGs; the
    short ones (the temp and home directories) only in text, where '/tmp/' cannot occur by chance."""
    found = {"model dir": str(tiny_model_dir), "training csv": str(tiny_demo_dir / "train.csv"),
             "training data dir": str(tiny_demo_dir), "backbone dir": str(tiny_backbone_dir),
             "gazetteer": str(tiny_model_dir / "gazetteer"),
             "temp dir": str(Path(tempfile.gettempdir()).resolve()).rstrip("/") + "/"}
    home = str(Path.home()).rstrip("/")
    if home:                                   # a home of "/" names nothing
        found["home dir"] = home + "/"
    return found


def assert_no_secret(response, secrets: dict[str, str], where: str) -> None:
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    text = response.content.decode("utf-8", errors="replace")
    pictures = [base64.b64decode(encoded) for encoded in DATA_URL.findall(text)]
    text = DATA_URL.sub("data:image/png;base64,...", text)    # base64 can spell anything: decoded below
    if response.headers.get("content-type", "").startswith("image/"):
        pictures.append(response.content)
        text = ""
    for what, path in secrets.items():
        assert path not in text, f"{where}: the body names the {what} ({path})"
        assert path not in headers, f"{where}: a header names the {what} ({path})"
        if len(path) > 12:
            assert not any(path.encode() in picture for picture in pictures), f"{where}: a picture holds the {what}"


def _bad_uploads(d: Path) -> dict[str, list]:
    return {"truncated": [("file", ("cut.jpg", make_truncated_jpeg(d).read_bytes(), "image/jpeg"))],
            "text": [("file", ("notes.jpg", make_text_as_jpeg(d).read_bytes(), "image/jpeg"))],
            "bomb": [("file", ("bomb.png", make_bomb_png(d).read_bytes(), "image/png"))],
            "empty": [("file", ("empty.jpg", b"", "image/jpeg"))],
            "oversized": [("file", ("big.jpg", bytes(LIMITS.max_upload_bytes + 1), "image/jpeg"))],
            "wrong field": [("image", ("a.jpg", b"\xff\xd8", "image/jpeg"))]}


def _requests_for(route, good: list, bad: dict[str, list]) -> list[tuple[str, str, dict]]:
    """(method, path, keyword arguments of the test client's request) that exercise one route."""
    if isinstance(route, Mount):
        assert isinstance(route.app, StaticFiles), f"{route.path}: a mount this test does not know: cover it"
        directory = Path(route.app.directory)
        files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
        assert files, f"{route.path}: nothing to fetch"
        return ([("GET", f"{route.path}/{name}", {}) for name in files]
                + [("GET", f"{route.path}/no-such-file.js", {}), ("GET", f"{route.path}/../../etc/passwd", {})])
    assert isinstance(route, Route), f"{route}: a route kind this test does not know: cover it"
    assert "{" not in route.path, f"{route.path}: a path parameter this test does not fill in: cover it"
    out = []
    for method in sorted(route.methods):
        if method in ("GET", "HEAD"):
            out.append((method, route.path, {}))
        elif method == "POST":
            out += [("POST", route.path, {"files": good}), ("POST", route.path, {"files": good, "data": {"top_k": "x"}}),
                    ("POST", route.path, {"content": b"raw", "headers": {"content-type": "image/jpeg"}}),
                    ("GET", route.path, {})]
            out += [("POST", route.path, {"files": files}) for files in bad.values()]
        else:
            raise AssertionError(f"{route.path}: method {method} is not covered by this test")
    return out


def test_no_endpoint_names_a_path_of_the_server(model, tiny_model_dir, tiny_demo_dir, secrets, tmp_path):
    image = sorted((tiny_demo_dir / "images" / "test_nearby").glob("*.jpg"))[0]
    good = [("file", (image.name, image.read_bytes(), "image/jpeg"))]
    bad = _bad_uploads(tmp_path)
    app = create_app(model, tiny_model_dir, LIMITS)
    seen_status: dict[str, set[int]] = {}
    with TestClient(app, raise_server_exceptions=False) as client:
        for route in app.routes:
            for method, path, kwargs in _requests_for(route, good, bad):
                response = client.request(method, path, **kwargs)
                seen_status.setdefault(route.path, set()).add(response.status_code)
                assert response.status_code < 500, (method, path, response.text)
                assert_no_secret(response, secrets, f"{method} {path}")
        assert_no_secret(client.get("/nowhere/at/all"), secrets, "GET /nowhere/at/all")
        health = client.get("/health").json()
        explained = client.post("/explain", files=good).json()["explanations"][0]
    # the requests did reach every endpoint, with good and bad answers alike
    assert {200, 400, 405, 413, 415, 422} <= seen_status["/predict"]
    assert {200, 400, 405, 413, 415, 422} <= seen_status["/explain"]
    assert seen_status["/static"] == {200, 404}
    # the model is still named: by the base names
    assert health["model"]["model_dir"] == tiny_model_dir.name
    assert health["model"]["backbone"] == Path(model.cfg.model.backbone).name
    assert explained["model"]["model_dir"] == tiny_model_dir.name
    assert explained["model"]["train_csv"] == "train.csv"
    # the map's header draws this line (hierloc.inference.map_layout): names only there too
    header = provenance_line(explained["model"])
    assert f"model {tiny_model_dir.name}" in header
    assert not any(path in header for path in secrets.values())
    with Image.open(io.BytesIO(base64.b64decode(explained["map_png"].split(",", 1)[1]))) as png:
        assert not [value for value in png.info.values() if isinstance(value, str) and "/" in value]


def test_error_messages_from_the_library_have_paths_reduced_to_names(model, tiny_model_dir, tiny_demo_dir, secrets):
    image = sorted((tiny_demo_dir / "images" / "test_nearby").glob("*.jpg"))[0]
    good = [("file", (image.name, image.read_bytes(), "image/jpeg"))]
    missing = tiny_model_dir / "gazetteer" / "basemap.jpg"
    app = create_app(model, tiny_model_dir)
    with TestClient(app, raise_server_exceptions=False) as client:
        def broken(key, images):
            raise FileNotFoundError(f"[Errno 2] No such file or directory: '{missing}'")

        app.state.batcher.compute = broken
        response = client.post("/predict", files=good)
    assert response.status_code == 500
    assert_no_secret(response, secrets, "POST /predict (an internal error naming a file)")
    assert "'basemap.jpg'" in response.json()["error"]
