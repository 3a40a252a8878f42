"""Accuracy of a HierLoc model on the demo world, next to chance and a trivial baseline, in one table.

    python scripts/eval_demo.py --model runs/demo --data runs/demo-data        # evaluate an existing model
    python scripts/eval_demo.py --train --data runs/demo-data --out runs/eval  # train first (defaults), then evaluate

Rows per test split ("nearby": random held-out centres; "unseen": centres at least a patch half-width from every
training centre):
- chance: a uniformly random city entity of the gazetteer (its path and coordinate), averaged over 20 draws;
- most frequent city: always answer the training set's most frequent city (path and coordinate);
- HierLoc (beam 10) and HierLoc (flat nearest city).
Level accuracy compares the predicted path with the gazetteer's path of the true point (entity ids); rows whose
true point does not resolve at a level (e.g. a city the training data never reached) are left out of that level.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from _common import Stopwatch, path_metrics
from gazetteer import LEVELS  # the one definition of the levels


def baseline_rows(gaz, train_targets: np.ndarray, truth: np.ndarray, lat, lon, seed: int = 0) -> dict:
    n = len(lat)
    lo, hi = int(gaz.level_offsets[3]), int(gaz.level_offsets[4])
    paths_all = np.asarray(gaz.paths)
    # most frequent training city
    cities, counts = np.unique(train_targets[:, 3][train_targets[:, 3] >= 0], return_counts=True)
    top = int(cities[np.argmax(counts)])
    top_paths = np.repeat(paths_all[top][None, :], n, axis=0)
    frequent = path_metrics(top_paths, truth, np.full(n, gaz.lat_deg[top]), np.full(n, gaz.lon_deg[top]), lat, lon)
    frequent["note"] = f"always {gaz.keys[top]}"
    # chance: a uniformly random city entity, 20 draws
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(20):
        pick = rng.integers(lo, hi, size=n)
        draws.append(path_metrics(paths_all[pick], truth, np.asarray(gaz.lat_deg)[pick],
                                  np.asarray(gaz.lon_deg)[pick], lat, lon))
    chance = {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}
    return {"chance (random city)": chance, "most frequent city": frequent}


def fmt_row(name: str, m: dict) -> str:
    cells = [f"{100 * m[f'acc_{lv}']:6.1f}" if np.isfinite(m[f"acc_{lv}"]) else "     -" for lv in LEVELS]
    return (f"| {name:<26} | {' | '.join(cells)} | {m['median_km']:8.0f} | {m['mean_km']:7.0f} | "
            f"{m['geoscore']:6.0f} | {100 * m['acc_200km']:5.1f} | {100 * m['acc_750km']:5.1f} | "
            f"{100 * m['acc_2500km']:6.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="trained model directory (omit with --train)")
    ap.add_argument("--data", default="runs/demo-data", help="demo data directory (hierloc demo-data)")
    ap.add_argument("--train", action="store_true", help="train a model with the default config first")
    ap.add_argument("--out", default="runs/eval-demo", help="where --train writes the model")
    ap.add_argument("--json", default=None, help="also write the numbers as JSON here")
    ap.add_argument("overrides", nargs="*", help="config overrides for --train (section.key=value)")
    args = ap.parse_args()

    from hierloc.inference.predictor import HierLoc
    from hierloc.data.tables import read_image_table

    data = Path(args.data)
    train_info = {}
    if args.train:
        from hierloc.cli import main as cli

        with Stopwatch() as watch:
            code = cli(["train", "--csv", str(data / "train.csv"), "--out", args.out, "--overwrite",
                        "model.backbone=tiny-vit", *args.overrides])
        if code:
            return code
        train_info["wall_s"] = watch.seconds
        args.model = args.out
    if not args.model:
        ap.error("give --model DIR or --train")
    summary_path = Path(args.model) / "train_summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        train_info.update(train_seconds=s["seconds"], images_per_second=s["images_per_second"], steps=s["steps"],
                          epochs=s["epochs"], n_train=s["n_train"], entities=s["n_entities"])
    model = HierLoc.from_pretrained(args.model, device="cpu")
    gaz = model.gazetteer
    train_table = read_image_table(str(data / "train.csv"))
    train_targets = gaz.locate(train_table.lat_deg, train_table.lon_deg)
    results = {}
    header = ("| row | country % | region % | subregion % | city % | median km | mean km | GeoScore | "
              "<=200 km % | <=750 km % | <=2500 km % |")
    print(f"model: {args.model}; training: {json.dumps(train_info)}")
    for split in ("test_nearby", "test_unseen"):
        table = read_image_table(str(data / f"{split}.csv"))
        lat, lon = np.asarray(table.lat_deg), np.asarray(table.lon_deg)
        truth = gaz.locate(lat, lon)
        rows = baseline_rows(gaz, train_targets, truth, lat, lon)
        for name, flat in (("HierLoc (beam 10)", False), ("HierLoc (flat)", True)):
            with Stopwatch() as watch:
                pred = model.predict_table(table, beam=10, flat=flat, progress=False)
            rows[name] = path_metrics(pred["paths"], truth, pred["pred_lat_deg"], pred["pred_lon_deg"], lat, lon)
            rows[name]["images_per_second"] = len(lat) / watch.seconds
        results[split] = rows
        resolved = ", ".join(f"{lv} {100 * (truth[:, i] >= 0).mean():.0f}%" for i, lv in enumerate(LEVELS))
        print(f"\n{split}: n={len(lat)}; true points resolving in the gazetteer: {resolved}")
        print(header)
        print("|" + "---|" * 11)
        for name, m in rows.items():
            print(fmt_row(name, m))
    if args.json:
        Path(args.json).write_text(json.dumps({"train": train_info, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
