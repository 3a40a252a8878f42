"""`hierloc serve`: a loaded model behind a small HTTP API (Starlette, served by uvicorn) and a page to try it.

Endpoints (every error is JSON ``{"error": "<one line naming what was wrong>", ...}`` with a 4xx status, 503
when the queue is full, 504 on timeout, never a traceback):

* ``GET /health``: {"status": "ok", "version", "model": `HierLoc.describe()`, "gazetteer": {hash, entities},
  "queue": {pending, max_queue, max_batch}, "limits": {...}}.
* ``POST /predict``: multipart/form-data, the images in the field ``file`` (repeatable); options as form fields
  or query parameters, named as `hierloc predict`'s (``top_k`` or ``top-k``, ``beam``, ``min_prob``,
  ``max_level``, ``exif``, ``flat``), with its defaults. Answers the document of ``hierloc predict --format json``
  (`hierloc.inference.outputs.json_document`: {"model", "predictions", "summary"}), each image named by its
  upload's file name. An image that cannot be read (empty, truncated, not an image, a decompression bomb) makes the
  request 422 with ``images``: [{"image", "error"}] naming each.
* ``POST /explain``: the same upload; options as `hierloc explain`'s (top_k, beam, runners_up, reasons,
  candidates) plus ``map`` (1/0, default 1) and ``map_width`` (pixels). Answers {"model", "explanations":
  [`Explanation` as `hierloc explain --format json`, plus "map_png": a data: URL of the map]}.
* ``GET /``: the page (``static/index.html`` and its script and style, all shipped in the package).

Safety defaults: the CLI binds 127.0.0.1; the request body is capped (`Limits.max_upload_bytes`, checked on the
Content-Length header and again while reading, so a chunked upload cannot exceed it either) and held in memory
(the multipart parser's spool never reaches its disk threshold); a body that stalls (`Limits.stall_timeout_s`
without a byte) or takes too long in all (`Limits.body_timeout_s`) is answered 408 and its connection closed, and
a slow uploader never holds up other requests (the event loop serves them meanwhile); at most `Limits.max_files`
images per request; the model's answer is awaited at most `Limits.timeout_s`; images pass the same guards as in
the CLI (`hierloc.data.images.load_image`: decompression bombs refused from their header). Nothing is written to
disk. Nothing about the server's file system reaches a client: the model's description names files by their base
names (`hierloc.inference.names`) and error messages have absolute paths reduced to base names.

Stopping (`begin_shutdown`, called by `hierloc.serve.server` on SIGTERM or Ctrl-C once the listening socket is
closed): requests already waiting for the model are still answered for half of `Limits.shutdown_timeout_s`, then
the ones still waiting get 503; a request that reaches the model later gets 503 at once, and /health answers 503
with status "shutting down".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from hierloc.data.encoded import EncodedImage
from hierloc.errors import InputError
from hierloc.inference import explain, maps, pictures
from hierloc.inference.answers import check_options
from hierloc.inference.names import scrub_paths
from hierloc.inference.outputs import RunSummary, json_document, search_settings
from hierloc.serve.batching import MicroBatcher, QueueFull, ShuttingDown
from hierloc.version import __version__

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Options and their defaults, as `hierloc predict` and `hierloc explain` have them (a test compares the two);
# beam, top_k None: the model's inference.beam / inference.top_k (`HierLoc.search_options`).
PREDICT_DEFAULTS = {"top_k": None, "beam": None, "min_prob": None, "max_level": "city",
                    "exif": "compare", "flat": False, "coverage": None}
EXPLAIN_DEFAULTS = {"top_k": None, "beam": None, "runners_up": 2, "reasons": 3,
                    "candidates": "siblings", "min_prob": None, "exif": "compare", "map": True, "map_width": 900}
OPTION_TYPES = {"top_k": int, "beam": int, "min_prob": float, "max_level": str, "exif": str, "flat": bool,
                "coverage": float,
                "runners_up": int, "reasons": int, "candidates": str, "map": bool, "map_width": int}
MAP_WIDTH_RANGE = (300, 2000)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_upload_bytes: int = 20 * 1024 * 1024   # the whole multipart body
    max_files: int = 16                        # images per request
    timeout_s: float = 30.0                    # waiting for the model (queue + computation)
    max_queue: int = 64                        # requests waiting for the model; more -> 503
    max_batch: int = 32                        # images per model call
    retry_after_s: int = 1                     # the Retry-After of a 503
    stall_timeout_s: float = 10.0              # a request body sending nothing for this long -> 408, closed
    body_timeout_s: float = 120.0              # the whole request body within this -> else 408, closed
    shutdown_timeout_s: float = 5.0            # after SIGTERM: queued requests answered for half of it, then 503;
                                               # the server stops waiting for open connections after all of it
    max_connections: int = 256                 # open connections at most; a request on one more -> 503


class ApiError(Exception):
    """A request the server refuses: HTTP status and a one-line message (plus optional JSON fields); close: the
    answer asks to close the connection (``Connection: close``)."""

    def __init__(self, status: int, message: str, close: bool = False, **extra):
        super().__init__(message)
        self.status = status
        self.close = close
        self.extra = extra


# ------------------------------------------------------------------------------------------ reading a request
class InMemoryMultiPartParser(MultiPartParser):
    """Starlette's multipart parser with its spool threshold at the body limit: uploads stay in memory."""

    def __init__(self, *args, spool_max_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.spool_max_size = spool_max_size


async def _limited(stream: AsyncIterator[bytes], limits: Limits) -> AsyncIterator[bytes]:
    """The request body's chunks, stopping with 413 as soon as more than `limits.max_upload_bytes` arrived, and
    with 408 (connection closed) when no chunk came for `limits.stall_timeout_s` or the body is not complete after
    `limits.body_timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout_s
    chunks = stream.__aiter__()
    total = 0
    while True:
        left = deadline - loop.time()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(chunks.__anext__(), min(limits.stall_timeout_s, left))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:   # the builtin TimeoutError from Python 3.11
            if loop.time() >= deadline:
                raise ApiError(408, f"request body not complete after {limits.body_timeout_s:g} s "
                                    f"({total:,} bytes received)", close=True) from None
            raise ApiError(408, f"request body stalled: nothing received for {limits.stall_timeout_s:g} s "
                                f"({total:,} bytes received)", close=True) from None
        total += len(chunk)
        if total > limits.max_upload_bytes:
            raise ApiError(413, f"request body larger than the limit of {limits.max_upload_bytes:,} bytes")
        yield chunk


async def read_upload(request: Request, limits: Limits) -> tuple[list[EncodedImage], dict[str, str]]:
    """A multipart request -> (its images from the field ``file``, in order; its other fields and the query
    parameters, names with '-' read as '_'). Raises ApiError (400, 413, 415) naming what was wrong."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, f"expected a multipart/form-data body with the images in the field 'file', got "
                            f"content type {content_type or 'none'!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_upload_bytes:
        raise ApiError(413, f"request body of {int(declared):,} bytes is larger than the limit of "
                            f"{limits.max_upload_bytes:,} bytes")
    parser = InMemoryMultiPartParser(request.headers, _limited(request.stream(), limits),
                                     max_files=limits.max_files, max_fields=32,
                                     spool_max_size=limits.max_upload_bytes + 1)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from None
    images: list[EncodedImage] = []
    fields = {key.replace("-", "_"): value for key, value in request.query_params.items()}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != "file":
                    raise ApiError(400, f"field {name!r}: send the images in the field 'file' (repeatable)")
                images.append(EncodedImage(value.filename or f"upload-{len(images) + 1}", await value.read()))
            else:
                fields[name.replace("-", "_")] = value
    finally:
        await form.close()
    if not images:
        raise ApiError(400, "no image: send one or more image files in the multipart field 'file'")
    return images, fields


def _option(fields: dict[str, str], name: str, kind: type, default):
    """One option from the form/query fields, converted to `kind`, or the default when absent or empty."""
    text = fields.get(name)
    if text is None or str(text).strip() == "":
        return default
    text = str(text).strip()
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ApiError(400, f"option {name}={text!r}: expected true or false")
    try:
        return kind(text)
    except ValueError:
        raise ApiError(400, f"option {name}={text!r}: expected {'an integer' if kind is int else 'a number'}") \
            from None


def _options(fields: dict[str, str], defaults: dict) -> dict:
    """Form/query fields -> {name: value} for every option of `defaults` (typed by OPTION_TYPES); unknown names
    are refused."""
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        raise ApiError(400, f"unknown option {unknown[0]!r}: expected {', '.join(defaults)}")
    return {name: _option(fields, name, OPTION_TYPES[name], default) for name, default in defaults.items()}


def predict_options(fields: dict[str, str]) -> dict:
    """Form/query fields -> keyword arguments of `HierLoc.predict` (checked as the CLI checks them)."""
    options = _options(fields, PREDICT_DEFAULTS)
    try:
        check_options(options["min_prob"], options["max_level"], options["exif"], options["beam"], options["top_k"])
    except InputError as exc:
        raise ApiError(400, f"option {exc}") from None
    if options["coverage"] is not None and not 0.0 < options["coverage"] < 1.0:
        raise ApiError(400, f"option coverage={options['coverage']}: expected a probability in (0, 1), e.g. 0.9")
    return options


def explain_options(fields: dict[str, str]) -> dict:
    """Form/query fields -> options of `hierloc.inference.explain.explain_images` plus map and map_width."""
    options = _options(fields, EXPLAIN_DEFAULTS)
    try:
        check_options(options["min_prob"], "city", "compare", options["beam"], options["top_k"])
    except InputError as exc:
        raise ApiError(400, f"option {exc}") from None
    for name in ("runners_up", "reasons"):
        if options[name] < 0:
            raise ApiError(400, f"option {name}={options[name]}: expected an integer >= 0")
    if options["candidates"] not in ("siblings", "paths"):
        raise ApiError(400, f"option candidates={options['candidates']!r}: expected siblings or paths")
    if options["exif"] not in ("compare", "ignore"):
        raise ApiError(400, f"option exif={options['exif']!r}: expected compare or ignore (an explanation explains "
                            "the model's answer)")
    low, high = MAP_WIDTH_RANGE
    if not low <= options["map_width"] <= high:
        raise ApiError(400, f"option map_width={options['map_width']}: expected {low} to {high} pixels")
    return options


# ---------------------------------------------------------------------------------------------- the model side
class ModelService:
    """The loaded model and what the batcher's worker calls: `compute(key, images)`, key = (endpoint, options)."""

    def __init__(self, model, model_dir: str | Path | None):
        self.model = model
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.vocabulary, self.profiles = explain.load_concept_parts(model, self.model_dir)

    def compute(self, key: tuple, images: list[EncodedImage]) -> list:
        endpoint, options = key[0], dict(key[1])
        if endpoint == "predict":
            return self.model.predict(images, on_error="return", **options)
        return self.explain(images, options)

    def explain(self, images: list[EncodedImage], options: dict) -> list:
        """One `Explanation` per image, or an `InputError` in the place of an image that cannot be read."""
        try:
            return self._explain(images, options)
        except InputError:
            if len(images) == 1:
                raise
        out: list = []
        for image in images:     # one bad image must not fail the others of the batch
            try:
                out += self._explain([image], options)
            except InputError as exc:
                out.append(exc)
        return out

    def _explain(self, images: list[EncodedImage], options: dict) -> list:
        try:
            return explain.explain_images(self.model, images, model_dir=self.model_dir, top_k=options["top_k"],
                                          beam=options["beam"], n_reasons=options["reasons"],
                                          n_runners_up=options["runners_up"], candidates=options["candidates"],
                                          vocabulary=self.vocabulary, profiles=self.profiles, exif=options["exif"],
                                          min_prob=options["min_prob"])
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - an image the preprocessor cannot use is the request's fault
            if len(images) == 1:
                raise InputError(f"{images[0].name}: cannot use this image ({type(exc).__name__}: {exc})") \
                    from None
            raise InputError(str(exc)) from None

    def health(self) -> dict:
        description = self.model.describe()
        return {"status": "ok", "version": __version__, "model": description,
                "gazetteer": {"hash": description["gazetteer_hash"],
                              "entities": description["gazetteer_entities"]}}


def _key(endpoint: str, options: dict) -> tuple:
    return endpoint, tuple(sorted(options.items()))


def _map_data_url(explanation, width: int) -> str:
    image = maps.render_prediction_map(explanation, width=width)
    return "data:image/png;base64," + base64.b64encode(pictures.png_bytes(image)).decode("ascii")


# ----------------------------------------------------------------------------------------------------- the app
def create_app(model, model_dir: str | Path | None = None, limits: Limits | None = None) -> Starlette:
    """A Starlette app serving `model` (a loaded `hierloc.HierLoc`); model_dir: its directory (provenance and
    concept vocabulary for /explain). The batcher starts and stops with the app's lifespan."""
    limits = limits or Limits()
    service = ModelService(model, model_dir)
    batcher = MicroBatcher(service.compute, max_queue=limits.max_queue, max_batch=limits.max_batch)

    async def submit(endpoint: str, options: dict, images: list[EncodedImage]) -> list:
        try:
            return await batcher.submit(_key(endpoint, options), images, timeout=limits.timeout_s)
        except QueueFull as exc:
            raise ApiError(503, f"the server is busy ({exc}); retry shortly",
                           retry_after_s=limits.retry_after_s) from None
        except ShuttingDown as exc:
            raise ApiError(503, str(exc), close=True, retry_after_s=limits.retry_after_s) from None
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11
            raise ApiError(504, f"no answer from the model within {limits.timeout_s:g} s") from None

    async def health(request: Request) -> Response:
        body = service.health()
        body["queue"] = {"pending": batcher.pending(), "max_queue": limits.max_queue,
                         "max_batch": limits.max_batch}
        body["limits"] = asdict(limits)
        if batcher.closing:
            body["status"] = "shutting down"
            body["error"] = "the server is shutting down"
            return JSONResponse(body, status_code=503, headers={"Connection": "close"})
        return JSONResponse(body)

    async def predict(request: Request) -> Response:
        summary = RunSummary()      # timed from here: the summary's seconds are the request's
        images, fields = await read_upload(request, limits)
        options = predict_options(fields)
        # as `hierloc predict`: the model's beam and top_k unless given, named in the answer's header
        options["beam"], options["top_k"] = service.model.search_options(options["beam"], options["top_k"])
        records = await submit("predict", options, images)
        failed = [record for record in records if not record.ok]
        if failed:
            raise ApiError(422, _failures_message([(r.image, r.error) for r in failed]),
                           images=[{"image": r.image, "error": r.error} for r in failed])
        description = service.model.describe()
        description["search"] = search_settings(options["flat"], options["beam"], options["top_k"],
                                                options["min_prob"], options["max_level"], options["exif"])
        return Response(json_document(description, records, summary), media_type="application/json")

    async def explain_endpoint(request: Request) -> Response:
        images, fields = await read_upload(request, limits)
        options = explain_options(fields)
        draw, width = options.pop("map"), options.pop("map_width")
        try:
            results = await submit("explain", options, images)
        except InputError as exc:   # a single bad image of a batch: the whole group failed with it
            raise ApiError(422, str(exc), images=[{"image": images[0].name, "error": str(exc)}]) from None
        failed = [(image.name, str(result)) for image, result in zip(images, results)
                  if isinstance(result, InputError)]
        if failed:
            raise ApiError(422, _failures_message(failed), images=[{"image": n, "error": e} for n, e in failed])
        body = json.loads(explain.to_json(results))
        if draw:
            for item, result in zip(body, results):
                item["map_png"] = await run_in_threadpool(_map_data_url, result, width)
        model_info = body[0]["model"] if body else {}
        return Response(json.dumps({"model": model_info, "explanations": body}, ensure_ascii=False,
                                   allow_nan=False), media_type="application/json")

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = Starlette(routes=[Route("/", index), Route("/health", health),
                            Route("/predict", predict, methods=["POST"]),
                            Route("/explain", explain_endpoint, methods=["POST"]),
                            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static")],
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error},
                    lifespan=lifespan)
    drains: list[asyncio.Task] = []

    def begin_shutdown() -> None:
        """Stop taking requests to the model; answer the queued ones for half of the shutdown timeout, then 503
        (called on the event loop)."""
        if not drains:
            drains.append(asyncio.get_running_loop().create_task(batcher.drain(limits.shutdown_timeout_s / 2),
                                                                 name="hierloc-drain"))

    app.state.batcher = batcher
    app.state.limits = limits
    app.state.begin_shutdown = begin_shutdown
    return app


def _failures_message(failed: list[tuple[str, str]]) -> str:
    first_name, first_error = failed[0]
    text = first_error if first_error.startswith(f"{first_name}: ") else f"{first_name}: {first_error}"
    more = len(failed) - 1
    return text + (f" (and {more} more unreadable image{'s' if more > 1 else ''})" if more else "")


async def _api_error(request: Request, exc: ApiError) -> Response:
    headers = {"Retry-After": str(exc.extra["retry_after_s"])} if "retry_after_s" in exc.extra else {}
    if exc.close:
        headers["Connection"] = "close"
    extra = {k: v for k, v in exc.extra.items() if k != "retry_after_s"}
    if "images" in extra:      # the library's messages may name files of the server
        extra["images"] = [{**item, "error": scrub_paths(str(item["error"]))} for item in extra["images"]]
    body = {"error": scrub_paths(str(exc)), "status": exc.status, **extra}
    return JSONResponse(body, status_code=exc.status, headers=headers or None)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    messages = {404: f"no such page: {request.url.path}",
                405: f"method {request.method} not allowed on {request.url.path}"}
    text = messages.get(exc.status_code, str(exc.detail))
    return JSONResponse({"error": text, "status": exc.status_code}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s: internal error: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    first_line = scrub_paths(str(exc).splitlines()[0]) if str(exc) else ""
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {first_line}", "status": 500},
                        status_code=500)

