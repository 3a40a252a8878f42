"""Peers and ablations side by side: same data, encoder, split, seed and budget for every row, one table
per test split, each metric as mean +- std over the seeds.

    .venv/bin/python scripts/bench_peers.py --data runs/demo-data --out runs/bench-peers --seeds 0,1,2 \\
        --json runs/bench-peers/results.json                      # the full benchmark (config's epochs)
    .venv/bin/python scripts/bench_peers.py --max-steps 2 --seeds 0  # a smoke run

Data: the `hierloc demo-data` directory (train.csv, test_nearby.csv, test_unseen.csv). Gazetteer: --gazetteer, or
built from train.csv exactly as `hierloc build-gazetteer --from-csv train.csv` does (saved to OUT/gazetteer and
reused while train.csv is unchanged). Every row trains on train.csv with that gazetteer.

Rows (--rows, comma-separated; default all but hierloc-finetune):
  oracle-nearest                     not a model: each test point gets the path and coordinate of the nearest
                                     training point (from the true coordinates), what "knowing the training set"
                                     alone is worth on a split; no training, the same for every seed
  country-ce                         a classifier over the countries: the encoder's floor at the country level
                                     (its answer stops at the country: no region/subregion/city)
  flat-ce, geo-ls, geoclip, swclip   the peer objectives of `hierloc.training.peers` (see its docstring for the
                                     formulas and defaults; `baseline.key=value` overrides tune them)
  hierloc-euclidean                  model.geometry=euclidean
  hierloc-lam0                       loss.lam=0 (plain hyperbolic InfoNCE; loss.learn_weights=false)
  hierloc-gaussian, hierloc-inverse  loss.kernel=gaussian / inverse (the paper's other distance kernels)
  hierloc-logit                      loss.weighting=logit (the kernel as a margin at the logits' scale)
  hierloc-no-fusion                  model.entity_fusion=false
  hierloc-entity-means               model.entity_image_features=auto: entities fuse their training images' mean
                                     feature (the paper's entity branch; "none" in the shipped frozen recipe)
  hierloc-no-geo-soft                loss.geo_soft=0: the paper's one-hot targets (the shipped recipe sets 0.3)
  hierloc-no-concepts                model.concepts=false
  hierloc-finetune                   the shared pretrained backbone fine-tuned (model.freeze_backbone=false,
                                     train.backbone_lr=2e-4, train.shift_frac=0.25); only when asked for
  hierloc-flat                       the full model searched flat (nearest city): no extra training, its train
                                     time is the full model's
  hierloc                            the full model, beam search (inference.beam)
Every row gets the --shared overrides (encoder, image size, batch size, learning rates: what must be equal for
a fair comparison); HierLoc rows also get the positional overrides (the recipe being tuned); then the row's
own switch; then the budget (--epochs, --max-steps) and the seed, which always win.

Metrics: those of `scripts/eval_demo.py`: OSV5M distance metrics (`hierloc.inference.metrics`: mean/median km,
GeoScore, accuracy at 1/25/200/750/2500 km) and level accuracy = the predicted path (HierLoc: the answered
entity's path; city peers: the answered city's path; GeoCLIP: `Gazetteer.locate` of the answered point) against
`Gazetteer.locate` of the true point, over the rows whose true point resolves at that level. train s: the
training loop's wall time (setup such as concept labelling excluded, as in HierLoc's train_summary.json).
params MB: parameters, encoder included; index MB: what inference looks up besides the network (entity points
and coordinates; the GPS gallery's embeddings and coordinates). MB = 1e6 bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ORACLE_ROWS = ("oracle-nearest",)
BASELINE_ROWS = ("country-ce", "flat-ce", "geo-ls", "geoclip", "swclip")
HIERLOC_SWITCHES = {
    "hierloc-euclidean": ["model.geometry=euclidean"],
    "hierloc-lam0": ["loss.lam=0", "loss.learn_weights=false"],
    "hierloc-gaussian": ["loss.kernel=gaussian"],
    "hierloc-inverse": ["loss.kernel=inverse"],
    "hierloc-logit": ["loss.weighting=logit"],
    "hierloc-no-fusion": ["model.entity_fusion=false"],
    "hierloc-entity-means": ["model.entity_image_features=auto"],
    "hierloc-no-geo-soft": ["loss.geo_soft=0"],
    "hierloc-no-concepts": ["model.concepts=false"],
    # fine-tuning: the shared pretrained backbone unfrozen, at a tenth of the head's learning rate, with the
    # translation augmentation a trained backbone needs on the demo patches (not in the default rows: ~5x the cost)
    "hierloc-finetune": ["model.freeze_backbone=false", "train.backbone_lr=2e-4", "train.shift_frac=0.25"],
    "hierloc": [],
}
ROWS = ORACLE_ROWS + BASELINE_ROWS + ("hierloc-euclidean", "hierloc-lam0", "hierloc-gaussian", "hierloc-inverse",
                        "hierloc-logit", "hierloc-no-fusion", "hierloc-entity-means", "hierloc-no-geo-soft",
                        "hierloc-no-concepts",
                        "hierloc-finetune", "hierloc-flat", "hierloc")
DEFAULT_ROWS = tuple(row for row in ROWS if row != "hierloc-finetune")
LABELS = {
    "oracle-nearest": "oracle: nearest training centre",
    "country-ce": "CE over countries (floor)",
    "flat-ce": "flat CE over cities",
    "geo-ls": "flat CE + geo label smoothing",
    "geoclip": "GeoCLIP-style image-GPS",
    "swclip": "SW-CLIP-style geo-soft",
    "hierloc-euclidean": "HierLoc Euclidean",
    "hierloc-lam0": "HierLoc lambda=0 (InfoNCE)",
    "hierloc-gaussian": "HierLoc Gaussian kernel",
    "hierloc-inverse": "HierLoc inverse kernel",
    "hierloc-logit": "HierLoc logit-scale weights",
    "hierloc-no-fusion": "HierLoc no entity fusion",
    "hierloc-entity-means": "HierLoc entities fuse mean image features",
    "hierloc-no-geo-soft": "HierLoc without geo-soft targets",
    "hierloc-no-concepts": "HierLoc no concepts",
    "hierloc-finetune": "HierLoc fine-tuned backbone",
    "hierloc-flat": "HierLoc flat nearest city",
    "hierloc": "HierLoc full (beam)",
}
SPLITS = ("test_nearby", "test_unseen")
# (key, header, scale, format)
COLUMNS = [("mean_km", "mean km", 1, ".0f"), ("median_km", "median km", 1, ".0f"), ("geoscore", "GeoScore", 1, ".0f"),
           ("acc_1km", "1 km %", 100, ".1f"), ("acc_25km", "25 km %", 100, ".1f"),
           ("acc_200km", "200 km %", 100, ".1f"), ("acc_750km", "750 km %", 100, ".1f"),
           ("acc_2500km", "2500 km %", 100, ".1f"), ("acc_country", "country %", 100, ".1f"),
           ("acc_region", "region %", 100, ".1f"), ("acc_subregion", "subregion %", 100, ".1f"),
           ("acc_city", "city %", 100, ".1f"), ("train_s", "train s", 1, ".0f"), ("params_mb", "params MB", 1, ".2f"),
           ("index_mb", "index MB", 1, ".2f")]
# Settings that must be the same for every row: refused among the HierLoc-only overrides.
FAIRNESS_KEYS = {"train.epochs": "--epochs", "train.max_steps": "--max-steps", "train.seed": "--seeds",
                 "model.backbone": "--shared", "model.pretrained": "--shared", "model.freeze_backbone": "--shared",
                 "model.image_size": "--shared", "train.batch_size": "--shared", "train.augment": "--shared",
                 "train.shift_frac": "--shared"}
MARKER = ".bench_peers"


def note(message: str) -> None:
    print(f"bench_peers: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ options
def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo-data", help="demo data directory (`hierloc demo-data --out DIR`)")
    ap.add_argument("--gazetteer", default=None,
                    help="gazetteer directory (default: built from DATA/train.csv into OUT/gazetteer)")
    ap.add_argument("--out", default="runs/bench-peers", help="work directory (models per seed and row)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--epochs", type=int, default=None, help="epochs for every row (default: the config's)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop every row after this many steps (0: no cap)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated rows among: {', '.join(ROWS)} (default: all but hierloc-finetune)")
    ap.add_argument("--config", default=None, help="TOML/YAML config file read before the overrides (every row)")
    ap.add_argument("--shared", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override for every row, peers included (repeatable); baseline.key=value tunes the peers")
    ap.add_argument("--json", default=None, help="also write every number (per seed, mean, std) as JSON here")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="train nothing: one table from the --json files of earlier runs (e.g. one per seed or per "
                         "group of rows; same budget and overrides), over the rows every seed has")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (status lines still go to stderr)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log the library's info messages")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides for the HierLoc rows only")
    args, extra = ap.parse_known_args(argv)
    if extra:  # overrides may stand among the options
        if all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = list(args.overrides) + extra
        else:
            ap.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def parse_rows(text: str) -> list[str]:
    from hierloc.errors import InputError

    rows = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown or not rows:
        raise InputError(f"--rows {text!r}: unknown row {', '.join(unknown) or '(none given)'}; expected some of "
                         f"{', '.join(ROWS)}")
    return [row for row in ROWS if row in rows]   # canonical order


def parse_seeds(text: str) -> list[int]:
    from hierloc.errors import InputError

    try:
        seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise InputError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds {text!r}: expected distinct comma-separated integers, e.g. 0,1,2")
    return seeds


def check_hierloc_overrides(overrides: list[str]) -> None:
    from hierloc.errors import InputError

    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in FAIRNESS_KEYS:
            raise InputError(f"override {item!r}: {key} must be equal for every row; use {FAIRNESS_KEYS[key]}")
        if key.startswith("baseline."):
            raise InputError(f"override {item!r}: baseline options tune the peers; pass it with --shared")


def row_config(args, seed: int, extra: list[str]):
    """Config of one row: --config, --shared (minus baseline.*), extra, then the budget and the seed."""
    from hierloc.config import load_config

    shared = [item for item in args.shared if not item.startswith("baseline.")]
    budget = [f"train.seed={seed}"]
    if args.epochs is not None:
        budget.append(f"train.epochs={args.epochs}")
    if args.max_steps is not None:
        budget.append(f"train.max_steps={args.max_steps}")
    # without --config: the tiny ViT unless --shared names a backbone (the library's default, a hub id, needs its
    # weights in the local cache)
    default = [] if args.config else ["model.backbone=tiny-vit"]
    return load_config(args.config, [*default, *shared, *extra, *budget])


# ------------------------------------------------------------------------------------------------ set-up
def prepare_out(out: Path) -> None:
    from hierloc.errors import InputError

    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(f"--out {out}: directory exists, is not empty and is not a bench_peers work directory; "
                         "choose another")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("work directory of scripts/bench_peers.py: its contents are replaced on each run\n")


def prepare_gazetteer(args, train_csv: Path, out: Path):
    """-> (Gazetteer, its directory)."""
    from gazetteer import Gazetteer, csvio

    if args.gazetteer:
        return Gazetteer.load(args.gazetteer), Path(args.gazetteer)
    directory = out / "gazetteer"
    digest = csvio.file_sha256(train_csv)
    if (directory / "metadata.json").is_file():
        gaz = Gazetteer.load(directory)
        if (gaz.metadata.get("source") or {}).get("sha256") == digest:
            note(f"reusing the gazetteer in {directory}")
            return gaz, directory
    note(f"building the gazetteer from {train_csv} (as `hierloc build-gazetteer --from-csv`)")
    lat_col, lon_col = csvio.resolve_coordinate_columns(train_csv)
    lat, lon, _rows = csvio.read_coordinates(train_csv, lat_col, lon_col)
    source = {"kind": "csv", "path": str(train_csv.resolve()), "lat_col": lat_col, "lon_col": lon_col,
              "sha256": digest}
    gaz = Gazetteer.build_from_points(lat, lon, progress=False, source=source)
    gaz.save(directory, overwrite=True)
    return gaz, directory


# -------------------------------------------------------------------------------------------- one row run
def hierloc_size(model) -> dict:
    from hierloc.training.losses import GWHInfoNCE

    params = sum(p.numel() * p.element_size() for p in model.model.parameters())
    params += sum(p.numel() * p.element_size() for p in GWHInfoNCE(model.cfg.loss).parameters())
    points = model.entity_points()
    index = points.numel() * points.element_size() + points.shape[0] * 2 * 8
    return {"params_mb": params / 1e6, "index_mb": index / 1e6}


def score(pred: dict, truth: np.ndarray, table) -> dict:
    """Metrics of one row's answers on a split (module docstring, Metrics), over the images it could predict:
    `hierloc.inference.metrics`' distance metrics, and its level accuracy on entity ids (-1, no entity: the
    metrics' missing key, so rows whose true point does not resolve at a level are left out of it). The same
    numbers as scripts/eval_demo.py's (`_common.path_metrics`, which this file cannot import: the tests load it
    by path)."""
    from gazetteer import LEVELS
    from hierloc.inference import metrics

    keep = np.isfinite(pred["pred_lat_deg"]) & np.isfinite(pred["pred_lon_deg"])
    if not keep.all():
        note(f"{int((~keep).sum())} images could not be predicted and are left out")
    out = metrics.distance_metrics(pred["pred_lat_deg"][keep], pred["pred_lon_deg"][keep],
                                   np.asarray(table.lat_deg)[keep], np.asarray(table.lon_deg)[keep])
    pred_keys, true_keys = ([np.where(ids >= 0, ids.astype(str), metrics.MISSING_KEY).astype(object)
                             for ids in paths[keep].T] for paths in (pred["paths"], truth))
    accuracy = metrics.osv5m_level_accuracy(pred_keys, true_keys, missing="skip")
    return {**out, **{f"acc_{level}": accuracy[f"acc_{level}"] for level in LEVELS}}


def nearest_training_point(train, gaz, table, chunk: int = 1024) -> dict:
    """The oracle row's answers: for every row of ``table``, the coordinate of the nearest training point (largest
    unit-vector dot product = smallest great-circle distance) and that point's `Gazetteer.locate` path."""
    from gazetteer.geo import to_unit_vectors

    train_units = to_unit_vectors(train.lat_deg, train.lon_deg)        # (T, 3)
    query_units = to_unit_vectors(table.lat_deg, table.lon_deg)        # (N, 3)
    nearest = np.concatenate([np.argmax(query_units[i:i + chunk] @ train_units.T, axis=1)
                              for i in range(0, len(query_units), chunk)]) if len(query_units) else np.zeros(0, int)
    lat, lon = np.asarray(train.lat_deg)[nearest], np.asarray(train.lon_deg)[nearest]
    return {"pred_lat_deg": lat, "pred_lon_deg": lon, "paths": gaz.locate(lat, lon)}


def run_seed(args, seed: int, rows: list[str], data: Path, gaz, gaz_dir: Path, tests: dict, out: Path) -> dict:
    """-> {row: {split: metrics}} for one seed."""
    from hierloc.training import peers as baselines
    from hierloc.inference.predictor import HierLoc
    from hierloc.training.run import TrainInputs
    from hierloc.training.train import train
    from hierloc.data.tables import read_image_table

    train_csv = str(data / "train.csv")
    progress = not args.no_progress
    options = baselines.parse_options([item for item in args.shared if item.startswith("baseline.")], "--shared")
    results: dict[str, dict] = {}
    if "oracle-nearest" in rows:
        train_table = read_image_table(data / "train.csv")
        results["oracle-nearest"] = {split: {**score(nearest_training_point(train_table, gaz, table), truth, table),
                                             "train_s": 0.0, "params_mb": 0.0, "index_mb": 0.0}
                                     for split, (table, truth) in tests.items()}
    for row in rows:
        if row not in BASELINE_ROWS:
            continue
        note(f"seed {seed}: training {row}")
        cfg = row_config(args, seed, [])
        trained = baselines.train_baseline(row, cfg, train_csv, gaz, out / f"seed-{seed}" / row, options=options,
                                           device=args.device, progress=progress, overwrite=True,
                                           cache_dir=out / "feature_cache")
        extra = {"train_s": trained.summary["seconds"], **baselines.size_megabytes(trained)}
        note(f"seed {seed}: {row}: {trained.summary['steps']} steps in {trained.summary['seconds']:.0f} s "
             f"(loss {trained.summary['first_loss']:.3f} -> {trained.summary['final_loss']:.3f}); evaluating")
        results[row] = {split: {**score(baselines.predict(trained, table), truth, table), **extra}
                        for split, (table, truth) in tests.items()}
        del trained
    hierloc_rows = [row for row in rows if row in HIERLOC_SWITCHES]
    if "hierloc-flat" in rows and "hierloc" not in hierloc_rows:
        hierloc_rows.append("hierloc")   # the flat row searches the full model
    for row in hierloc_rows:
        note(f"seed {seed}: training {row}")
        cfg = row_config(args, seed, [*args.overrides, *HIERLOC_SWITCHES[row]])
        model_dir = out / f"seed-{seed}" / row
        # one feature cache for every row and seed (a frozen backbone's features of train.csv, extracted once)
        summary = train(cfg, TrainInputs(train_csv=train_csv, out_dir=str(model_dir), gazetteer_dir=str(gaz_dir),
                                         device=args.device, overwrite=True, progress=progress,
                                         cache_dir=str(out / "feature_cache")))
        model = HierLoc.from_pretrained(model_dir, device=args.device)
        if model.gazetteer.content_hash != gaz.content_hash:
            raise RuntimeError(f"{model_dir}: the model's gazetteer differs from the benchmark's")
        extra = {"train_s": summary.seconds, **hierloc_size(model)}
        note(f"seed {seed}: {row}: {summary.steps} steps in {summary.seconds:.0f} s "
             f"(final loss {summary.final_loss:.3f}); evaluating")
        variants = [(row, False)] + ([("hierloc-flat", True)] if row == "hierloc" and "hierloc-flat" in rows else [])
        for name, flat in variants:
            if name not in rows:
                continue
            results[name] = {}
            for split, (table, truth) in tests.items():
                pred = model.predict_table(table, flat=flat, progress=False)
                results[name][split] = {**score(pred, truth, table), **extra}
        del model
    return {row: results[row] for row in rows}


# ---------------------------------------------------------------------------------------------- reporting
def aggregate(per_seed: list[dict]) -> dict:
    """[{metric: value}] over seeds -> {metric: {"mean", "std" (sample std, 0 for one seed), "values"}}."""
    out = {}
    for key in per_seed[0]:
        values = [float(m[key]) for m in per_seed]
        finite = [v for v in values if math.isfinite(v)]
        mean = float(np.mean(finite)) if finite else float("nan")
        std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "values": values}
    return out


def format_cell(stats: dict, scale: float, fmt: str, n_seeds: int) -> str:
    if not math.isfinite(stats["mean"]):
        return "-"
    text = f"{stats['mean'] * scale:{fmt}}"
    return text + f" ± {stats['std'] * scale:{fmt}}" if n_seeds > 1 else text


def format_table(split_results: dict, n_seeds: int) -> str:
    header = ["row"] + [column[1] for column in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, stats in split_results.items():
        cells = [format_cell(stats[key], scale, fmt, n_seeds) for key, _, scale, fmt in COLUMNS]
        lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_report(payload: dict, commands: list[list[str]]) -> None:
    """The header lines and one table per split of a run's (or a merge's) payload."""
    for command in commands:
        print(f"bench_peers: {' '.join(command)}")
    machine = payload["machine"]
    print(f"machine: nproc={machine['nproc']}, torch {machine['torch']}, {machine['platform']}; "
          f"wall {payload['wall_s']:.0f} s")
    print(f"budget: {payload['budget']}; seeds {','.join(map(str, payload['seeds']))}; shared overrides: "
          f"{payload['shared_overrides'] or 'none'}; HierLoc overrides: {payload['hierloc_overrides'] or 'none'}")
    for split in SPLITS:
        print(f"\n{split}: {payload.get('splits', {}).get(split, '')}")
        print(format_table(payload["results"][split], len(payload["seeds"])))


def merge(paths: list[str]) -> int:
    """--merge: one report from several --json files: their (seed, row) results pooled, a row reported when every
    seed has it; a (seed, row) given twice is refused."""
    from hierloc.errors import InputError

    runs = []
    for path in paths:
        try:
            runs.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read a bench_peers JSON ({exc})") from None
    first = runs[0]
    for path, run in zip(paths[1:], runs[1:]):
        for key in ("budget", "shared_overrides", "hierloc_overrides"):
            if run.get(key) != first.get(key):
                raise InputError(f"{path}: {key} {run.get(key)!r} differs from {paths[0]}'s {first.get(key)!r}")
    per_seed: dict[str, dict] = {}
    for path, run in zip(paths, runs):
        for seed, rows in run["per_seed"].items():
            twice = sorted(set(rows) & set(per_seed.get(seed, {})))
            if twice:
                raise InputError(f"{path}: seed {seed} of row {twice[0]} is in two of the merged files")
            per_seed.setdefault(seed, {}).update(rows)
    rows = [row for row in ROWS if all(row in seed_rows for seed_rows in per_seed.values())]
    if not rows:
        raise InputError("--merge: no row is in every merged file")
    seeds = sorted(per_seed, key=int)
    results = {split: {row: aggregate([per_seed[s][row][split] for s in seeds]) for row in rows} for split in SPLITS}
    payload = {**first, "seeds": [int(s) for s in seeds], "results": results, "per_seed": per_seed,
               "rows": {row: LABELS[row] for row in rows}, "wall_s": sum(run.get("wall_s", 0.0) for run in runs)}
    print_report(payload, [run["command"] for run in runs])
    return 0


def main(argv: list[str] | None = None) -> int:
    from hierloc.errors import InputError

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return merge(args.merge) if args.merge else run(args, argv)
    except InputError as exc:
        print(f"bench_peers: error: {exc}", file=sys.stderr)
        return 2


def run(args, argv) -> int:
    import torch

    from gazetteer import LEVELS
    from gazetteer.atomic import atomic_write_text
    from hierloc.training.peers import parse_options
    from hierloc.data.tables import read_image_table
    from hierloc.errors import InputError

    rows, seeds = parse_rows(args.rows), parse_seeds(args.seeds)
    check_hierloc_overrides(args.overrides)
    parse_options([item for item in args.shared if item.startswith("baseline.")], "--shared")  # fail early
    row_config(args, seeds[0], [*args.overrides])                                             # fail early
    data = Path(args.data)
    for name in ("train.csv", *(f"{split}.csv" for split in SPLITS)):
        if not (data / name).is_file():
            raise InputError(f"{data / name}: not found; create the demo data with "
                             f"`hierloc demo-data --out {data}`")
    out = Path(args.out)
    prepare_out(out)
    started = time.perf_counter()
    gaz, gaz_dir = prepare_gazetteer(args, data / "train.csv", out)
    tests = {}
    for split in SPLITS:
        table = read_image_table(data / f"{split}.csv")
        tests[split] = (table, gaz.locate(table.lat_deg, table.lon_deg))
    per_seed = {}
    for seed in seeds:
        per_seed[seed] = run_seed(args, seed, rows, data, gaz, gaz_dir, tests, out)
    results = {split: {row: aggregate([per_seed[s][row][split] for s in seeds]) for row in rows} for split in SPLITS}

    budget = (f"epochs={args.epochs if args.epochs is not None else row_config(args, seeds[0], []).train.epochs}"
              + (f", max_steps={args.max_steps}" if args.max_steps else ""))
    split_info = {}
    for split in SPLITS:
        table, truth = tests[split]
        resolved = ", ".join(f"{lv} {100 * (truth[:, i] >= 0).mean():.0f}%" for i, lv in enumerate(LEVELS))
        split_info[split] = f"n={len(table)}; true points resolving in the gazetteer: {resolved}"
    command = argv if argv is not None else sys.argv[1:]
    payload = {"command": command, "machine": {"nproc": os.cpu_count(), "torch": torch.__version__,
                                               "platform": platform.platform()},
               "seeds": seeds, "budget": budget, "shared_overrides": args.shared, "hierloc_overrides": args.overrides,
               "rows": {row: LABELS[row] for row in rows}, "splits": split_info, "results": results,
               "per_seed": {str(s): per_seed[s] for s in seeds}, "wall_s": time.perf_counter() - started}
    print_report(payload, [command])
    if args.json:
        atomic_write_text(args.json, json.dumps(payload, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
