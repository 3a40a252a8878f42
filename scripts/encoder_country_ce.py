"""Encoder check: how well does a from-scratch encoder learn countries on the demo world with plain cross-entropy?

    .venv/bin/python scripts/encoder_country_ce.py --data runs/demo-data --gazetteer runs/demo-gazetteer \\
        --backbone tiny-resnet --image-size 32 --steps 624
    DATA=runs/demo-data GAZ=runs/demo-gazetteer CNN=1 IMG=32 python scripts/encoder_country_ce.py ce 624
    DATA=runs/demo-data GAZ=runs/demo-gazetteer IMG=32 python scripts/encoder_country_ce.py ce 936   # tiny ViT

A diagnostic, not part of the method (used to tell the encoder's limits from the loss's: README, "Demo accuracy"):
HierLoc's encoder and training machinery with a linear head over the gazetteer's countries and plain cross-entropy
in place of the hyperbolic model. Everything else is the library's: the encoder (`build_image_encoder`: the
built-in tiny ViT, or the tiny ResNet with --backbone tiny-resnet / CNN=1, trained from scratch at --image-size /
IMG), its preprocessing and augmentation (`ImageDataset`), the epoch-seeded data order (`make_loader`), AdamW
(train.lr for the head, train.backbone_lr for the encoder, train.weight_decay), warm-up + cosine and gradient
clipping (`train_step`). --steps (default 312) steps of train.batch_size (default here 128) images; extra
`section.key=value` overrides apply to the config. Prints the loss every 50 steps, then the country accuracy on
test_nearby and test_unseen over the rows whose true point falls in a country of the gazetteer.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gazetteer import Gazetteer
from hierloc.config import load_config
from hierloc.data import tables
from hierloc.device import encoder_autocast
from hierloc.training.train import base_learning_rates, build_encoder, plan_steps, seed_everything, train_step

SPLITS = ("test_nearby", "test_unseen")


class CountryClassifier(nn.Module):
    """encoder -> Linear(F, n_countries): pixels (B, 3, S, S) -> country logits (B, n_countries)."""

    def __init__(self, encoder: nn.Module, n_countries: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, n_countries)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with encoder_autocast(pixel_values.device):
            features = self.encoder(pixel_values)
        return self.head(features.float())

    def loss(self, pixel_values: torch.Tensor, country: torch.Tensor) -> dict:
        return {"loss": F.cross_entropy(self(pixel_values), country)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("legacy", nargs="*", help="the former positional form: `ce [STEPS]` (ce is the only mode)")
    ap.add_argument("--data", default=os.environ.get("DATA", "runs/demo-data"),
                    help="demo-data directory (env DATA)")
    ap.add_argument("--gazetteer", default=os.environ.get("GAZ", "runs/demo-gazetteer"),
                    help="gazetteer directory (env GAZ)")
    ap.add_argument("--backbone", default="tiny-resnet" if os.environ.get("CNN") else "tiny-vit",
                    help="tiny-vit or tiny-resnet (env CNN=1: tiny-resnet)")
    ap.add_argument("--image-size", type=int, default=int(os.environ["IMG"]) if os.environ.get("IMG") else None,
                    help="input side in pixels (env IMG; default: the backbone's)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 312)")
    ap.add_argument("--batch-size", type=int, default=128, help="images per step")
    args, overrides = ap.parse_known_args(argv)
    legacy = [word for word in args.legacy if "=" not in word]
    args.overrides = [word for word in args.legacy if "=" in word] + overrides
    if legacy and legacy[0] != "ce":
        ap.error(f"mode {legacy[0]!r}: only 'ce' (cross-entropy over countries) is available")
    if args.steps is None:
        args.steps = int(legacy[1]) if len(legacy) > 1 else 312
    return args


def country_rows(csv_path: str, gaz: Gazetteer):
    """The rows of a demo CSV -> (table, true country id (N,), -1 where the point is in no country of gaz)."""
    table = tables.read_image_table(csv_path, on_bad="skip")
    return table, gaz.locate(table.lat_deg, table.lon_deg)[:, 0]


def train_classifier(model: CountryClassifier, dataset, cfg, source: str) -> None:
    optimizer = torch.optim.AdamW([
        {"params": list(model.encoder.parameters()), "lr": cfg.train.backbone_lr},
        {"params": list(model.head.parameters()), "lr": cfg.train.lr}], weight_decay=cfg.train.weight_decay)
    optimizers = {"adamw": optimizer}
    base_lrs = base_learning_rates(optimizers)
    steps_per_epoch, total_steps = plan_steps(len(dataset), cfg.train, source)
    step, started = 0, time.perf_counter()
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        loader = tables.make_loader(dataset, batch_size=cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                                    epoch=epoch, num_workers=cfg.train.num_workers, drop_last=True)
        model.train()
        for batch in loader:
            if step >= total_steps:
                break
            forward = functools.partial(model.loss, batch["pixel_values"], batch["targets"][:, 0])
            out, _ = train_step(forward, optimizers, base_lrs, model.parameters(), cfg.train, step, total_steps)
            if step % 50 == 0:
                print(step, round(float(out["loss"].detach()), 3), round(time.perf_counter() - started), flush=True)
            step += 1


@torch.no_grad()
def country_accuracy(model: CountryClassifier, table, truth: np.ndarray, batch_size: int = 256) -> float:
    dataset = tables.ImageDataset(table, model.encoder.preprocessor, train=False)
    predicted = np.full(len(table), -1, dtype=np.int64)
    model.eval()
    for batch in tables.make_loader(dataset, batch_size=batch_size, shuffle=False):
        if batch["index"].numel():
            predicted[batch["index"].numpy()] = model(batch["pixel_values"]).argmax(dim=1).numpy()
    scored = truth >= 0
    return float((predicted[scored] == truth[scored]).mean())


def main(argv=None) -> None:
    args = parse_args(argv)
    overrides = [f"model.backbone={args.backbone}", f"train.batch_size={args.batch_size}",
                 f"train.max_steps={args.steps}", "model.pretrained=false"]
    overrides += [f"model.image_size={args.image_size}"] if args.image_size else []
    cfg = load_config(None, overrides + list(args.overrides))
    seed_everything(cfg.train.seed)
    gaz = Gazetteer.load(args.gazetteer)
    train_csv = os.path.join(args.data, "train.csv")
    table, country = country_rows(train_csv, gaz)
    keep = np.flatnonzero(country >= 0)
    table, country = table.subset(keep), country[keep]
    cfg.train.epochs = math.ceil(args.steps / max(1, tables.steps_per_epoch(len(table), cfg.train.batch_size)))
    encoder = build_encoder(cfg, allow_download=False)
    model = CountryClassifier(encoder, int(gaz.level_offsets[1]))
    dataset = tables.ImageDataset(table, encoder.preprocessor, targets=country[:, None], train=cfg.train.augment,
                                  seed=cfg.train.seed)
    train_classifier(model, dataset, cfg, train_csv)
    for split in SPLITS:
        test_table, truth = country_rows(os.path.join(args.data, f"{split}.csv"), gaz)
        accuracy = country_accuracy(model, test_table, truth)
        print(f"ce {split.removeprefix('test_')} country acc {100 * accuracy:.1f}", flush=True)


if __name__ == "__main__":
    main()
