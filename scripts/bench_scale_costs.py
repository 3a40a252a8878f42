"""Per-image costs that decide the time of a run at OSV5M / MP16 scale (docs/training-at-scale.md).

    .venv/bin/python scripts/bench_scale_costs.py [--images 256] [--threads 1]

Measures on this machine, side by side in one run:
- decode + preprocess (hierloc's loader and the DINOv2 preprocessor: shorter side 256, centre crop 224) of
  OSV5M-like JPEG photos (682 x 512, quality 90, written by the script), read from loose files and from a zip
  shard in place (`images/<split>/NN.zip`, what OSV5M ships), repeats interleaved; for reference, zipfile + a
  full-size PIL decode (hierloc's loader decodes JPEGs at a reduced scale when the input is much smaller);
- the frozen DINOv2-small forward pass (the architecture of facebook/dinov2-small: 12 layers, width 384, 6 heads,
  patch 14; random weights, so no download: the time does not depend on the weights) at 224 px, batch --batch,
  float32 on the CPU;
and prints ms per image, the backbone's analytic GFLOP per image and the rate the CPU achieved, so the numbers
can be carried to other hardware (docs/training-at-scale.md does the arithmetic).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import best_and_median, time_runs
from hierloc.data.images import Preprocessor

WIDTH, HEIGHT = 682, 512  # the size of OSV5M photos (shorter side 512)


def dinov2_small_config():
    """The architecture of facebook/dinov2-small (a transformers Dinov2Config)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                        image_size=224)


def backbone_gflop(config, image_size: int = 224) -> float:
    """Multiply-adds x 2 of one ViT forward: patch embedding, per layer QKV/proj/MLP matmuls and attention."""
    tokens = (image_size // config.patch_size) ** 2 + 1
    d, layers = config.hidden_size, config.num_hidden_layers
    mlp = int(d * config.mlp_ratio)
    embed = (image_size // config.patch_size) ** 2 * (3 * config.patch_size ** 2) * d
    per_layer = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d
    return 2 * (embed + layers * per_layer) / 1e9


def write_photos(directory: Path, n: int, seed: int = 0) -> list[Path]:
    """n smooth, photo-like JPEGs (a low-resolution random field upsampled, plus fine noise)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.uniform(0, 255, size=(12, 16, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(HEIGHT, WIDTH, 3))
        path = directory / f"{i:08d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def time_decode(preprocessor: Preprocessor, paths: list[str], repeats: int) -> list[float]:
    """Seconds per image of load + preprocess, one value per repeat."""
    def run() -> None:
        for path in paths:
            preprocessor([preprocessor.load(path)])

    return [seconds / len(paths) for seconds in time_runs(run, repeats, warmup=0)]


def time_zipfile_raw(zip_path: Path, names: list[str], preprocessor: Preprocessor, repeats: int) -> list[float]:
    """Seconds per image reading the member with zipfile into memory and decoding it (no hierloc loader)."""
    with zipfile.ZipFile(zip_path) as archive:
        def run() -> None:
            for name in names:
                preprocessor([Image.open(io.BytesIO(archive.read(name))).convert("RGB")])

        return [seconds / len(names) for seconds in time_runs(run, repeats, warmup=0)]


@torch.no_grad()
def time_backbone(batch: int, repeats: int) -> list[float]:
    """Seconds per image of the DINOv2-small forward (random weights) on a random batch, one value per repeat,
    after a warm-up."""
    from transformers import Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(dinov2_small_config()).eval()
    pixels = torch.randn(batch, 3, 224, 224)
    return [seconds / batch for seconds in time_runs(lambda: model(pixel_values=pixels), repeats)]


def main() -> None:
    """Write the photos and the shard, time every cost interleaved, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="photos written and decoded per repeat")
    ap.add_argument("--batch", type=int, default=16, help="batch of the backbone forward")
    ap.add_argument("--repeats", type=int, default=3, help="repeats (min and median printed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = dinov2_small_config()
    preprocessor = Preprocessor.from_backbone_dir_or_config(None, config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "loose").mkdir()
        paths = write_photos(root / "loose", args.images)
        shard = root / "images" / "train" / "00.zip"
        shard.parent.mkdir(parents=True)
        with zipfile.ZipFile(shard, "w", zipfile.ZIP_STORED) as archive:
            for path in paths:
                archive.write(path, path.name)
        mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        in_zip = [str(shard / p.name) for p in paths]
        methods = {
            "decode + preprocess, loose JPEG files": lambda: time_decode(preprocessor, [str(p) for p in paths], 1),
            "decode + preprocess, zip shard in place (hierloc)": lambda: time_decode(preprocessor, in_zip, 1),
            "decode + preprocess, zipfile.read + PIL full decode (reference)":
                lambda: time_zipfile_raw(shard, [p.name for p in paths], preprocessor, 1),
        }
        timings: dict[str, list[float]] = {label: [] for label in methods}
        for _ in range(args.repeats):  # interleaved, so that a change of load hits every method alike
            for label, method in methods.items():
                timings[label] += method()
        rows += list(timings.items())
    rows.append((f"DINOv2-small forward, 224 px, batch {args.batch}, float32", time_backbone(args.batch,
                                                                                          args.repeats)))
    gflop = backbone_gflop(config)
    print(f"torch {torch.__version__}, {args.threads} thread(s); {args.images} photos of {WIDTH}x{HEIGHT} px "
          f"(mean {mean_kb:.0f} KiB); {args.repeats} repeats")
    print("| cost per image | ms (min) | ms (median) | images/s per core (min) |")
    print("|---|---|---|---|")
    for label, values in rows:
        best, median = best_and_median(values)
        print(f"| {label} | {1e3 * best:.2f} | {1e3 * median:.2f} | {1 / best:.0f} |")
    backbone = min(rows[-1][1])
    print(f"DINOv2-small: {gflop:.2f} GFLOP per image (analytic); this CPU ran it at {gflop / backbone:.1f} GFLOP/s "
          f"with {args.threads} thread(s)")


if __name__ == "__main__":
    main()
