"""Input side and packaged backbone vs speed and accuracy, on frozen features of the demo world, in one table.

    python scripts/bench_input_size.py --data runs/demo-data --out runs/bench-input-size
    python scripts/bench_input_size.py --sizes 64 --backbones efficientnet-lite0 --limit 2000   # a smoke run

For every (backbone, input side): the frozen backbone's features of train, val, test_unseen and test_nearby are
extracted once into OUT/<backbone>-<side>/<split> (`hierloc.training.features`, the cache `hierloc train` uses;
reused on a second run). Speed is timed apart from the caches, on the first --time-images training images:
decoding + resizing + the frozen forward through the same loader (its workers included), every combination in
turn, --repeats rounds, the fastest round kept.
On the standardised features: a linear classifier over the countries (AdamW, full batch, --probe-epochs) and the
1-nearest-neighbour's country (cosine similarity to the training features). Country = `Gazetteer.locate` of the
image's point, level 0. The side is chosen on `val` (never on a test split): the smallest side within one point
of the best val linear-probe accuracy (the side, not the noisy timing, is the cost). Benchmarks on a shared 2-core CPU are noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _common import Stopwatch
from gazetteer import Gazetteer
from hierloc.data import tables
from hierloc.model.encoders import build_image_encoder
from hierloc.training import features as feature_cache

SPLITS = ("train", "val", "test_unseen", "test_nearby")


def parse_args(argv=None):
    """The command-line options (module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo-data", help="`hierloc demo-data` directory")
    ap.add_argument("--gazetteer", default="runs/demo-gazetteer", help="gazetteer directory (countries of the points)")
    ap.add_argument("--out", default="runs/bench-input-size", help="feature caches, one per backbone, side and split")
    ap.add_argument("--backbones", default="efficientnet-lite0", help="comma-separated packaged backbones")
    ap.add_argument("--sizes", default="64,96,128", help="comma-separated input sides in pixels")
    ap.add_argument("--extra", default="", help="extra backbone:side pairs, e.g. efficientnet-lite2:64")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N rows of each split (0: all)")
    ap.add_argument("--probe-epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--time-images", type=int, default=2000, help="training images per timing round")
    ap.add_argument("--repeats", type=int, default=2, help="timing rounds (each combination once per round)")
    return ap.parse_args(argv)


def split_features(encoder, table, cache_dir: Path, args) -> np.ndarray:
    """-> features (N, F) float32 of every image of the table (extracted into cache_dir, or reused from it)."""
    images = tables.ImageDataset(table, encoder.preprocessor, train=False)
    cache = feature_cache.extract_features(encoder, images, cache_dir, amp=False, batch_size=args.batch_size,
                                           num_workers=args.workers, progress=False)
    return np.asarray(cache[np.arange(len(cache))], dtype=np.float32)


@torch.no_grad()
def time_extraction(encoder, table, args) -> float:
    """Seconds per image to decode, resize and encode the table's images (no cache), one pass."""
    images = tables.ImageDataset(table, encoder.preprocessor, train=False)
    with Stopwatch() as watch:
        for batch in tables.make_loader(images, batch_size=args.batch_size, shuffle=False, num_workers=args.workers):
            encoder(batch["pixel_values"])
    return watch.seconds / len(table)


def linear_probe(x_train, y_train, tests: dict, n_classes: int, epochs: int, seed: int = 0) -> dict:
    """Standardised features -> softmax regression over the classes (AdamW lr 1e-2, wd 1e-4, full batch) ->
    {split: accuracy}."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt = torch.from_numpy((x_train - mean) / std)
    yt = torch.from_numpy(y_train)
    layer = torch.nn.Linear(xt.shape[1], n_classes)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(layer(xt), yt).backward()
        opt.step()
    with torch.no_grad():
        return {name: float((layer(torch.from_numpy((x - mean) / std)).argmax(1).numpy() == y).mean())
                for name, (x, y) in tests.items()}


def nearest_neighbour(x_train, y_train, tests: dict) -> dict:
    """1-NN by cosine similarity -> {split: accuracy}."""
    train = torch.nn.functional.normalize(torch.from_numpy(x_train), dim=1)
    out = {}
    for name, (x, y) in tests.items():
        query = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
        nearest = torch.cat([(query[i:i + 1024] @ train.T).argmax(1) for i in range(0, len(query), 1024)])
        out[name] = float((y_train[nearest.numpy()] == y).mean())
    return out


def main(argv=None) -> int:
    """Extract or reuse every combination's features, time them, fit the probes, print the table."""
    args = parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    gaz = Gazetteer.load(args.gazetteer)
    tabs = {}
    for split in SPLITS:
        table = tables.read_image_table(data / f"{split}.csv")
        if args.limit:
            table = table.subset(np.arange(min(args.limit, len(table))))
        tabs[split] = table
    countries = {split: gaz.locate(t.lat_deg, t.lon_deg)[:, 0] for split, t in tabs.items()}
    classes = np.unique(countries["train"][countries["train"] >= 0])
    index = {c: i for i, c in enumerate(classes)}
    labels = {split: np.array([index.get(c, -1) for c in countries[split]]) for split in SPLITS}
    combos = [(b, int(s)) for b in args.backbones.split(",") for s in args.sizes.split(",")]
    combos += [(item.split(":")[0], int(item.split(":")[1])) for item in args.extra.split(",") if item]
    encoders = {combo: build_image_encoder(combo[0], pretrained=True, freeze=True, image_size=combo[1]).eval()
                for combo in combos}
    timing_table = tabs["train"].subset(np.arange(min(args.time_images, len(tabs["train"]))))
    timings = {combo: [] for combo in combos}
    for _ in range(args.repeats):
        for combo in combos:
            timings[combo].append(time_extraction(encoders[combo], timing_table, args))
    rows = []
    for backbone, side in combos:
        encoder = encoders[(backbone, side)]
        ms = min(timings[(backbone, side)]) * 1e3
        feats = {split: split_features(encoder, tabs[split], out / f"{backbone}-{side}" / split, args)
                 for split in SPLITS}
        keep = labels["train"] >= 0
        tests = {s: (feats[s], labels[s]) for s in SPLITS[1:]}
        probe = linear_probe(feats["train"][keep], labels["train"][keep], tests, len(classes), args.probe_epochs)
        knn = nearest_neighbour(feats["train"][keep], labels["train"][keep], tests)
        rows.append((backbone, side, ms, probe, knn))
        print(f"bench_input_size: {backbone} {side} px done", file=sys.stderr, flush=True)
    best = max(r[3]["val"] for r in rows)
    chosen = min((r for r in rows if r[3]["val"] >= best - 0.01), key=lambda r: (r[1], r[2]))
    print(f"train {len(tabs['train'])} images, {len(classes)} countries; probe: linear over countries, "
          f"{args.probe_epochs} full-batch AdamW epochs; 1-NN: cosine; timing: {len(timing_table)} images, "
          f"best of {args.repeats} interleaved rounds, {torch.get_num_threads()} threads")
    print("| backbone | side px | extraction ms/image | val country: linear / 1-NN | test_unseen: linear / 1-NN "
          "| test_nearby: linear / 1-NN |")
    print("|---|---|---|---|---|---|")
    for backbone, side, ms, probe, knn in rows:
        mark = " (chosen on val)" if (backbone, side) == chosen[:2] else ""
        cells = " | ".join(f"{100 * probe[s]:.1f} % / {100 * knn[s]:.1f} %" for s in SPLITS[1:])
        print(f"| {backbone}{mark} | {side} | {ms:.2f} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
