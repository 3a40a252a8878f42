"""What a GPU machine does with hierloc's scale path, in one table and under 5 minutes on one GPU.

    python scripts/gpu_check.py                          # everything this machine can run
    python scripts/gpu_check.py --gazetteer global       # training rows at world scale (~165k entities)
    python scripts/gpu_check.py --backbone DIR           # extraction with a local pretrained backbone (DINOv2 ...)

Rows:
- extract: the frozen encoder's forward over random pixels (images/s), in float32 and under the encoder's
  autocast (bf16, CUDA only), and `extract_features` end to end over JPEG files written for the check (decoding
  with --workers DataLoader workers, the forward, the float16 cache on disk);
- train: `train_step` of the frozen-backbone path (cached (B, F) features) at each --batches size with the
  reference loss and the blocked loss: steps/s, peak memory (CUDA: the allocator's peak; CPU: the process's peak
  RSS, which only grows), host syncs per step (counted with a dispatch mode: ops that wait for the device);
- nccl: a 2-process `torchrun ... hierloc train` smoke run (tiny model, a few steps) when 2 GPUs exist; ranks must
  end with identical parameters.

On a machine without CUDA it runs what the CPU can (float32 rows, the train rows at the --batches given, syncs
counted the same way) and prints "skipped (needs CUDA)" for the rest, so that CI keeps the script working. CPU
timings here say nothing about a GPU: the figures to read on CPU are the syncs per step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import Stopwatch, make_demo_world, peak_rss_mib, write_jpegs, write_tiny_vit_backbone

SKIPPED_CUDA = "skipped (needs CUDA)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet-lite0",
                    help="encoder of the extract rows: a packaged name or a local pretrained directory")
    ap.add_argument("--image-size", type=int, default=None, help="extraction image side (default 224 on CUDA, 64 "
                                                                  "on CPU)")
    ap.add_argument("--extract-batch", type=int, default=None, help="images per forward (default 256 CUDA, 16 CPU)")
    ap.add_argument("--extract-images", type=int, default=None,
                    help="JPEGs for the end-to-end extraction row (default 4096 CUDA, 64 CPU)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    ap.add_argument("--gazetteer", default="global",
                    help="entities of the train rows: 'global' (world gazetteer, built offline in ~1 min) or a "
                         "gazetteer directory")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes of the train rows (default "
                                                     "256,1024 on CUDA, 64 on CPU)")
    ap.add_argument("--feature-dim", type=int, default=768, help="F of the cached features (DINOv2-B/CLIP-B: 768)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per train row (default 20 CUDA, 2 CPU)")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out: extract,train,nccl")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    skip = {s for s in args.skip.split(",") if s}
    rows: list[dict] = []
    print(f"device {device}{' (' + torch.cuda.get_device_name(0) + ')' if cuda else ''}, torch {torch.__version__}, "
          f"{torch.cuda.device_count() if cuda else 0} GPU(s), {os.cpu_count()} CPU(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if "extract" not in skip:
            rows += extract_rows(args, device, work)
        if "train" not in skip:
            rows += train_rows(args, device)
        if "nccl" not in skip:
            rows += nccl_rows(device, work)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


# ----------------------------------------------------------------------------------------------------- extract
def extract_rows(args, device, work: Path) -> list[dict]:
    import torch

    from hierloc.config import load_config
    from hierloc.data import tables
    from hierloc.device import encoder_autocast
    from hierloc.training.features import extract_features
    from hierloc.training.run import build_encoder

    cuda = device.type == "cuda"
    size = args.image_size or (224 if cuda else 64)
    batch = args.extract_batch or (256 if cuda else 16)
    cfg = load_config(None, [f"model.backbone={args.backbone}", f"model.image_size={size}",
                             "model.freeze_backbone=true"])
    encoder = build_encoder(cfg, allow_download=False).to(device).eval()
    pixels = torch.randn(batch, 3, size, size, device=device)
    rows = []
    for autocast in (False, True):
        setting = f"{args.backbone} {size}px B={batch} {'autocast bf16' if autocast else 'float32'}"
        if autocast and not cuda:
            rows.append(_row("extract: forward", setting, SKIPPED_CUDA))
            continue

        def forward() -> None:
            with torch.no_grad(), encoder_autocast(device, autocast):
                encoder(pixels)

        seconds = _timed(forward, device, repeats=5 if cuda else 2)
        rows.append(_row("extract: forward", setting, f"{batch / seconds:.0f} images/s"))
    n_images = args.extract_images or (4096 if cuda else 64)
    write_jpegs(work / "jpegs", n_images, px=max(size, 64))
    paths = sorted(str(p) for p in (work / "jpegs").rglob("*.jpg"))
    table = tables.ImageTable.from_arrays(paths, np.zeros(len(paths)), np.zeros(len(paths)))
    dataset = tables.ImageDataset(table, encoder.preprocessor, train=False)
    for autocast in (False, True):
        setting = f"{n_images} JPEGs, {args.workers} workers, {'autocast bf16' if autocast else 'float32'}"
        if autocast and not cuda:
            rows.append(_row("extract: end to end", setting, SKIPPED_CUDA))
            continue
        with Stopwatch() as watch:
            extract_features(encoder, dataset, work / f"cache-{autocast}", batch_size=batch,
                             num_workers=args.workers, progress=False, amp=autocast)
        rows.append(_row("extract: end to end", setting, f"{n_images / watch.seconds:.0f} images/s"))
    return rows


# ------------------------------------------------------------------------------------------------------- train
def train_rows(args, device) -> list[dict]:
    cuda = device.type == "cuda"
    batches = [int(b) for b in (args.batches or ("256,1024" if cuda else "64")).split(",")]
    steps = args.steps or (20 if cuda else 2)
    gaz = _gazetteer(args.gazetteer)
    rows = []
    for batch in batches:
        for blocked in ("false", "true"):
            setting = f"B={batch}, {gaz.n_entities} entities, F={args.feature_dim}, loss.blocked={blocked}"
            try:
                steps_per_s, peak, syncs = _train_row(gaz, device, batch, blocked, args.feature_dim, steps)
            except RuntimeError as error:     # out of memory at this size: a finding, not a crash of the check
                rows.append(_row("train: frozen step", setting, f"failed: {str(error).splitlines()[0][:60]}"))
                continue
            rows.append(_row("train: frozen step", setting, f"{steps_per_s:.2f} steps/s",
                             f"peak {peak:.0f} MiB ({'CUDA allocator' if cuda else 'process RSS'}), "
                             f"{syncs} host syncs/step"))
    return rows


def _gazetteer(name: str):
    from gazetteer.core import Gazetteer

    return Gazetteer.build_global(progress=False) if name == "global" else Gazetteer.load(name)


def _train_row(gaz, device, batch: int, blocked: str, feature_dim: int, steps: int) -> tuple[float, float, int]:
    """One train row -> (steps/s, peak MiB, host syncs in one step)."""
    import torch

    from hierloc.config import load_config
    from hierloc.model.network import EntityTable, HierLocModel
    from hierloc.training.run import build_module
    from hierloc.training.step import base_learning_rates, build_optimizers, seed_everything, train_step
    from hierloc.training.syncs import count_host_syncs

    cfg = load_config(None, ["model.freeze_backbone=true", "model.backbone=tiny-vit", f"loss.blocked={blocked}",
                             f"train.batch_size={batch}"])
    seed_everything(0)
    table = EntityTable.from_gazetteer(gaz)
    generator = torch.Generator().manual_seed(1)
    model = HierLocModel(cfg.model, table, feature_dim, encoder=None,
                         entity_features=torch.randn(table.n_entities, feature_dim, generator=generator))
    model.entity_seen.fill_(True)
    module = build_module(cfg, model, device)
    optimizers = build_optimizers(module, cfg)
    base_lrs = base_learning_rates(optimizers)
    lo, hi = int(gaz.level_offsets[3]), int(gaz.level_offsets[4])
    city = torch.randint(lo, hi, (batch,), generator=generator).numpy()
    targets = torch.as_tensor(gaz.paths[city], dtype=torch.int64, device=device)
    inputs = torch.randn(batch, feature_dim, generator=generator).to(device)
    lat = torch.as_tensor(gaz.lat_deg[city], dtype=torch.float32, device=device)
    lon = torch.as_tensor(gaz.lon_deg[city], dtype=torch.float32, device=device)
    forward = functools.partial(module, inputs, lat, lon, targets, inputs_are_features=True)
    total = steps + 2

    def step(k: int) -> None:
        train_step(forward, optimizers, base_lrs, module.parameters(), cfg.train, k, total)

    step(0)                                   # warm-up (allocator, autotuning)
    with count_host_syncs() as syncs:
        step(1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _timed(lambda: step(2), device, repeats=steps, warmup=0)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib())
    return 1.0 / seconds, peak, syncs.count


# -------------------------------------------------------------------------------------------------------- nccl
def nccl_rows(device, work: Path) -> list[dict]:
    import torch

    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return [_row("nccl: 2-process training", "torchrun --nproc_per_node 2, 8 steps", "skipped (needs 2 GPUs)")]
    data = make_demo_world(work / "demo", n_train=256, patch_px=32)
    backbone = write_tiny_vit_backbone(work / "backbone", 32, patch_size=8, hidden_size=32, num_layers=2,
                                       num_heads=2, mlp_dim=64)
    out = work / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "hierloc", "-q", "train", "--csv", str(data / "train.csv"), "--out", str(out), "--no-progress",
               f"model.backbone={backbone}", "model.pretrained=false", "train.batch_size=16", "train.max_steps=8",
               "train.num_workers=2"]
    with Stopwatch() as watch:
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return [_row("nccl: 2-process training", "torchrun --nproc_per_node 2, 8 steps",
                     f"FAILED (exit {done.returncode}): {done.stderr.strip().splitlines()[-1][:80]}")]
    summary = json.loads((out / "train_summary.json").read_text())
    same = summary["rank_param_divergence"] == 0.0
    return [_row("nccl: 2-process training", "torchrun --nproc_per_node 2, 8 steps",
                 f"ok in {watch.seconds:.0f} s" if same else "ranks diverged",
                 f"rank_param_divergence {summary['rank_param_divergence']}")]


# ------------------------------------------------------------------------------------------------------ helpers
def _timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() (synchronised on CUDA)."""
    import torch

    def synced() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        synced()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        synced()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _row(check: str, setting: str, result: str, note: str = "") -> dict:
    row = {"check": check, "setting": setting, "result": result, "note": note}
    print(f"  {check}: {setting}: {result} {note}".rstrip(), file=sys.stderr, flush=True)   # progress
    return row


def print_table(rows: list[dict]) -> None:
    widths = {key: max(len(key), *(len(r[key]) for r in rows)) for key in ("check", "setting", "result", "note")}
    print()
    print("  ".join(key.ljust(widths[key]) for key in widths).rstrip())
    print("  ".join("-" * widths[key] for key in widths))
    for row in rows:
        print("  ".join(row[key].ljust(widths[key]) for key in widths).rstrip())


if __name__ == "__main__":
    main()
