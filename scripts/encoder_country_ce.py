"""Encoder check: how well does a from-scratch encoder learn countries on the demo world with plain cross-entropy?

    DATA=runs/demo-data GAZ=runs/demo-gazetteer IMG=32 PATCH=8 python scripts/encoder_country_ce.py ce 936
    DATA=runs/demo-data GAZ=runs/demo-gazetteer CNN=1 IMG=32 python scripts/encoder_country_ce.py ce 624

A diagnostic, not part of the method: it trains the tiny ViT (IMG/PATCH/HID/LAYERS env vars) or, with CNN=1, the
tiny ResNet, with a linear head (``ce``) or a Poincare-ball head (``hyp``, logits -d^2/tau) over the gazetteer's
countries, for N steps of 128 random training patches (in memory, no augmentation unless ``aug``: rot90 + flip),
AdamW lr 1e-3 (encoder) / 2e-3 (head), warm-up + cosine, and prints country accuracy on test_nearby and
test_unseen. Used to tell the encoder's limits from the loss's (README, "Demo accuracy").
"""
import sys, time, csv, math
from pathlib import Path
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from PIL import Image

torch.manual_seed(0)
torch.set_num_threads(2)
import os
D = Path(os.environ.get("DATA", "runs/demo-data"))


def load_split(name):
    cache = D / f".{name}.pixels.npz"  # decoded once, reused
    if cache.exists():
        z = np.load(cache)
        return z["x"], z["lat"], z["lon"]
    rows = list(csv.DictReader(open(D / f"{name}.csv")))
    x = np.stack([np.asarray(Image.open(D / r["image"]).convert("RGB")) for r in rows])
    lat = np.array([float(r["lat"]) for r in rows]); lon = np.array([float(r["lon"]) for r in rows])
    np.savez(cache, x=x, lat=lat, lon=lon)
    return x, lat, lon


from gazetteer.core import Gazetteer
gaz = Gazetteer.load(os.environ.get("GAZ", "runs/demo-gazetteer"))
xtr, la, lo = load_split("train")
paths = gaz.locate(la, lo)
ytr = paths[:, 0] - gaz.level_offsets[0]
xte, tla, tlo = load_split("test_nearby")
yte = gaz.locate(tla, tlo)[:, 0]
xun, ula, ulo = load_split("test_unseen")
yun = gaz.locate(ula, ulo)[:, 0]
nc = int(gaz.level_offsets[1])
mode = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 312
aug = "aug" in sys.argv

from hierloc.model.encoders import build_image_encoder
import os
IMG = int(os.environ.get("IMG", 64)); PATCH = int(os.environ.get("PATCH", 8)); HID = int(os.environ.get("HID", 96)); LAYERS = int(os.environ.get("LAYERS", 4))
from hierloc.model.encoders import tiny_vit_config
from transformers import ViTModel
class Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.vit = ViTModel(tiny_vit_config(image_size=IMG, patch_size=PATCH, hidden_size=HID, num_layers=LAYERS, mlp_dim=4*HID), add_pooling_layer=False)
    def forward(self, x):
        if x.shape[-1] != IMG:
            x = F.interpolate(x, size=(IMG, IMG), mode="area")
        return self.vit(pixel_values=x).last_hidden_state[:, 0]
if os.environ.get("CNN"):
    from transformers import ResNetConfig, ResNetModel
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = ResNetModel(ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 192], depths=[1, 1, 1, 1], layer_type="basic"))
        def forward(self, x):
            if x.shape[-1] != IMG:
                x = F.interpolate(x, size=(IMG, IMG), mode="area")
            return self.net(pixel_values=x).pooler_output.flatten(1)
    HID = 192
enc = Enc()
fdim = HID
mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1); std = mean

def prep(x):
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    return (t - mean) / std

import geoopt
ball = geoopt.PoincareBall(c=1.0)
if mode == "ce":
    head = nn.Linear(fdim, nc)
    params = list(head.parameters())
    def logits_fn(f):
        return head(f)
    extra = []
else:
    mlp = nn.Sequential(nn.Linear(fdim, 512), nn.GELU(), nn.Linear(512, 64))
    log_scale = nn.Parameter(torch.tensor(math.log(64 ** -0.5)))
    anchors = geoopt.ManifoldParameter(ball.expmap0(torch.randn(nc, 64) * 0.01), manifold=ball)
    log_tau = nn.Parameter(torch.tensor(math.log(0.1)))
    params = list(mlp.parameters()) + [log_scale, log_tau]
    def logits_fn(f):
        v = mlp(f) * log_scale.clamp(max=math.log(10)).exp()
        n = v.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        v = v * (5.0 / n).clamp(max=1.0)
        x = ball.expmap0(v)
        d = ball.dist(x[:, None, :], anchors[None, :, :])
        return -d.square() / log_tau.clamp(math.log(0.01), math.log(10)).exp()
    extra = [anchors]
opt = torch.optim.AdamW([{"params": list(enc.parameters()), "lr": 1e-3}, {"params": params, "lr": 2e-3}],
                        weight_decay=0.05)
ropt = geoopt.optim.RiemannianAdam(extra, lr=1e-2) if extra else None
bs = 128
rng = np.random.default_rng(0)
t0 = time.time()
for step in range(steps):
    w = min(1.0, (step + 1) / (0.05 * steps)) * 0.5 * (1 + math.cos(math.pi * step / steps))
    opt.param_groups[0]["lr"] = 1e-3 * w; opt.param_groups[1]["lr"] = 2e-3 * w
    if ropt: ropt.param_groups[0]["lr"] = 1e-2 * w
    idx = rng.integers(0, len(xtr), bs)
    xb = prep(xtr[idx])
    if aug:
        k = int(rng.integers(0, 4))
        xb = torch.rot90(xb, k, dims=(2, 3))
        if rng.random() < 0.5:
            xb = xb.flip(3)
    f = enc(xb)
    loss = F.cross_entropy(logits_fn(f), torch.from_numpy(ytr[idx]).long())
    opt.zero_grad(); ropt and ropt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(enc.parameters()) + params + extra, 1.0)
    opt.step(); ropt and ropt.step()
    if step % 50 == 0:
        print(step, round(loss.item(), 3), round(time.time() - t0), flush=True)
enc.eval()
with torch.no_grad():
    for name, x, y in [("nearby", xte, yte), ("unseen", xun, yun)]:
        pred = torch.cat([logits_fn(enc(prep(x[i:i + 256]))).argmax(1) for i in range(0, len(x), 256)]).numpy()
        ok = y >= 0
        print(mode, name, "country acc", round(float((pred[ok] == y[ok]).mean()) * 100, 1))
        if name == "unseen":
            import collections
            codes = gaz.keys if hasattr(gaz, "keys") else None
            print("truth", collections.Counter(y[ok].tolist()).most_common(8))
            print("pred ", collections.Counter(pred[ok].tolist()).most_common(8))
            print("train", collections.Counter(ytr.tolist()).most_common(8))
            pass
