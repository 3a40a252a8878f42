"""`hierloc calibrate`: fit the per-level temperatures of a model's reported probabilities on a labelled CSV."""

from __future__ import annotations

import argparse
import math

from hierloc.cli import HelpFormatter
from hierloc.errors import InputError

EPILOG = """\
The model's probabilities are often over- or under-confident. This fits one temperature per level (country,
region, subregion, city) on a labelled validation CSV (never the test set) so that an answer reported with
probability p is right about a fraction p of the time, for beam search and for the flat search, and writes them to
DIR/calibration.json. predict, explain, eval and the Python API then report calibrated probabilities (--no-calibration
/ calibrated=False to switch it off). Answers never change: only the reported probabilities do. Prints the expected
calibration error (ECE) per level before and after. See docs/calibration.md.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", formatter_class=HelpFormatter,
                              help="fit per-level temperatures so that reported probabilities can be trusted",
                              description="Fit per-level temperatures of a model's probabilities on a labelled "
                                          "CSV and store them in the model directory.", epilog=EPILOG)
    p.add_argument("--model", required=True, help="trained model directory (calibration.json is written there)")
    p.add_argument("--csv", required=True, help="labelled validation CSV (image,lat,lon or another known layout)")
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
    fitted = HierLoc.calibrate_model_dir(args.model, args.csv, device=args.device, image_root=args.image_root,
                                         beam=args.beam, flat=not args.no_flat, batch_size=args.batch_size,
                                         num_workers=args.workers, progress=not args.no_progress,
                                         on_bad=args.on_bad)
    print(f"calibrated on {fitted.n} images of {args.csv} (beam {fitted.beam})")
    print(f"  {'search':<8}{'level':<11}{'temperature':>12}{'ECE before':>12}{'ECE after':>11}")
    searches = [("beam", fitted.temperatures, fitted.ece_before, fitted.ece_after)]
    if fitted.flat_temperatures is not None:
        searches.append(("flat", fitted.flat_temperatures, fitted.flat_ece_before, fitted.flat_ece_after))
    for name, temperatures, before, after in searches:
        for level, t, b, a in zip(("country", "region", "subregion", "city"), temperatures, before, after):
            print(f"  {name:<8}{level:<11}{t:>12.3f}{_ece(b):>12}{_ece(a):>11}")
    print(f"written to {args.model}/calibration.json")
    return 0
