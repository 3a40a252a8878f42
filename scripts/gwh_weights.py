"""How much GWH-InfoNCE's hard-negative weights change the training signal of a trained model (the question
"why does GWH tie plain hyperbolic InfoNCE here?").

    python scripts/gwh_weights.py --model runs/bench/seed-0/hierloc --csv runs/demo-data/train.csv \
        [--rows 2048] [--lams 1,10] [--sigmas 300,1000,3000]

Embeds --rows random training images with the model, computes every level's squared distances to all entities and
the great-circle km from each image to each entity (as `hierloc train` does), and for each (lambda, sigma) prints
per level:
- near:   mean number of same-level negatives within sigma km of the image (weight >= 1 + lambda / e);
- mass:   share of the model's negative softmax mass (lambda = 0 probabilities, the trained temperature) that sits
          on those near negatives - the weights can only matter where the model puts mass;
- dloss:  mean loss with the weights minus the loss without (nats);
- dgrad:  ||G_w - G_0|| / ||G_0|| for G = dL/dlogits (softmax - onehot): how much the weights turn the gradient.
dgrad near 0 means the GWH loss trains the model exactly as plain InfoNCE does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from gazetteer.schema import LEVELS, N_LEVELS
from hierloc.data import tables as data
from hierloc.geometry.geodesy import great_circle_km, latlon_to_unit
from hierloc.inference.evaluate import embed_table
from hierloc.inference.predictor import HierLoc
from hierloc.training.losses import GWHInfoNCE, kernel_values
from hierloc.training.run import entity_labels


def paper_weights(g: torch.Tensor, lam: float, sigma_km: float) -> torch.Tensor:
    """The paper's weights w = 1 + lambda K(g / sigma) with the laplace kernel (the library's `kernel_values`) at
    any lambda and sigma, also outside the ranges a training run may use (g (B, N) km -> (B, N))."""
    return 1.0 + lam * kernel_values(g.float() / sigma_km, "laplace")


def level_effect(d: torch.Tensor, g: torch.Tensor, target: torch.Tensor, tau: float, lam: float,
                 sigma_km: float) -> tuple[float, float, float, float]:
    """(near, mass, dloss, dgrad) of one level (module docstring) for squared distances d (B, N), great-circle km
    g (B, N) and the within-level targets (B,), at the trained temperature tau and the weights at lambda, sigma (`paper_weights`)."""
    rows = torch.arange(d.shape[0])
    logits0 = -d / tau
    log_w = torch.log(paper_weights(g, lam, sigma_km))
    log_w[rows, target] = 0.0                  # the positive is not a negative
    p0, pw = torch.softmax(logits0, 1), torch.softmax(logits0 + log_w, 1)
    onehot = torch.zeros_like(p0)
    onehot[rows, target] = 1.0
    near = (g < sigma_km)
    near[rows, target] = False
    neg0 = p0.clone()
    neg0[rows, target] = 0.0
    mass = float((neg0 * near).sum() / neg0.sum().clamp_min(1e-30))
    loss0 = -torch.log_softmax(logits0, 1)[rows, target].mean()
    lossw = -torch.log_softmax(logits0 + log_w, 1)[rows, target].mean()
    dgrad = float((pw - p0).norm() / (p0 - onehot).norm())
    return float(near.sum(1).float().mean()), mass, float(lossw - loss0), dgrad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (hierloc train)")
    ap.add_argument("--csv", required=True, help="training CSV (image, lat, lon)")
    ap.add_argument("--image-root", default=None, help="directory the image paths are relative to (default: the CSV's)")
    ap.add_argument("--rows", type=int, default=2048, help="random training images to use")
    ap.add_argument("--lams", default="1,10", help="comma-separated lambda values")
    ap.add_argument("--sigmas", default="300,1000,3000", help="comma-separated sigma values (km)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    hl = HierLoc.from_pretrained(args.model, device="cpu")
    root = args.image_root or str(Path(args.csv).parent)
    table = data.read_image_table(args.csv, image_root=root, on_bad="skip")
    rng = np.random.default_rng(args.seed)
    table = table.subset(np.sort(rng.choice(len(table), size=min(args.rows, len(table)), replace=False)))
    targets, reached = entity_labels(hl.gazetteer, table)
    table, targets = table.subset(np.flatnonzero(reached)), targets[reached]
    with torch.no_grad():
        points, ok, _ = embed_table(hl, table, batch_size=256)
        points, targets = points[torch.from_numpy(ok)], torch.as_tensor(targets[ok])
        lat = torch.as_tensor(table.lat_deg[ok], dtype=torch.float32)
        lon = torch.as_tensor(table.lon_deg[ok], dtype=torch.float32)
        model = hl.model
        sqdists = model.level_sqdists(points, model.entity_points())
        loss_fn = GWHInfoNCE(hl.cfg.loss)
        loss_fn.load_state_dict(hl.loss_state)
        tau = float(loss_fn.temperature())
        image_units = latlon_to_unit(lat, lon).float()
        print(f"model {args.model}: {points.shape[0]} training images, trained tau {tau:.4g}, trained lambda "
              f"{float(loss_fn.lam()):.3g}, sigma {float(loss_fn.sigma_km()):.0f} km")
        print(f"{'lambda':>6} {'sigma km':>8} {'level':>9} {'entities':>8} {'near':>8} {'mass':>6} {'dloss':>7} "
              f"{'dgrad':>6}")
        for lam in (float(v) for v in args.lams.split(",")):
            for sigma in (float(v) for v in args.sigmas.split(",")):
                for level in range(N_LEVELS):
                    sl = model.level_slice(level)
                    keep = targets[:, level] >= 0
                    d, target = sqdists[level][keep], (targets[:, level] - sl.start)[keep]
                    units = latlon_to_unit(model.entity_lat_deg[sl], model.entity_lon_deg[sl]).float()
                    g = great_circle_km(image_units[keep], units)  # (b, N_l)
                    near, mass, dloss, dgrad = level_effect(d, g, target, tau, lam, sigma)
                    print(f"{lam:>6g} {sigma:>8g} {LEVELS[level]:>9} {d.shape[1]:>8} {near:>8.1f} {mass:>6.3f} "
                          f"{dloss:>7.3f} {dgrad:>6.3f}")


if __name__ == "__main__":
    main()
