"""`hierloc predict`: answer where images were taken, as hierarchies (streamed: memory stays flat)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from gazetteer.atomic import atomic_open
from hierloc.cli import HelpFormatter
from hierloc.errors import InputError
from hierloc.inference.answers import check_options
from hierloc.inference.outputs import RunSummary, make_writer, search_settings, summary_line


EPILOG = """\
inputs: image files, directories (searched recursively), glob patterns ('photos/**/*.jpg', quoted), CSV files
(their image column: image, IMG_FILE, path, ... or OSV5M's id -> images/<id>.jpg; --image-col to choose) and
.txt/.lst lists (one path per line). Relative paths in CSV/list files are relative to the file's directory
(or --image-root).

answers: the best path of the beam search (or the flat nearest-city scan), cut by --max-level and --min-prob (the
country is always answered); the point is the deepest answered entity's coordinate. --exif compare reports the
GPS stored in a file next to the answer with the distance between them; --exif use answers files that carry GPS
from the GPS itself (source=exif, probability 1, no model); --exif ignore does not read EXIF. Input files are
never modified.

unreadable images are reported on stderr (file and reason), written as status=error records, counted in the
summary line, and the run goes on. exit status: 0 when at least one image was predicted, 1 when none could be,
2 for bad arguments or inputs.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", formatter_class=HelpFormatter, help="predict where images were taken",
                              description="Predict country -> region -> subregion -> city for images.",
                              epilog=EPILOG)
    p.add_argument("images", nargs="+", help="image files, directories, glob patterns, CSV or .txt list files")
    p.add_argument("--model", required=True, help="trained model directory (what `hierloc train` writes), or a hub id of one in the local cache")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch a --model hub id that is not in the local cache (off: never download silently)")
    p.add_argument("--top-k", type=int, default=None,
                   help="paths kept per image: the answer + top-k - 1 alternatives (default: the model's "
                        "inference.top_k)")
    p.add_argument("--beam", type=int, default=None, help="beam width per level (default: the model's inference.beam)")
    p.add_argument("--flat", action="store_true", help="nearest city over all cities instead of beam search "
                                                       "(ablation)")
    p.add_argument("--min-prob", type=float, default=None,
                   help="stop the answer before the first level whose probability is below this value")
    p.add_argument("--max-level", default="city", choices=["country", "region", "subregion", "city"],
                   help="deepest level to answer (caps precision on purpose)")
    p.add_argument("--exif", default="compare", choices=["compare", "use", "ignore"],
                   help="GPS stored in the image: report it next to the answer, answer from it, or ignore it")
    p.add_argument("--format", default="text", choices=["text", "json", "jsonl", "csv", "geojson"],
                   help="output format (GeoJSON coordinates are [lon, lat])")
    p.add_argument("--out", default="-", help="write to this file (atomically); - is standard output")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (0: in this process)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--image-root", default=None,
                   help="directory that relative paths in CSV/list inputs are relative to (default: the file's)")
    p.add_argument("--image-col", default=None, help="image column of CSV inputs (default: detected)")
    p.add_argument("--coverage", type=float, default=None,
                   help="also print, per level, the prediction set: the fewest candidates whose probabilities "
                        "reach this coverage, e.g. 0.9 (calibrate the model first, see docs/calibration.md)")
    p.add_argument("--no-calibration", action="store_true",
                   help="report the model's raw probabilities, ignoring its calibration.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _check_output_is_not_an_input(out: str, inputs: list[str], paths: list[str]) -> None:
    if not os.path.exists(out):
        return
    target = os.stat(out)
    for candidate in list(inputs) + list(paths):
        try:
            info = os.stat(candidate)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
            raise InputError(f"--out {out} is one of the inputs ({candidate}); inputs are never modified")


def run(args: argparse.Namespace) -> int:
    # torch-heavy: imported when the command runs, so that `hierloc --help` and the other commands stay fast
    from hierloc.data.prediction import expand_inputs
    from hierloc.inference.predictor import HierLoc

    for name in ("top_k", "beam", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    if args.workers < 0:
        raise InputError(f"--workers {args.workers}: expected an integer >= 0")
    check_options(args.min_prob, args.max_level, args.exif, args.beam, args.top_k)
    paths = expand_inputs(args.images, image_root=args.image_root, image_col=args.image_col)
    out = None if args.out == "-" else args.out
    if out:
        _check_output_is_not_an_input(out, args.images, paths)
    model = HierLoc.from_pretrained(args.model, device=args.device, calibrated=not args.no_calibration,
                                    allow_download=args.allow_download)
    beam, top_k = model.search_options(args.beam, args.top_k)
    description = model.describe()
    description["search"] = search_settings(args.flat, beam, top_k, args.min_prob, args.max_level, args.exif)
    summary = RunSummary()
    output = atomic_open(out, "w", newline="") if out else contextlib.nullcontext(sys.stdout)
    try:
        with output as stream:
            writer = make_writer(args.format, stream, description)
            for record in model.iter_predict(paths, top_k=top_k, beam=beam, flat=args.flat,
                                             min_prob=args.min_prob, max_level=args.max_level, exif=args.exif,
                                             batch_size=args.batch_size, num_workers=args.workers,
                                             progress=not args.no_progress, coverage=args.coverage):
                writer.write(record)
                summary.add(record)
            totals = summary.as_dict()
            writer.close(totals)
    except BrokenPipeError:  # `hierloc predict ... | head`: the reader is gone, nothing more to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if not args.quiet and not _summary_already_on_screen(args.format, out):
        print(f"hierloc predict: {summary_line(totals)}" + (f"; wrote {out}" if out else ""),
              file=sys.stderr)
    return 0 if summary.counts["n_predicted"] else 1


def _summary_already_on_screen(fmt: str, out: str | None) -> bool:
    """True when the text output, which ends with the run's summary line, went to the terminal that stderr also
    shows: the same line on stderr would be printed twice on one screen. Redirected, either stream keeps it."""
    return fmt == "text" and out is None and sys.stdout.isatty() and sys.stderr.isatty()
