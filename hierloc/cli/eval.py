"""`hierloc eval`: OSV5M-protocol metrics of a model on a labelled CSV, or of any predictions CSV."""

from __future__ import annotations

import argparse
import json
import sys

from gazetteer.atomic import atomic_write_text, is_same_file
from hierloc.cli import HelpFormatter
from hierloc.errors import InputError
from hierloc.inference.answers import check_options
from hierloc.inference.outputs import json_ready

EPILOG = """\
modes:
  hierloc eval test.csv --model DIR        predict the CSV's images and score them
  hierloc eval --predictions preds.csv     score existing predictions (pred_lat,pred_lon,true_lat,true_lon)

labelled CSV layouts: this project's image,lat,lon; OSV5M's id,latitude,longitude (images/<id>.jpg beside the
CSV); GeoCLIP's IMG_FILE,LAT,LON. Image paths are relative to the CSV's directory (or --image-root).

metrics (hierloc.inference.evaluate): n, mean_km, median_km, geoscore (mean 5000 exp(-d/1492.7 km)), acc_1km ...
acc_2500km
(fraction with d < r), acc_country ... acc_city (OSV5M protocol: reverse-geocode the predicted and the true point
and compare cc, admin1_cc, admin2_admin1_cc, name_admin2_admin1_cc; --missing skip leaves rows without a truth
level out of that level, official counts them as misses like OSV5M's published code) and, with a model,
path_acc_country ... path_acc_city (predicted entity ids vs the true point's path in the model's gazetteer),
ece_country ... ece_city (expected calibration error of the reported probabilities, 15 bins) and
coverage90_<level> / minprob90_<level> (share of answers kept down to that level at 90 % precision by
--min-prob minprob90_<level>); see docs/calibration.md.
Fractions are in [0, 1] in JSON and percentages in the table.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", formatter_class=HelpFormatter, help="evaluate a model or a predictions file",
                              description="Geolocation metrics with the OSV5M benchmark's definitions.",
                              epilog=EPILOG)
    p.add_argument("csv", nargs="?", default=None, help="labelled CSV of images (with --model)")
    p.add_argument("--model", default=None, help="trained model directory, or a hub id of one in the local cache")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch a --model hub id that is not in the local cache (off: never download silently)")
    p.add_argument("--predictions", default=None, help="CSV of predicted and true points to score (no model)")
    p.add_argument("--pred-lat-col", default="pred_lat", help="predicted latitude column (--predictions)")
    p.add_argument("--pred-lon-col", default="pred_lon", help="predicted longitude column (--predictions)")
    p.add_argument("--true-lat-col", default="true_lat", help="true latitude column (--predictions)")
    p.add_argument("--true-lon-col", default="true_lon", help="true longitude column (--predictions)")
    p.add_argument("--image-root", default=None, help="directory image paths are relative to (default: the CSV's)")
    p.add_argument("--image-col", default=None, help="image column of the labelled CSV (default: detected)")
    p.add_argument("--lat-col", default=None, help="latitude column of the labelled CSV (default: detected)")
    p.add_argument("--lon-col", default=None, help="longitude column of the labelled CSV (default: detected)")
    p.add_argument("--beam", type=int, default=None, help="beam width per level (default: the model's inference.beam)")
    p.add_argument("--flat", action="store_true", help="nearest city over all cities instead of beam search")
    p.add_argument("--min-prob", type=float, default=None,
                   help="cut answers before the first level whose probability is below this value")
    p.add_argument("--max-level", default="city", choices=["country", "region", "subregion", "city"],
                   help="deepest level to answer")
    p.add_argument("--missing", default="skip", choices=["skip", "official"],
                   help="rows without a truth level: left out of that level, or misses (OSV5M's published code)")
    p.add_argument("--on-bad", choices=("error", "skip"), default="error",
                   help="rows with a bad coordinate: stop at the first one, or skip them (counted)")
    p.add_argument("--format", default="table", choices=["table", "json"], help="output format")
    p.add_argument("--out", default="-", help="write the summary to this file (atomically); - is standard output")
    p.add_argument("--per-sample", default=None,
                   help="write a per-row CSV with distance_km, geoscore, hits and the predicted path/point")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (0: in this process)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-calibration", action="store_true",
                   help="report the model's raw probabilities, ignoring its calibration.json")
    p.add_argument("--reliability", default=None, metavar="PNG",
                   help="with --model: write the reliability diagram (accuracy against reported probability per "
                        "level, beam and flat search) to this PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch-heavy: imported when the command runs, so that `hierloc --help` and the other commands stay fast
    from hierloc.data import tables
    from hierloc.inference import evaluate
    from hierloc.inference.predictor import HierLoc

    on_bad = args.on_bad
    for given in (args.csv, args.predictions):
        for output in (None if args.out == "-" else args.out, args.per_sample):
            if given is not None and output is not None and is_same_file(given, output):
                raise InputError(f"output {output} is the input file {given}; inputs are never modified")
    if args.predictions is not None:
        if args.csv is not None or args.model is not None:
            raise InputError("--predictions scores an existing file: give neither a CSV of images nor --model")
        source = args.predictions
        summary = evaluate.evaluate_predictions_csv(
            args.predictions, pred_lat_col=args.pred_lat_col, pred_lon_col=args.pred_lon_col,
            true_lat_col=args.true_lat_col, true_lon_col=args.true_lon_col, missing=args.missing, on_bad=on_bad,
            per_sample=args.per_sample)
        context = {"input": source, "mode": "predictions", "missing": args.missing}
        title = f"hierloc eval --predictions {source}"
    else:
        if args.csv is None or args.model is None:
            raise InputError("give a labelled CSV and --model DIR, or --predictions FILE")
        if args.batch_size < 1 or args.workers < 0:
            raise InputError("--batch-size must be >= 1 and --workers >= 0")
        check_options(args.min_prob, args.max_level, "ignore", args.beam or 1, 1)

        table = tables.read_image_table(args.csv, image_root=args.image_root, image_col=args.image_col,
                                        lat_col=args.lat_col, lon_col=args.lon_col, on_bad=on_bad)
        model = HierLoc.from_pretrained(args.model, device=args.device, calibrated=not args.no_calibration,
                                        allow_download=args.allow_download)
        beam = model.search_options(args.beam)[0]
        summary = evaluate.evaluate_model(model, table, beam=beam, flat=args.flat, min_prob=args.min_prob,
                                          max_level=args.max_level, missing=args.missing,
                                          batch_size=args.batch_size, num_workers=args.workers,
                                          progress=not args.no_progress, per_sample=args.per_sample,
                                          reliability=args.reliability)
        search = "flat" if args.flat else f"beam {beam}"
        context = {"input": args.csv, "mode": "model", "model": args.model, "search": search,
                   "min_prob": args.min_prob, "max_level": args.max_level, "missing": args.missing,
                   "calibration": model.describe_calibration()}
        title = f"hierloc eval {args.csv}  (model {args.model}; {search}; max level {args.max_level}" \
                + (f"; min prob {args.min_prob}" if args.min_prob is not None else "") \
                + ("; calibrated probabilities" if context["calibration"] else "; uncalibrated probabilities") + ")"
    if args.format == "json":
        text = json.dumps(json_ready({**summary, **context}), indent=2, allow_nan=False) + "\n"
    else:
        text = evaluate.format_table(summary, title) + "\n"
    if args.out != "-":
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0
