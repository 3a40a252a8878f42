"""Where one HierLoc training step spends its time: torch.profiler top entries on synthetic pixels.

    python scripts/profile_train_step.py --gazetteer runs/demo-gazetteer [--image-size 64] [--batch 128]
        [--steps 5] [--top 15] [section.key=value ...]

Builds the model exactly as `hierloc train` does (tiny ViT from scratch, entity table of the given gazetteer,
GWH-InfoNCE) and runs ``--steps`` forward+backward+optimiser steps on random pixels and random targets drawn
from the gazetteer's cities (their paths give the four levels), after one warm-up step. Prints the wall time per
step split into encoder / entity side, and the profiler's top entries by self CPU time. Random pixels: the
timing does not depend on what the images show.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gazetteer", required=True, help="gazetteer directory (hierloc build-gazetteer)")
    ap.add_argument("--image-size", type=int, default=None, help="model.image_size (default: the config's)")
    ap.add_argument("--batch", type=int, default=128, help="images per step")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after one warm-up step)")
    ap.add_argument("--top", type=int, default=15, help="profiler rows to print")
    ap.add_argument("overrides", nargs="*", help="config overrides (section.key=value)")
    args = ap.parse_args()

    from gazetteer.core import Gazetteer
    from hierloc.config import load_config
    from hierloc.losses import GWHInfoNCE
    from hierloc.model import EntityTable, HierLocModel
    from hierloc.train import N_LEVELS, TrainModule, build_encoder, build_optimizers, seed_everything

    overrides = list(args.overrides) + ([f"model.image_size={args.image_size}"] if args.image_size else [])
    cfg = load_config(None, overrides)
    seed_everything(0)
    gaz = Gazetteer.load(args.gazetteer)
    encoder = build_encoder(cfg, allow_download=False)
    model = HierLocModel(cfg.model, EntityTable.from_gazetteer(gaz), encoder.feature_dim, encoder=encoder)
    loss_fn = GWHInfoNCE(n_levels=N_LEVELS, tau=cfg.loss.tau, lam=cfg.loss.lam, sigma_km=cfg.loss.sigma_km,
                         betas=tuple(cfg.loss.betas), learn_tau=cfg.loss.learn_tau,
                         learn_weights=cfg.loss.learn_weights, kernel=cfg.loss.kernel)
    module = TrainModule(model, loss_fn)
    optimizers = build_optimizers(module, cfg)
    size, batch = cfg.model.image_size, args.batch
    lo, hi = int(gaz.level_offsets[3]), int(gaz.level_offsets[4])
    gen = torch.Generator().manual_seed(0)

    def one_step() -> None:
        city = torch.randint(lo, hi, (batch,), generator=gen).numpy()
        targets = torch.as_tensor(gaz.paths[city], dtype=torch.int64)
        pixels = torch.randn(batch, 3, size, size, generator=gen)
        lat = torch.as_tensor(gaz.lat_deg[city], dtype=torch.float32)
        lon = torch.as_tensor(gaz.lon_deg[city], dtype=torch.float32)
        result = module(pixels, lat, lon, targets, inputs_are_features=False)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        result["loss"].backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.train.grad_clip)
        for opt in optimizers.values():
            opt.step()

    one_step()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            one_step()
    per_step = (time.perf_counter() - t0) / args.steps
    # encoder alone (forward + backward), same batch, for the split
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    t1 = time.perf_counter()
    for _ in range(args.steps):
        model.encode_images(pixels).float().sum().backward()
    encoder_per_step = (time.perf_counter() - t1) / args.steps
    print(f"config: image_size {size}, batch {batch}, embed_dim {cfg.model.embed_dim}, entities "
          f"{[int(gaz.level_offsets[i + 1] - gaz.level_offsets[i]) for i in range(N_LEVELS)]}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}")
    print(f"step {per_step * 1000:.0f} ms ({batch / per_step:.0f} images/s, profiler on); encoder fwd+bwd alone "
          f"{encoder_per_step * 1000:.0f} ms = {encoder_per_step / per_step:.2f} of the step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
