"""`hierloc train`: parse options, load the config, dispatch to hierloc.training.train.train."""

from __future__ import annotations

import argparse
import sys

from hierloc.cli import HelpFormatter
from hierloc.config import load_config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", formatter_class=HelpFormatter, help="train a model on geotagged images",
        description="Train a HierLoc model on a CSV of geotagged images.\n\n"
                    "CSV layouts (auto-detected): this project's image,lat,lon; OSV5M's id,latitude,longitude with "
                    "images at <root>/images/<id>.jpg; GeoCLIP's IMG_FILE,LAT,LON.\n"
                    "Hyper-parameters: --config FILE (TOML/YAML) and section.key=value overrides, e.g.\n"
                    "  hierloc train --csv data/train.csv --out runs/x train.epochs=3 loss.tau=0.2\n"
                    "Many GPUs: torchrun --nproc_per_node N -m hierloc train ...")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    p.add_argument("--csv", required=True, help="training CSV")
    p.add_argument("--out", default="runs/model", help="output model directory")
    p.add_argument("--image-root", default=None, help="directory image paths are relative to (default: the CSV's)")
    p.add_argument("--gazetteer", default=None, help="gazetteer directory (default: built from the CSV's points)")
    p.add_argument("--min-images", type=int, default=1,
                   help="when building the gazetteer from the CSV: prune entities with fewer images into their parent")
    p.add_argument("--val-csv", default=None, help="validation CSV, evaluated after every epoch; the model's "
                                                   "probabilities are then calibrated on it (calibration.json)")
    p.add_argument("--config", default=None, help="config file (.toml, .yaml or .json); defaults otherwise")
    p.add_argument("--image-col", default=None, help="image column (auto-detected)")
    p.add_argument("--lat-col", default=None, help="latitude column (auto-detected)")
    p.add_argument("--lon-col", default=None, help="longitude column (auto-detected)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=None, help="random seed (overrides train.seed)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--cache-dir", default=None, help="feature cache for a frozen backbone (default: <out>/feature_cache)")
    p.add_argument("--allow-download", action="store_true",
                   help="allow transformers to download a backbone by hub id (off: never download silently)")
    p.add_argument("--on-bad", choices=("error", "skip"), default="skip",
                   help="CSV rows with a bad coordinate or an empty image field: skip them (counted), or stop with "
                        "an error at the first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch-heavy: imported when the command runs, so that `hierloc --help` and the other commands stay fast
    from hierloc.device import launch_rank
    from hierloc.inference.predictor import HierLoc
    from hierloc.training.interrupt import RankLost, TrainingInterrupted
    from hierloc.training.run import TrainInputs
    from hierloc.training.train import train

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    cfg = load_config(args.config, overrides)
    is_main = launch_rank() == 0
    try:
        summary = train(cfg, TrainInputs(
            train_csv=args.csv, out_dir=args.out, image_root=args.image_root, gazetteer_dir=args.gazetteer,
            val_csv=args.val_csv, image_col=args.image_col, lat_col=args.lat_col, lon_col=args.lon_col,
            min_images=args.min_images, device=args.device, resume=args.resume, overwrite=args.overwrite,
            cache_dir=args.cache_dir, progress=not args.no_progress, allow_download=args.allow_download,
            on_bad=args.on_bad),
            validate=HierLoc.validation_metrics, calibrate=HierLoc.calibrate_in_training)
    except TrainingInterrupted as stopped:
        # SIGINT/SIGTERM: a checkpoint was written; say how to resume, exit 128 + the signal (130 / 143).
        # Another rank lost: every survivor says so (rank 0 may be the lost one), exit 1.
        if is_main or isinstance(stopped, RankLost):
            print(f"hierloc: {stopped.message}", file=sys.stderr, flush=True)
        return int(stopped.code)
    if is_main:
        print(f"trained {summary.steps} steps ({summary.epochs} epochs) on {summary.n_train} images "
              f"in {summary.seconds:.1f} s ({summary.images_per_second:.0f} images/s); "
              f"entities per level {summary.n_entities}; final loss {summary.final_loss:.4f}")
        if summary.n_skipped:
            print(f"skipped {summary.n_skipped} rows (bad coordinates or outside the gazetteer)")
        if summary.validation:
            print("validation: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.validation.items()))
        if summary.calibration:
            print("calibrated on the validation CSV: temperatures "
                  + ", ".join(f"{t:.3g}" for t in summary.calibration["temperatures"]) + "; ECE before "
                  + ", ".join(f"{e:.3f}" for e in summary.calibration["ece_before"]) + ", after "
                  + ", ".join(f"{e:.3f}" for e in summary.calibration["ece_after"]) + " (country .. city)")
        print(f"model written to {summary.out_dir}")
    return 0
