"""`hierloc calibrate`: fit the per-level temperatures of a model's reported probabilities on a labelled CSV."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from hierloc.cli import HelpFormatter
from hierloc.errors import InputError

EPILOG = """\
The model's probabilities are often over- or under-confident, and by how much depends on the image: an image
like the training images is answered right more often than one from a place the model never saw, or unlike
anything it saw. This fits, on labelled validation CSVs (never the test set), a temperature per level that depends
on how familiar each image is (its distance from the ball's origin, its distance to the nearest entity and how
typical both are of a sample of the training images), so that an answer reported with probability p is right about
a fraction p of the time near and far from the training data; the reference coverage of the prediction sets
(predict --coverage); and the error radius radius90_km every answer then carries. Pass both kinds of images, e.g.
--csv val.csv --csv val_nearby.csv (held-out places and held-out images of familiar places). The training CSV is
read from the model directory's training summary (or --train-csv). --temperatures-only fits one temperature per
level instead (no training images needed). Written to DIR/calibration.json; predict, explain, eval, serve and the
Python API then report calibrated probabilities (--no-calibration / calibrated=False to switch it off). Answers
never change: only the reported probabilities do. See docs/calibration.md.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", formatter_class=HelpFormatter,
                              help="fit per-level temperatures so that reported probabilities can be trusted",
                              description="Fit per-level temperatures of a model's probabilities on a labelled "
                                          "CSV and store them in the model directory.", epilog=EPILOG)
    p.add_argument("--model", required=True, help="trained model directory (calibration.json is written there)")
    p.add_argument("--csv", required=True, action="append",
                   help="labelled validation CSV (image,lat,lon or another known layout); repeat to pool several")
    p.add_argument("--train-csv", default=None,
                   help="the model's training CSV (default: the one its training summary records)")
    p.add_argument("--train-sample", type=int, default=2000, help="training images sampled to measure familiarity")
    p.add_argument("--unlike-share", type=float, default=0.5,
                   help="degraded copies of this share of the calibration images join the fit (0: none)")
    p.add_argument("--temperatures-only", action="store_true",
                   help="one temperature per level, not conditioned on familiarity (no sets reference, no radius)")
    p.add_argument("--image-root", default=None, help="directory image paths are relative to (default: the CSV's)")
    p.add_argument("--beam", type=int, default=None, help="beam width to fit for (default: the model's)")
    p.add_argument("--no-flat", action="store_true", help="fit beam search only (flat search stays uncalibrated)")
    p.add_argument("--on-bad", default="error", choices=["error", "skip"],
                   help="rows with a bad coordinate: stop at the first one, or skip them")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (0: in this process)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _ece(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def run(args: argparse.Namespace) -> int:
    # torch-heavy: imported when the command runs, so that `hierloc --help` and the other commands stay fast
    from hierloc.inference.predictor import HierLoc

    if (args.beam is not None and args.beam < 1) or args.batch_size < 1 or args.workers < 0:
        raise InputError("--beam and --batch-size must be >= 1 and --workers >= 0")
    if args.train_sample < 3:
        raise InputError(f"--train-sample {args.train_sample}: expected an integer >= 3")
    if not 0.0 <= args.unlike_share <= 1.0:
        raise InputError(f"--unlike-share {args.unlike_share}: expected a share in [0, 1]")
    train_csv = None if args.temperatures_only else (args.train_csv or _recorded_training_csv(args.model))
    fitted = HierLoc.calibrate_model_dir(args.model, args.csv, device=args.device, image_root=args.image_root,
                                         beam=args.beam, flat=not args.no_flat, batch_size=args.batch_size,
                                         num_workers=args.workers, progress=not args.no_progress,
                                         on_bad=args.on_bad, train_csv=train_csv, train_sample=args.train_sample,
                                         unlike_share=args.unlike_share)
    print(f"calibrated on {fitted.n} images of {', '.join(args.csv)} (beam {fitted.beam})")
    print(f"  {'search':<8}{'level':<11}{'temperature':>12}{'ECE before':>12}{'ECE after':>11}")
    searches = [("beam", fitted.temperatures, fitted.ece_before, fitted.ece_after)]
    if fitted.flat_temperatures is not None:
        searches.append(("flat", fitted.flat_temperatures, fitted.flat_ece_before, fitted.flat_ece_after))
    for name, temperatures, before, after in searches:
        for level, t, b, a in zip(("country", "region", "subregion", "city"), temperatures, before, after):
            print(f"  {name:<8}{level:<11}{t:>12.3f}{_ece(b):>12}{_ece(a):>11}")
    if fitted.familiarity is not None:
        print(f"  conditioned on familiarity ({', '.join(fitted.familiarity['signals'])}; training images from "
              f"{Path(train_csv).name}; {fitted.n_unlike} degraded copies): per-image probabilities, 90 % "
              "sets and radius90_km")
        for name, search in fitted.familiarity["searches"].items():
            masses = ", ".join(f"{m:.3f}" for m in search["conformal_mass"])
            print(f"  {name:<8}conformal 90 % set mass per level {masses}; top-k for 90 %: {search['top_k']}; "
                  f"fixed 90 % radius {search['fixed_radius_km']:.0f} km")
    print(f"written to {args.model}/calibration.json")
    return 0


def _recorded_training_csv(model_dir: str) -> str:
    """The training CSV the model directory's training summary records; InputError when it is not there."""
    from hierloc.model.modeldir import TRAIN_SUMMARY_NAME  # torch-heavy, like the predictor

    summary_path = Path(model_dir) / TRAIN_SUMMARY_NAME
    try:
        recorded = json.loads(summary_path.read_text(encoding="utf-8")).get("train_csv")
    except (OSError, ValueError):
        recorded = None
    if not recorded or not Path(recorded).is_file():
        raise InputError(f"{model_dir}: its training CSV ({recorded or 'not recorded'}) is not on this disk; pass "
                         "--train-csv, or --temperatures-only for one temperature per level")
    return recorded
