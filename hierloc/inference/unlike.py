"""Unlike images for calibration: copies of calibration images degraded so that the model cannot know them.

A calibration set of held-out places and held-out images of familiar places tells how often the model is right
near and far from its training data, but nothing about images unlike any of them (another camera, other colours,
a screenshot): there, every signal of familiarity is outside what the calibration saw, and a fitted calibrator
extrapolates blindly. `hierloc calibrate` therefore adds degraded copies of a share of its calibration images,
with their true labels, so that the calibrator learns what an unlike image's answers are worth.

Each copy gets one degradation, drawn per image from a seeded generator (`degrade`):

* jigsaw: the image cut in 4 x 4 tiles, shuffled;
* posterised: saturation x3, then 4 grey levels per channel;
* gamma: x^g with g in [0.25, 0.45] or [2.2, 3.5] (crushed shadows or washed-out highlights);
* grey + noise: the image in grey levels with Gaussian noise of standard deviation 0.08-0.25.

These are deliberately not the renderings of the demo's `test_shifted` split (channels permuted, contrast scaled,
blurred), so that the shift measured there is one the calibration never saw.
"""

from __future__ import annotations

import numpy as np
import torch

DEGRADATIONS = ("jigsaw", "posterised", "gamma", "grey_noise")
JIGSAW_TILES = 4   # tiles per side


def degrade(pixels: torch.Tensor, mean, std, seeds: np.ndarray) -> torch.Tensor:
    """(b, 3, S, S) normalised pixels (x - mean) / std, one seed per image (b,) -> the degraded copies, same
    normalisation. Deterministic per (image, seed)."""
    mean_t = torch.as_tensor(mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=pixels.dtype).view(1, 3, 1, 1)
    images = (pixels * std_t + mean_t).clamp(0.0, 1.0)
    out = torch.empty_like(images)
    for row, seed in enumerate(np.asarray(seeds, dtype=np.int64).tolist()):
        out[row] = _one(images[row], np.random.default_rng([int(seed), 0xD1CE]))
    return (out.clamp(0.0, 1.0) - mean_t) / std_t


def _one(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(3, S, S) in [0, 1] -> one random degradation of it."""
    kind = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
    if kind == "jigsaw":
        channels, height, width = image.shape
        g, th, tw = JIGSAW_TILES, image.shape[1] // JIGSAW_TILES, image.shape[2] // JIGSAW_TILES
        out = image.clone()
        tiles = [image[:, r * th:(r + 1) * th, c * tw:(c + 1) * tw] for r in range(g) for c in range(g)]
        for slot, source in enumerate(rng.permutation(g * g).tolist()):
            r, c = divmod(slot, g)
            out[:, r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tiles[source]
        return out
    if kind == "posterised":
        grey = image.mean(dim=0, keepdim=True)
        return torch.round((grey + 3.0 * (image - grey)).clamp(0.0, 1.0) * 3.0) / 3.0
    if kind == "gamma":
        gamma = float(rng.uniform(0.25, 0.45) if rng.random() < 0.5 else rng.uniform(2.2, 3.5))
        return image.clamp_min(0.0) ** gamma
    grey = image.mean(dim=0, keepdim=True).expand_as(image)
    noise = torch.from_numpy(rng.standard_normal(image.shape)).to(image.dtype)
    return grey + float(rng.uniform(0.08, 0.25)) * noise
