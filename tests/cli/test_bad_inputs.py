"""The bad-input battery (issue 7): every odd image, CSV, gazetteer and checkpoint through every command that reads
it, in process through `hierloc.cli.main`.

For each (case, command), `test_bad_input` asserts what the user gets (`check_result`):
- an error: a non-zero exit code and ONE line ``hierloc: error: ...`` naming the file (and row/field) and what was
  expected; or, where going on is the documented behaviour ("counted": an unreadable image in
  `predict`/`eval`/`train`, a bad coordinate in `train`, duplicate rows anywhere), a one-line warning naming the
  file and the reason, and the run goes on;
- a valid but unusual input (alpha, palette, 16-bit, CMYK, EXIF rotation, a non-ASCII path): exit 0;
- never a traceback, a Python warning, or any other stray stderr line;
- input files byte-identical before and after (sha256 of every file under the case's input directory);
plus a few case-specific checks (`_more`: the JSONL record of a single image, no pickle marker, 11 duplicate rows
in and out, the non-ASCII name intact). Pairs that do not meet the contract yet because of code owned elsewhere
are `xfail(strict=True)` (`Case.gaps`).

The catalogue (`CASES`, `run_case`) is also what `tests/bad_inputs_table.py` runs to print the table of
docs/reliability.md. What needs more than one CLI run has its own test below: the decoded pixels of unusual colour
modes and of EXIF-rotated photos (and the answers they give), the bomb refused from its header, the pickle's
control, a 1M-row file in bounded memory (slow).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import pickle
import re
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from hierloc.cli import main
from tests.helpers import (TINY_MODEL_OVERRIDES, make_bomb_png, make_text_as_jpeg, make_truncated_jpeg,
                           noise_image)

# ------------------------------------------------------------------------------------------------ the world
# Overrides of a 1-step training run on a few rows (like tests/helpers.py's TINY_OVERRIDES, smaller batch,
# no concept head: it needs >= 20 labelled images per concept and only warns about it here).
TRAIN_OVERRIDES = ["model.pretrained=false", "model.image_size=32", "model.embed_dim=16", "model.head_hidden=32", "model.entity_hidden=32",
                   "model.coord_scales=4", "model.concepts=false", "train.batch_size=4", "train.epochs=1",
                   "train.num_workers=0", "train.max_steps=1"]


@dataclass(frozen=True)
class World:
    """What the cases run against (all read-only; cases copy what they damage)."""

    model_dir: Path                 # a trained tiny model (tests/conftest.py's tiny_model_dir)
    backbone_dir: Path              # its backbone config (training builds from it)
    other_gazetteer_dir: Path       # a gazetteer of other countries (a different content hash)
    rows: tuple                     # ((absolute image path, lat_deg, lon_deg), ...) of readable training images

    @property
    def gazetteer_dir(self) -> Path:
        """The gazetteer the model was trained on."""
        return self.model_dir / "gazetteer"


def world_from(model_dir: Path, demo_dir: Path, backbone_dir: Path, other_gazetteer_dir: Path) -> World:
    rows = []
    with open(demo_dir / "train.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            rows.append((str((demo_dir / row["image"]).resolve()), float(row["lat"]), float(row["lon"])))
            if len(rows) == 8:
                break
    return World(Path(model_dir), Path(backbone_dir), Path(other_gazetteer_dir), tuple(rows))


# ---------------------------------------------------------------------------------------- running the CLI
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the CLI's (hierloc.cli._configure_logging)
# Every stderr line the user may see starts like this; anything else (a traceback, a Python warning's source
# line, a stray print) fails the test.
KNOWN_LINE = re.compile(r"^(hierloc: error: |hierloc: internal error: |hierloc predict: |wrote |map written |"
                        r"(WARNING|ERROR|CRITICAL) [\w.]+: )")
# The summary line of each command (stdout or stderr) when it goes through.
SUMMARY_LINE = re.compile(r"^(hierloc predict: |trained \d|  samples scored|wrote [\d,]+ of |.*: [\d,]+ points read|"
                          r"  country: |wrote )")


@dataclass
class Outcome:
    code: int
    out: str
    err: str            # stderr as the user sees it: printed lines, log records (WARNING+), Python warnings
    seconds: float

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    @property
    def errors(self) -> list[str]:
        return [line for line in self.err_lines if line.startswith("hierloc: error: ")]

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.err_lines if line.startswith("WARNING ")]

    def summary(self) -> str:
        """The command's own one-line account of a run that went through (counts), or ''."""
        for line in self.out.splitlines() + self.err_lines:
            if SUMMARY_LINE.match(line):
                return " ".join(line.split())
        return ""

    @property
    def strays(self) -> list[str]:
        """stderr lines that are none of the known one-line forms (tracebacks, Python warnings, ...)."""
        return [line for line in self.err_lines if not KNOWN_LINE.match(line)]

    def message(self) -> str:
        """What the user is told about the input: the error line, else the warnings and the summary; then a
        note of any stray stderr lines (there should be none)."""
        internal = [line for line in self.err_lines if line.startswith("hierloc: internal error: ")]
        if self.errors or internal:
            text = (self.errors or internal)[0]
        else:
            text = " / ".join([*self.warnings, self.summary()]).strip(" /")
        if self.strays:
            text += f" [and {len(self.strays)} other stderr lines, first: {self.strays[0].strip()[:120]}]"
        return text


def _user_warning_filters() -> None:
    """Python's default filters, as a user running `hierloc` sees them (DeprecationWarnings hidden)."""
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)


def run_cli(argv: list) -> Outcome:
    """`hierloc.cli.main(argv)` in this process; stdout, stderr, WARNING+ log records and Python warnings
    captured the way a terminal would show them.

    torch runs on one intra-op thread meanwhile: the models are tiny, and on a shared 2-core machine thread
    hand-offs cost more than they save (a tiny-model `predict`: 0.57 s with 2 threads, 0.10 s with 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_cli(argv)
    finally:
        torch.set_num_threads(threads)


def _run_cli(argv: list) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            _user_warning_filters()
            code = main([str(arg) for arg in argv])
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
    seconds = time.perf_counter() - start
    text = err.getvalue() + "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, "")
                                    for w in caught)
    return Outcome(code, out.getvalue(), text, seconds)


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below `root` (symlinks followed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------- images
def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def make_zero_byte(d: Path) -> Path:
    (d / "empty.jpg").write_bytes(b"")
    return d / "empty.jpg"


def make_png_alpha(d: Path) -> Path:
    """RGBA noise, alpha 255 on a checkerboard and 0 elsewhere (so the expected composite is exact)."""
    image = noise_image(mode="RGBA")
    pixels = np.asarray(image).copy()
    yy, xx = np.mgrid[: pixels.shape[0], : pixels.shape[1]]
    pixels[..., 3] = np.where((yy // 4 + xx // 4) % 2 == 0, 255, 0)
    return _save(Image.fromarray(pixels, "RGBA"), d / "alpha.png")


def make_palette_png(d: Path) -> Path:
    return _save(noise_image().quantize(colors=16), d / "palette.png")


def make_png_16bit(d: Path) -> Path:
    grey = np.asarray(noise_image().convert("L")).astype(np.uint16) * 257  # 8-bit values scaled to the 16-bit range
    image = Image.fromarray(grey)
    assert image.mode == "I;16"
    return _save(image, d / "deep16.png")


def make_grey_jpeg(d: Path) -> Path:
    return _save(noise_image().convert("L"), d / "grey.jpg", quality=95)


def make_cmyk_jpeg(d: Path) -> Path:
    return _save(noise_image().convert("CMYK"), d / "cmyk.jpg", quality=95)


EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the stored pixels upright.
ORIENTATION_FIX = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}


def make_exif_rotated(d: Path, orientation: int = 6) -> Path:
    """A landscape-stored JPEG whose EXIF says: rotate 90 degrees clockwise to display (a phone held upright)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return _save(noise_image((48, 32), seed=3), d / f"rotated-{orientation}.jpg", exif=exif.tobytes(), quality=95)


def make_missing_image(d: Path) -> Path:
    return d / "no such photo.jpg"


def make_dir_without_images(d: Path) -> Path:
    album = d / "empty album"
    album.mkdir()
    (album / "README.txt").write_text("no photos here\n", encoding="utf-8")
    return album


def make_unicode_path(d: Path) -> Path:
    return _save(noise_image(seed=5), d / "holiday photos" / "Zürich café 東京 ☀.jpg", quality=95)


# ----------------------------------------------------------------------------------------------------- CSVs
def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _good_rows(world: World, n: int = 8) -> list[list]:
    return [[path, repr(lat), repr(lon)] for path, lat, lon in world.rows[:n]]


def _csv_case(name: str, header: list[str], edit: Callable[[list[list]], list[list]] = lambda rows: rows):
    def make(d: Path, world: World) -> Path:
        (d / name).write_bytes(_csv_bytes(header, edit(_good_rows(world))))
        return d / name
    return make


def _set(row_index: int, column: int, value: str):
    def edit(rows):
        rows[row_index][column] = value
        return rows
    return edit


def make_empty_csv(d: Path, world: World) -> Path:
    (d / "empty.csv").write_bytes(b"")
    return d / "empty.csv"


def _swap_row(rows):
    """Row 2 gets (lat, lon) = (151.21, -33.87): Sydney with its columns swapped."""
    rows[1][1], rows[1][2] = "151.21", "-33.87"
    return rows


def _duplicate_rows(rows):
    """Rows 9 and 10 repeat row 1 exactly; row 11 repeats row 2."""
    return rows + [list(rows[0]), list(rows[0]), list(rows[1])]


def make_non_utf8_csv(d: Path, world: World) -> Path:
    """Row 3's image name has a Latin-1 byte (0xe9, 'é' in Latin-1) in a file that must be UTF-8."""
    data = _csv_bytes(["image", "lat", "lon"], _good_rows(world)).split(b"\n")
    data[3] = data[3].replace(b".jpg", b"-caf\xe9.jpg", 1)
    (d / "latin1.csv").write_bytes(b"\n".join(data))
    return d / "latin1.csv"


def predictions_variant(path: Path) -> Path:
    """The same CSV as `hierloc eval --predictions` reads it: lat/lon become true_lat/true_lon (any spelling),
    plus pred_lat/pred_lon columns with a valid point. Bytes that are not UTF-8 are kept as they are."""
    lines = path.read_bytes().split(b"\n")
    if not lines or lines[0] == b"":
        out = path.read_bytes()
    else:
        header = lines[0].decode("utf-8").split(",")
        renamed = [f"true_{name}" if name.startswith(("lat", "lon")) else name for name in header]
        out_lines = [",".join(renamed + ["pred_lat", "pred_lon"]).encode("utf-8")]
        out_lines += [line + b",10.0,20.0" if line else line for line in lines[1:]]
        out = b"\n".join(out_lines)
    target = path.with_name(path.stem + "-predictions.csv")
    target.write_bytes(out)
    return target


# ------------------------------------------------------------------------------------ models and gazetteers
def _copy_model(d: Path, world: World) -> Path:
    target = d / "model"
    shutil.copytree(world.model_dir, target)
    return target


def _weights_files(model: Path) -> list[Path]:
    """model.safetensors at the top and in every training checkpoint."""
    return [model / "model.safetensors", *sorted((model / "checkpoints").glob("step-*/model.safetensors"))]


def make_other_gazetteer_model(d: Path, world: World) -> Path:
    model = _copy_model(d, world)
    shutil.rmtree(model / "gazetteer")
    shutil.copytree(world.other_gazetteer_dir, model / "gazetteer")
    return model


def make_resumed_with_other_gazetteer(d: Path, world: World) -> Path:
    """The model's run, its gazetteer/ replaced by one built from the same training points but pruned
    (--min-images 3): same places, fewer entities, another content hash; `train --resume` then reads it."""
    from gazetteer import Gazetteer

    model = _copy_model(d, world)
    with open(Path(world.rows[0][0]).parents[2] / "train.csv", newline="", encoding="utf-8") as handle:
        points = np.asarray([(float(row["lat"]), float(row["lon"])) for row in csv.DictReader(handle)])
    pruned = Gazetteer.build_from_points(points[:, 0], points[:, 1], min_images=3, progress=False)
    shutil.rmtree(model / "gazetteer")
    pruned.save(model / "gazetteer")
    return model


def make_truncated_weights(d: Path, world: World) -> Path:
    model = _copy_model(d, world)
    for path in _weights_files(model):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return model


def make_corrupt_weights(d: Path, world: World) -> Path:
    """Same size, a run of bytes overwritten in the middle of the tensor data (the header still parses)."""
    model = _copy_model(d, world)
    for path in _weights_files(model):
        data = bytearray(path.read_bytes())
        middle = len(data) * 3 // 4
        data[middle: middle + 64] = bytes((b ^ 0x5A) for b in data[middle: middle + 64])
        path.write_bytes(bytes(data))
    return model


def make_garbage_weights(d: Path, world: World) -> Path:
    model = _copy_model(d, world)
    rng = np.random.default_rng(0)
    for path in _weights_files(model):
        path.write_bytes(rng.integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())
    return model


def make_newer_config(d: Path, world: World) -> Path:
    model = _copy_model(d, world)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config["format_version"] = 99
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return model


def make_newer_gazetteer(d: Path, world: World) -> Path:
    target = d / "gazetteer"
    shutil.copytree(world.gazetteer_dir, target)
    metadata = json.loads((target / "metadata.json").read_text(encoding="utf-8"))
    metadata["format_version"] = 99
    (target / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    return target


def make_gazetteer_missing_file(d: Path, world: World) -> Path:
    target = d / "gazetteer"
    shutil.copytree(world.gazetteer_dir, target)
    (target / "entities.npz").unlink()
    return target


MARKER_NAME = "UNPICKLED"


class Booby:
    """Unpickling this calls open(marker, "w"): the marker file proves that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def booby_pickle(marker: Path) -> bytes:
    return pickle.dumps({"head.weight": Booby(marker)}, protocol=4)


def make_pickle_weights(d: Path, world: World) -> Path:
    """Every model.safetensors (top level and checkpoints) replaced by a pickle that would create d/UNPICKLED."""
    model = _copy_model(d, world)
    for path in _weights_files(model):
        path.write_bytes(booby_pickle(d / MARKER_NAME))
    return model


def make_pickle_as_model(d: Path, world: World) -> Path:
    """A pickle file given where a model directory is expected (`--model model.pkl`)."""
    (d / "model.pkl").write_bytes(booby_pickle(d / MARKER_NAME))
    return d / "model.pkl"


def make_pickle_backbone(d: Path, world: World) -> Path:
    """backbone/model.safetensors removed, a pickle beside it as pytorch_model.bin (transformers' pickle name)."""
    model = _copy_model(d, world)
    (model / "backbone" / "model.safetensors").unlink()
    (model / "backbone" / "pytorch_model.bin").write_bytes(booby_pickle(d / MARKER_NAME))
    return model


def make_pickle_backbone_for_training(d: Path, world: World) -> Path:
    """A saved backbone (what `model.backbone=DIR model.pretrained=true` loads) whose weights are a pickle."""
    backbone = d / "backbone"
    shutil.copytree(world.model_dir / "backbone", backbone)
    (backbone / "model.safetensors").unlink()
    (backbone / "pytorch_model.bin").write_bytes(booby_pickle(d / MARKER_NAME))
    return backbone


def _without(relative: str):
    def make(d: Path, world: World) -> Path:
        model = _copy_model(d, world)
        if relative == "LATEST/optimizer.safetensors":
            latest = (model / "checkpoints" / "latest").read_text(encoding="utf-8").strip()
            relative_path = Path("checkpoints") / latest / "optimizer.safetensors"
        else:
            relative_path = Path(relative)
        target = model / relative_path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        return model
    return make


# ---------------------------------------------------------------------------------------------- the commands
def image_argv(command: str, image: Path, inputs: Path, outputs: Path, world: World) -> list:
    """How `command` reads an image: directly (predict, explain) or as a row of a CSV (train, eval)."""
    if command == "predict":
        return ["predict", image, "--model", world.model_dir, "--workers", "0", "--no-progress", "--format", "jsonl"]
    if command == "explain":
        return ["explain", image, "--model", world.model_dir]
    # 3 readable images and the case's image, at the first image's position
    path, lat, lon = world.rows[0]
    rows = _good_rows(world, 3) + [[str(image), repr(lat), repr(lon)]]
    table = outputs / "images.csv"  # written by the test, not part of the inputs checked for changes
    table.write_bytes(_csv_bytes(["image", "lat", "lon"], rows))
    if command == "train":
        return ["train", "--csv", table, "--out", outputs / "run", "--gazetteer", world.gazetteer_dir,
                "--no-progress", f"model.backbone={world.backbone_dir}", *TRAIN_OVERRIDES]
    if command == "eval":
        return ["eval", table, "--model", world.model_dir, "--workers", "0", "--no-progress"]
    raise ValueError(command)


def csv_argv(command: str, table: Path, inputs: Path, outputs: Path, world: World) -> list:
    if command == "build-gazetteer":
        return ["-q", "build-gazetteer", "--from-csv", table, "--out", outputs / "gazetteer"]
    if command == "locate":
        return ["-q", "locate", "--gazetteer", world.gazetteer_dir, "--csv", table, "--out", outputs / "located.csv"]
    if command == "train":
        return ["train", "--csv", table, "--out", outputs / "run", "--gazetteer", world.gazetteer_dir,
                "--no-progress", f"model.backbone={world.backbone_dir}", *TRAIN_OVERRIDES]
    if command == "eval":
        return ["eval", table, "--model", world.model_dir, "--workers", "0", "--no-progress"]
    if command == "eval --predictions":  # `table` is already the predictions variant (run_case)
        return ["eval", "--predictions", table]
    if command == "predict":
        return ["predict", table, "--model", world.model_dir, "--workers", "0", "--no-progress", "--format", "jsonl"]
    raise ValueError(command)


def model_argv(command: str, model: Path, inputs: Path, outputs: Path, world: World) -> list:
    image = world.rows[0][0]
    if command == "predict":
        return ["predict", image, "--model", model, "--workers", "0", "--no-progress", "--format", "jsonl"]
    if command == "explain":
        return ["explain", image, "--model", model]
    if command == "eval":
        table = outputs / "images.csv"
        table.write_bytes(_csv_bytes(["image", "lat", "lon"], _good_rows(world, 2)))
        return ["eval", table, "--model", model, "--workers", "0", "--no-progress"]
    if command == "plot-embeddings":
        return ["plot-embeddings", "--model", model, "--out", outputs / "disk.png"]
    if command == "train --resume":
        # continue the model's own run (same CSV and overrides: tests/conftest.py's tiny_model_dir)
        return ["train", "--csv", Path(world.rows[0][0]).parents[2] / "train.csv", "--out", model, "--resume",
                "--gazetteer", model / "gazetteer", "--no-progress", f"model.backbone={world.backbone_dir}",
                *TINY_MODEL_OVERRIDES]
    raise ValueError(command)


def gazetteer_argv(command: str, gazetteer: Path, inputs: Path, outputs: Path, world: World) -> list:
    if command == "locate":
        table = outputs / "points.csv"
        table.write_bytes(_csv_bytes(["image", "lat", "lon"], _good_rows(world, 3)))
        return ["-q", "locate", "--gazetteer", gazetteer, "--csv", table, "--out", outputs / "located.csv"]
    if command == "train":
        table = outputs / "images.csv"
        table.write_bytes(_csv_bytes(["image", "lat", "lon"], _good_rows(world)))
        return ["train", "--csv", table, "--out", outputs / "run", "--gazetteer", gazetteer, "--no-progress",
                f"model.backbone={world.backbone_dir}", *TRAIN_OVERRIDES]
    raise ValueError(command)


def backbone_argv(command: str, backbone: Path, inputs: Path, outputs: Path, world: World) -> list:
    if command == "train":
        table = outputs / "images.csv"
        table.write_bytes(_csv_bytes(["image", "lat", "lon"], _good_rows(world)))
        return ["train", "--csv", table, "--out", outputs / "run", "--gazetteer", world.gazetteer_dir,
                "--no-progress", f"model.backbone={backbone}", *TRAIN_OVERRIDES, "model.pretrained=true"]
    raise ValueError(command)


ARGV = {"image": image_argv, "csv": csv_argv, "model": model_argv, "gazetteer": gazetteer_argv,
        "backbone": backbone_argv}


# ----------------------------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    """One bad (or odd) input and what each command that reads it must do with it.

    expect: command -> "error" (exit != 0, one `hierloc: error:` line), "counted" (the documented behaviour is to
    go on and count: a one-line warning naming the file and why, exit 0; `predict` of a single unreadable image
    exits 1, as no image was predicted), or "ok" (exit 0, no warning). fragments: text the message must contain,
    besides the input's path.
    """

    key: str
    label: str
    kind: str                                  # "image", "csv", "model", "gazetteer" or "backbone"
    make: Callable                             # image: make(dir) -> path; others: make(dir, world) -> path
    expect: dict
    fragments: tuple = ()
    names_path: bool = True                    # the message names the input's path
    gaps: tuple = ()                           # ((command, why), ...): known not to meet the contract yet

    def build(self, inputs: Path, world: World) -> Path:
        return self.make(inputs) if self.kind == "image" else self.make(inputs, world)


UNREADABLE = {"predict": "counted", "explain": "error", "train": "counted", "eval": "counted"}
READABLE = {"predict": "ok", "explain": "ok", "train": "ok", "eval": "ok"}
MODEL_READERS = ("predict", "explain", "eval", "plot-embeddings")
BAD_COORDINATE = {"build-gazetteer": "error", "locate": "error", "train": "counted", "eval": "error",
                  "eval --predictions": "error"}
BAD_TABLE = {"build-gazetteer": "error", "locate": "error", "train": "error", "eval": "error",
             "eval --predictions": "error", "predict": "error"}
IMAGE_HEADER = ["image", "lat", "lon"]

CASES: tuple[Case, ...] = (
    # images
    Case("zero-byte", "zero-byte image file", "image", make_zero_byte, UNREADABLE, ("0 bytes", "expected an image")),
    Case("truncated-jpeg", "truncated JPEG", "image", make_truncated_jpeg, UNREADABLE, ("truncated",)),
    Case("text-as-jpeg", "text file named .jpg", "image", make_text_as_jpeg, UNREADABLE,
         ("not a recognised image",)),
    Case("png-alpha", "PNG with alpha", "image", make_png_alpha, READABLE),
    Case("palette-png", "palette PNG", "image", make_palette_png, READABLE),
    Case("png-16bit", "16-bit greyscale PNG", "image", make_png_16bit, READABLE),
    Case("grey-jpeg", "greyscale JPEG", "image", make_grey_jpeg, READABLE),
    Case("cmyk-jpeg", "CMYK JPEG", "image", make_cmyk_jpeg, READABLE),
    Case("exif-rotated", "EXIF-rotated JPEG (orientation 6)", "image", make_exif_rotated, READABLE),
    Case("bomb", "decompression bomb (PNG header declaring 100000 x 100000 px)", "image", make_bomb_png,
         UNREADABLE, ("too large", "10,000,000,000 pixels", "limit")),
    Case("missing-image", "missing image path", "image", make_missing_image, UNREADABLE, ("not found",)),
    Case("no-images-dir", "directory with no images", "image", make_dir_without_images,
         {"predict": "error", "explain": "error"}, ("contains no images",)),
    Case("unicode-path", "path with spaces and non-ASCII characters", "image", make_unicode_path, READABLE),
    # CSVs
    Case("empty-csv", "empty CSV (0 bytes)", "csv", make_empty_csv, BAD_TABLE, ("file is empty",)),
    Case("header-only", "CSV with a header only", "csv", _csv_case("header.csv", IMAGE_HEADER, lambda rows: []),
         BAD_TABLE, ("no data rows",)),
    Case("missing-column", "CSV without a longitude column", "csv",
         _csv_case("nolon.csv", ["image", "lat"], lambda rows: [row[:2] for row in rows]),
         {k: v for k, v in BAD_TABLE.items() if k != "predict"}, ("longitude", "available columns")),
    Case("misspelt-column", "CSV with a misspelt column (lattitude)", "csv",
         _csv_case("misspelt.csv", ["image", "lattitude", "lon"]),
         {k: v for k, v in BAD_TABLE.items() if k != "predict"}, ("did you mean", "lattitude")),
    Case("misspelt-image-column", "CSV with a misspelt image column (imgae)", "csv",
         _csv_case("imgae.csv", ["imgae", "lat", "lon"]), {"train": "error", "eval": "error", "predict": "error"},
         ("did you mean 'image'", "imgae")),
    Case("nan", "NaN coordinate", "csv", _csv_case("nan.csv", IMAGE_HEADER, _set(2, 1, "nan")), BAD_COORDINATE,
         ("row 3", "lat", "not a finite number")),
    Case("inf", "infinite coordinate", "csv", _csv_case("inf.csv", IMAGE_HEADER, _set(1, 2, "inf")),
         BAD_COORDINATE, ("row 2", "lon", "not a finite number")),
    Case("out-of-range", "out-of-range coordinate (lon 200)", "csv",
         _csv_case("range.csv", IMAGE_HEADER, _set(2, 2, "200")), BAD_COORDINATE,
         ("row 3", "lon", "outside [-180, 180]")),
    Case("swapped", "swapped lat/lon (lat 151.21, lon -33.87)", "csv",
         _csv_case("swapped.csv", IMAGE_HEADER, _swap_row), BAD_COORDINATE, ("row 2", "lat/lon look swapped")),
    Case("duplicates", "duplicate rows", "csv", _csv_case("dups.csv", IMAGE_HEADER, _duplicate_rows),
         {c: "counted" for c in ("build-gazetteer", "locate", "train", "eval", "eval --predictions", "predict")},
         ("3 duplicate rows", "row 9 repeats row 1")),
    Case("non-utf8", "non-UTF-8 byte in a row", "csv", make_non_utf8_csv, BAD_TABLE,
         ("row 3", "line 4", "not valid UTF-8", "byte 0xe9")),
    # gazetteers and checkpoints
    Case("other-gazetteer", "model dir whose gazetteer/ is another gazetteer", "model", make_other_gazetteer_model,
         {c: "error" for c in MODEL_READERS}, ("content hash",)),
    Case("resume-other-gazetteer", "training checkpoint resumed with another gazetteer", "model",
         make_resumed_with_other_gazetteer, {"train --resume": "error"}, ("gazetteer", "content hash")),
    Case("truncated-weights", "truncated model.safetensors", "model", make_truncated_weights,
         {c: "error" for c in (*MODEL_READERS, "train --resume")}, ("model.safetensors", "truncated")),
    Case("corrupt-weights", "model.safetensors with 64 bytes flipped in the tensor data", "model",
         make_corrupt_weights, {c: "error" for c in (*MODEL_READERS, "train --resume")},
         ("model.safetensors", "checksum")),
    Case("garbage-weights", "model.safetensors full of random bytes", "model", make_garbage_weights,
         {c: "error" for c in (*MODEL_READERS, "train --resume")}, ("model.safetensors", "not a valid safetensors")),
    Case("newer-config", "config.json with format_version 99", "model", make_newer_config,
         {c: "error" for c in MODEL_READERS}, ("format_version 99", "newer")),
    Case("newer-gazetteer", "gazetteer metadata.json with format_version 99", "gazetteer", make_newer_gazetteer,
         {"locate": "error", "train": "error"}, ("format_version 99", "newer")),
    Case("pickle-weights", "model.safetensors replaced by a pickle", "model", make_pickle_weights,
         {c: "error" for c in (*MODEL_READERS, "train --resume")}, ("pickle", "never unpickles")),
    Case("pickle-file", "a pickle file given as --model", "model", make_pickle_as_model,
         {c: "error" for c in MODEL_READERS}, ("expected a model directory",)),
    Case("pickle-backbone", "backbone/pytorch_model.bin (a pickle) instead of model.safetensors", "model",
         make_pickle_backbone, {c: "error" for c in MODEL_READERS}, ("model.safetensors", "pickle")),
    Case("pickle-backbone-train", "a backbone dir holding pytorch_model.bin (a pickle), to train from", "backbone",
         make_pickle_backbone_for_training, {"train": "error"}, ("pytorch_model.bin", "pickle", "never unpickles")),
    Case("no-config", "model dir without config.json", "model", _without("config.json"),
         {c: "error" for c in MODEL_READERS}, ("config.json",)),
    Case("no-weights", "model dir without model.safetensors", "model", _without("model.safetensors"),
         {c: "error" for c in MODEL_READERS}, ("model.safetensors", "not found")),
    Case("no-backbone", "model dir without backbone/", "model", _without("backbone"),
         {c: "error" for c in MODEL_READERS}, ("backbone",)),
    Case("no-gazetteer-file", "model dir without gazetteer/entities.npz", "model",
         _without("gazetteer/entities.npz"), {c: "error" for c in MODEL_READERS}, ("entities.npz",)),
    Case("no-concepts", "model dir without concepts.json (the model has a concept head)", "model",
         _without("concepts.json"), {c: "error" for c in MODEL_READERS}, ("concepts.json",)),
    Case("no-optimizer-state", "checkpoint without optimizer.safetensors", "model",
         _without("LATEST/optimizer.safetensors"), {"train --resume": "error"}, ("optimizer.safetensors",)),
    Case("gazetteer-missing-file", "gazetteer dir without entities.npz", "gazetteer", make_gazetteer_missing_file,
         {"locate": "error", "train": "error"}, ("entities.npz", "missing")),
)
CASE_BY_KEY = {case.key: case for case in CASES}
PAIRS = [(case.key, command) for case in CASES for command in case.expect]


def _pair_param(key: str, command: str):
    gaps = dict(CASE_BY_KEY[key].gaps)
    marks = [pytest.mark.xfail(strict=True, reason=gaps[command])] if command in gaps else []
    return pytest.param(key, command, marks=marks, id=f"{key}-{command.replace(' --', '-')}")


@dataclass
class Result:
    case: Case
    command: str
    path: Path            # the input
    argv: list
    outcome: Outcome
    changed: list = field(default_factory=list)   # input files whose bytes changed (must stay empty)


def run_case(case: Case, command: str, workdir: Path, world: World) -> Result:
    """Build the case's input under workdir/inputs, run the command (outputs under workdir/outputs)."""
    inputs, outputs = workdir / "inputs", workdir / "outputs"
    inputs.mkdir(parents=True)
    outputs.mkdir(parents=True)
    path = case.build(inputs, world)
    if command == "eval --predictions":
        path = predictions_variant(path)
    argv = ARGV[case.kind](command, path, inputs, outputs, world)
    before = tree_digest(inputs)
    outcome = run_cli(argv)
    after = tree_digest(inputs)
    changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    return Result(case, command, path, argv, outcome, changed)


def check_result(result: Result) -> None:
    """The common contract (module docstring)."""
    case, outcome = result.case, result.outcome
    expected = case.expect[result.command]
    context = f"{case.key} / {result.command}: exit {outcome.code}\n{outcome.err}"
    assert "Traceback" not in outcome.err + outcome.out, context
    assert not outcome.strays, context
    assert not any("internal error" in line for line in outcome.err_lines), context
    assert result.changed == [], f"{context}\ninput files changed: {result.changed}"
    if expected == "ok":
        assert outcome.code == 0 and not outcome.errors and not outcome.warnings, context
        return
    if expected == "error":
        assert outcome.code != 0, context
        assert len(outcome.errors) == 1, context
        message = outcome.errors[0]
    else:  # counted
        assert outcome.warnings and not outcome.errors, context
        assert outcome.code == (1 if result.command == "predict" and result.case.kind == "image" else 0), context
        message = " / ".join(outcome.warnings)
    if case.names_path:
        assert str(result.path) in message, context
    for fragment in case.fragments:
        assert fragment in message, f"{context}\nexpected {fragment!r} in the message"


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tiny_model_dir, tiny_demo_dir, tiny_backbone_dir, small_gazetteer_dir) -> World:
    return world_from(tiny_model_dir, tiny_demo_dir, tiny_backbone_dir, small_gazetteer_dir)


def _records(outcome: Outcome) -> list[dict]:
    return [json.loads(line) for line in outcome.out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------- one test per (case, command)
def _more_single_image(result: Result) -> None:
    """predict of one image: one JSONL record for it, ok or error as expected, and the counts on stderr."""
    records = _records(result.outcome)
    ok = result.case.expect["predict"] == "ok"
    assert len(records) == 1 and records[0]["image"] == str(result.path)
    assert records[0]["status"] == ("ok" if ok else "error")
    assert ("1 image: 1 predicted, 0 failed" if ok else "1 image: 0 predicted, 1 failed") in result.outcome.err


def _more_no_marker(result: Result) -> None:
    """The booby-trapped pickle was not unpickled (test_booby_pickle_is_live shows that unpickling it would
    have created the marker)."""
    assert list(result.path.parents[1].rglob(MARKER_NAME)) == []


def _more_duplicates(result: Result) -> None:
    """Duplicates are kept (a user may mean them): each command reads 11 rows, and says so."""
    outcome, outputs = result.outcome, result.path.parents[1] / "outputs"
    if result.command == "locate":
        with open(outputs / "located.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 11 and rows[8] == rows[0] == rows[9] and rows[10] == rows[1]
    elif result.command == "predict":
        records = _records(outcome)
        assert len(records) == 11 and records[8] == records[0] and "11 images: 11 predicted" in outcome.err
    elif result.command == "build-gazetteer":
        assert "11 points read" in outcome.out
    elif result.command == "train":
        assert "on 11 images" in outcome.out
    else:  # eval, eval --predictions
        assert re.search(r"samples scored\s+11\b", outcome.out)


def _more_unicode(result: Result) -> None:
    """The name survives intact in what the user reads."""
    name = "holiday photos/Zürich café 東京 ☀.jpg"
    if result.command == "predict":
        assert _records(result.outcome)[0]["image"].endswith(name)
    elif result.command == "explain":
        assert name in result.outcome.out


def _more(result: Result) -> None:
    key, command = result.case.key, result.command
    if command == "predict" and result.case.kind == "image" and result.case.expect["predict"] != "error":
        _more_single_image(result)
    if key.startswith("pickle-"):
        _more_no_marker(result)
    if key == "duplicates":
        _more_duplicates(result)
    if key == "unicode-path":
        _more_unicode(result)


@pytest.mark.parametrize("key, command", [_pair_param(key, command) for key, command in PAIRS])
def test_bad_input(key, command, world, tmp_path):
    result = run_case(CASE_BY_KEY[key], command, tmp_path, world)
    _more(result)          # case-specific checks first: a known gap (xfail) must not hide them
    check_result(result)


def test_booby_pickle_is_live(tmp_path):
    """The control for the pickle cases: unpickling the test's pickle does create the marker file."""
    pickle.loads(booby_pickle(tmp_path / MARKER_NAME))  # noqa: S301 - the control: this one is meant to run
    assert (tmp_path / MARKER_NAME).exists()


# ------------------------------------------------------------------------------------------ cases needing more
def _expected_rgb(key: str, path: Path) -> np.ndarray:
    """The RGB pixels the loader must produce, computed without hierloc (H, W, 3) uint8."""
    with Image.open(path) as image:
        image.load()
        if key == "png-alpha":
            rgba = np.asarray(image)
            return np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)
        if key == "palette-png":
            palette = np.asarray(image.getpalette(), dtype=np.uint8).reshape(-1, 3)
            return palette[np.asarray(image)]
        if key == "png-16bit":
            grey = (np.asarray(image, dtype=np.uint32) // 257).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        if key == "grey-jpeg":
            return np.repeat(np.asarray(image)[..., None], 3, axis=2)
        if key == "cmyk-jpeg":  # the decoded inks -> RGB: (255 - C) (255 - K) / 255 per channel
            cmyk = np.asarray(image).astype(np.int64)
            return np.rint((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8)
    raise ValueError(key)


@pytest.mark.parametrize("key", ["png-alpha", "palette-png", "png-16bit", "grey-jpeg", "cmyk-jpeg"])
def test_unusual_colour_modes_give_the_answer_of_their_rgb_pixels(key, world, tmp_path):
    """Predicting the file = predicting a plain RGB PNG of the pixels it should decode to (no silent mix-up)."""
    from hierloc.data.images import load_image

    image = CASE_BY_KEY[key].make(tmp_path)
    expected = _expected_rgb(key, image)
    decoded = np.asarray(load_image(image)).astype(int)
    assert decoded.shape == expected.shape
    assert np.abs(decoded - expected).max() <= (1 if key == "cmyk-jpeg" else 0)  # CMYK: Pillow's integer rounding
    reference = _save(Image.fromarray(decoded.astype(np.uint8), "RGB"), tmp_path / "reference.png")
    # --batch-size 1: each image alone through the network (a batch's rows may differ in the last float bits)
    outcome = run_cli(["predict", image, reference, "--model", world.model_dir, "--workers", "0", "--no-progress",
                       "--batch-size", "1", "--format", "jsonl"])
    first, second = _records(outcome)
    assert first.pop("image") == str(image) and second.pop("image") == str(reference)
    assert first == second


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_honoured_in_pixels_and_answers(orientation, world, tmp_path):
    """The loader's pixels = the stored pixels rotated by hand; predict and explain answer the upright image."""
    from hierloc.data.images import load_image

    photo = make_exif_rotated(tmp_path, orientation)
    with Image.open(photo) as stored:
        upright = stored.convert("RGB").transpose(ORIENTATION_FIX[orientation])  # rotated by hand
    loaded = load_image(photo)
    assert loaded.size == upright.size
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(upright))
    manual = _save(upright, tmp_path / "upright.png")
    sideways = _save(Image.open(photo).convert("RGB"), tmp_path / "sideways.png")  # the orientation ignored
    outcome = run_cli(["predict", photo, manual, sideways, "--model", world.model_dir, "--workers", "0",
                       "--no-progress", "--batch-size", "1", "--format", "jsonl"])
    rotated, by_hand, ignored = _records(outcome)
    for record in (rotated, by_hand, ignored):
        record.pop("image")
    assert rotated == by_hand
    assert rotated["score_logprob"] != ignored["score_logprob"]  # the orientation made a difference
    explained = [json.loads(run_cli(["explain", path, "--model", world.model_dir, "--format", "json"]).out)[0]
                 for path in (photo, manual)]
    for record in explained:
        record.pop("image", None), record.pop("source", None)
    assert explained[0]["levels"] == explained[1]["levels"]


def test_decompression_bomb_is_refused_from_its_header_without_decoding(tmp_path):
    import tracemalloc

    from hierloc.errors import InputError
    from hierloc.data.exif import read_gps
    from hierloc.data.images import load_image

    bomb = make_bomb_png(tmp_path)
    assert bomb.stat().st_size < 200
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(InputError) as error:
        load_image(bomb)
    seconds = time.perf_counter() - start
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 0.5 and peak < 5_000_000  # 30 GB of pixels were never allocated
    assert str(bomb) in str(error.value) and "10,000,000,000 pixels" in str(error.value)
    assert read_gps(bomb) is None


def test_image_just_over_the_pixel_limit_is_refused_without_a_python_warning(tmp_path, monkeypatch, world):
    """Between 1x and 2x Pillow's limit, Pillow only warns: hierloc refuses it, and EXIF reading stays quiet."""
    image = _save(noise_image((40, 30)), tmp_path / "big.png")  # 1,200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    outcome = run_cli(image_argv("predict", image, tmp_path, tmp_path, world))
    assert outcome.code == 1 and all(KNOWN_LINE.match(line) for line in outcome.err_lines), outcome.err
    assert "too large" in outcome.warnings[0] and "1,200 pixels" in outcome.warnings[0]


@pytest.mark.slow
def test_million_row_csv_is_streamed_by_locate_in_bounded_memory(world, tmp_path):
    """`hierloc locate` on 1,000,000 and 2,000,000 rows, each in a fresh process: the same peak memory (the rows
    stream in chunks; duplicate rows are counted among the first csvio.DUPLICATE_CHECK_ROWS = 1M rows), output
    row for row, input unchanged. ~45 s on the 2-core reference machine.

    (docs/gazetteer.md has the world-gazetteer numbers of the same command; docs/reliability.md this test's.)"""
    peaks, seconds = {}, {}
    for n_rows in (1_000_000, 2_000_000):
        table = tmp_path / f"rows-{n_rows}.csv"
        rng = np.random.default_rng(n_rows)
        lat = rng.uniform(-47, -34, n_rows)   # New Zealand and around
        lon = rng.uniform(166, 179, n_rows)
        with open(table, "w", encoding="utf-8") as handle:
            handle.write("image,lat,lon\n")
            handle.writelines(f"img{i:07d}.jpg,{a:.5f},{o:.5f}\n" for i, (a, o) in enumerate(zip(lat, lon)))
        digest = hashlib.sha256(table.read_bytes()).hexdigest()
        out = tmp_path / f"located-{n_rows}.csv"
        argv = ["-q", "locate", "--gazetteer", world.gazetteer_dir, "--csv", table, "--out", out]
        # VmHWM (this process's peak RSS): unlike ru_maxrss it is not inherited from the forking parent
        code = ("import re, sys; from hierloc.cli import main; rc = main(sys.argv[1:]); "
                "print('PEAK', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
                "sys.exit(rc)")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                              timeout=900)
        seconds[n_rows] = time.perf_counter() - started
        assert done.returncode == 0, done.stderr
        peaks[n_rows] = int(done.stdout.split("PEAK")[-1].split()[0]) / 1024  # MB
        assert f"wrote {n_rows:,} of {n_rows:,} rows" in done.stdout
        assert hashlib.sha256(table.read_bytes()).hexdigest() == digest
        with open(out, "rb") as handle:
            assert sum(1 for _ in handle) == n_rows + 1
        out.unlink()
    print(f"locate: peak RSS {peaks[1_000_000]:.0f} MB for 1M rows ({seconds[1_000_000]:.1f} s), "
          f"{peaks[2_000_000]:.0f} MB for 2M rows ({seconds[2_000_000]:.1f} s)")
    assert abs(peaks[2_000_000] - peaks[1_000_000]) < 10  # MB: twice the rows, the same memory
