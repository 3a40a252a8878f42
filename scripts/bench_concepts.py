"""The concept bottleneck on the demo world: concept quality on held-out data, and accuracy with vs without it.

    python scripts/bench_concepts.py --data runs/demo-data --out runs/bench-concepts [section.key=value ...]

Trains two models with the same data, seed and budget (model.concepts=true / false), then prints:
1. geolocation accuracy of both on the "nearby" and "unseen" test splits (predicted path vs the gazetteer path of
   the true point; median km; GeoScore);
2. per-concept AUROC and accuracy (threshold 0.5) of the concept head on the held-out "nearby" split, against
   labels from real data (the same offline sources as training), and their means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from _common import Stopwatch, path_metrics


def concept_probs(model, table, batch_size: int = 128) -> np.ndarray:
    """(N, K) concept probabilities of the model's head for every image of an ImageTable."""
    from hierloc.data import tables as data

    dataset = data.ImageDataset(table, model.encoder.preprocessor, train=False)
    loader = data.make_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, seed=0, epoch=0)
    out = np.full((len(table.lat_deg), model.model.concept_head.n_concepts), np.nan, dtype=np.float32)
    with torch.no_grad():
        for batch in loader:
            feats = model.model.encode_images(batch["pixel_values"])
            out[batch["index"].numpy()] = torch.sigmoid(model.model.concept_head(feats)[0]).numpy()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo-data")
    ap.add_argument("--out", default="runs/bench-concepts")
    ap.add_argument("overrides", nargs="*", help="config overrides for both runs (section.key=value)")
    args = ap.parse_args()

    from hierloc.model import concepts as C
    from hierloc.inference.predictor import HierLoc
    from hierloc.cli import main as cli
    from hierloc.data.tables import read_image_table

    data = Path(args.data)
    models = {}
    for name, flag in (("with concepts", "true"), ("without concepts", "false")):
        out = Path(args.out) / ("with" if flag == "true" else "without")
        with Stopwatch() as watch:
            code = cli(["-q", "train", "--csv", str(data / "train.csv"), "--out", str(out), "--overwrite",
                        "--no-progress", "model.backbone=tiny-vit", f"model.concepts={flag}", *args.overrides])
            if code:
                return code
            model = HierLoc.from_pretrained(out, device="cpu")
        models[name] = (model, watch.seconds)

    print(f"overrides: {args.overrides or 'defaults'}\n")
    print("| model | split | country % | region % | subregion % | median km | GeoScore | train s |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for name, (model, secs) in models.items():
        for split in ("test_nearby", "test_unseen"):
            table = read_image_table(str(data / f"{split}.csv"))
            lat, lon = np.asarray(table.lat_deg), np.asarray(table.lon_deg)
            truth = model.gazetteer.locate(lat, lon)
            pred = model.predict_table(table, progress=False)
            m = path_metrics(pred["paths"], truth, pred["pred_lat_deg"], pred["pred_lon_deg"], lat, lon)
            results[(name, split)] = m
            print(f"| {name} | {split} | {100 * m['acc_country']:.1f} | {100 * m['acc_region']:.1f} | "
                  f"{100 * m['acc_subregion']:.1f} | {m['median_km']:.0f} | {m['geoscore']:.0f} | {secs:.0f} |")

    model = models["with concepts"][0]
    vocab = model.model.concept_vocabulary
    table = read_image_table(str(data / "test_nearby.csv"))
    labels = C.concept_labels(table.lat_deg, table.lon_deg, None, vocabulary=vocab)
    probs = concept_probs(model, table)
    quality = C.concept_quality(probs, labels, vocab.names)
    print(f"\nconcept quality on held-out test_nearby ({len(table.lat_deg)} images, {len(vocab)} concepts): "
          f"mean AUROC {quality['mean_auroc']:.3f}, mean accuracy {quality['mean_accuracy']:.3f}\n")
    print("| concept | group | AUROC | accuracy | positive rate |")
    print("|---|---|---|---|---|")
    for i, concept in enumerate(vocab.names):
        print(f"| {concept} | {vocab.groups[i]} | {quality['auroc'][concept]:.3f} | "
              f"{quality['accuracy'][concept]:.3f} | {quality['positive_rate'][concept]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
