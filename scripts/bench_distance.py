"""Benchmark and accuracy check of the pairwise Poincare distances (hierloc.geometry.hyperbolic).

Prints one table: time of the forward pass and of forward+backward for
  - a plain ``x @ y.T`` of the same shapes (the floor),
  - ``pairwise_sqdist`` and ``pairwise_dist`` (one matrix product + exact recomputation of ill-conditioned pairs),
  - the naive closed form arcosh(1 + 2c|x-y|^2 / ((1-c|x|^2)(1-c|y|^2)))^2 / c with |x-y|^2 from a matmul,
  - geoopt's ``PoincareBall.dist`` broadcast over a (B, N, D) tensor (run on a smaller N and scaled to N),
  - ``euclidean_pairwise_sqdist`` (the Euclidean ablation),
with the ratio to the floor, and the maximum relative error of d^2 against a float64 reference on two point
sets: random points, and near-boundary points (||x|| = 1 - 4e-3, the float32 margin) whose entity set contains
exact duplicates and near-coincident copies of the images.

The float64 reference is the cancellation-free form d = 2 arsinh(sqrt(c)||x-y|| / sqrt((1-c|x|^2)(1-c|y|^2)))
evaluated on broadcast differences; geoopt's float64 ``dist`` is printed against it too (it is not exact near the
boundary: its Mobius addition cancels for close pairs).

Timings are the minimum and median over interleaved repetitions: the machine is shared, so the minimum is the
best estimate of the uncontended cost and the median shows the noise.

Usage: python scripts/bench_distance.py [--batch 256] [--entities 20000] [--dim 64] [--repeats 15]
       [--threads N] [--clock wall|thread]   (thread: single-threaded CPU time, robust on a shared machine)
       [--no-reuse-memory]

Memory: like `hierloc train` on CPU (train.reuse_cpu_memory), the run first makes glibc keep freed memory, so a
(B, N) result does not pay its page faults again at every call (for the floor as for the methods);
--no-reuse-memory measures with glibc's default instead.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import geoopt
import torch

from _common import Stopwatch
from hierloc.geometry import hyperbolic


def naive_sqdist(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """The textbook matrix form, in the input dtype: (B, D), (N, D) -> (B, N)."""
    nx, ny = x.square().sum(1, keepdim=True), y.square().sum(1, keepdim=True)
    sq = (nx + ny.T - 2.0 * x @ y.T).clamp_min(0.0)
    arg = 1.0 + 2.0 * c * sq / ((1.0 - c * nx) * (1.0 - c * ny.T))
    return torch.acosh(arg.clamp_min(1.0 + 1e-7)).square() / c


def geoopt_sqdist(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """geoopt's Mobius-addition distance broadcast over (B, N, D)."""
    ball = geoopt.PoincareBall(c=c).to(x.dtype)
    return ball.dist(x[:, None, :], y[None, :, :]).square()


def reference_dist64(x: torch.Tensor, y: torch.Tensor, c: float, rows: int = 8) -> torch.Tensor:
    """float64 d via 2 arsinh(sqrt(z)) on broadcast differences, in row chunks: (B, N)."""
    x, y = x.double(), y.double()
    ny = y.square().sum(1)
    out = []
    for start in range(0, x.shape[0], rows):
        xb = x[start : start + rows]
        diff_sq = (xb[:, None, :] - y[None, :, :]).square().sum(-1)
        denom = (1.0 - c * xb.square().sum(1))[:, None] * (1.0 - c * ny)[None, :]
        out.append(2.0 / math.sqrt(c) * torch.asinh((c * diff_sq / denom).sqrt()))
    return torch.cat(out)


def geoopt_dist64(x: torch.Tensor, y: torch.Tensor, c: float, rows: int = 8) -> torch.Tensor:
    """geoopt's float64 d, in row chunks: (B, N)."""
    ball = geoopt.PoincareBall(c=c).double()
    x, y = x.double(), y.double()
    return torch.cat([ball.dist(x[s : s + rows, None, :], y[None]) for s in range(0, x.shape[0], rows)])


def max_rel_error(value: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |v - r| / r over pairs with r > 0, max |v| over coincident pairs r == 0 (should be exactly 0))."""
    value, reference = value.double(), reference.double()
    positive = reference > 0
    rel = ((value - reference).abs() / reference.where(positive, torch.ones_like(reference)))[positive]
    at_zero = value[~positive].abs().max().item() if (~positive).any() else 0.0
    return rel.max().item(), at_zero


def make_points(kind: str, batch: int, entities: int, dim: int, c: float, seed: int = 0):
    """(images (B, D), entities (N, D)) on the ball: "random", or "near-boundary" (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = hyperbolic.expmap0(0.15 * torch.randn(batch, dim, generator=gen), c=c)
        y = hyperbolic.expmap0(0.15 * torch.randn(entities, dim, generator=gen), c=c)
        return x, y
    # near-boundary: every point at the float32 margin; per image 1 duplicate and 8 near-coincident entities
    x = hyperbolic.project(100.0 * torch.randn(batch, dim, generator=gen), c=c)
    y = hyperbolic.project(100.0 * torch.randn(entities, dim, generator=gen), c=c)
    n_near = min(8, (entities - batch) // batch)
    y[:batch] = x
    scales = torch.logspace(-6, -2, n_near)
    for k in range(n_near):
        start = batch * (k + 1)
        y[start : start + batch] = hyperbolic.project(x + scales[k] * torch.randn(batch, dim, generator=gen), c=c)
    return x, y


CLOCK = time.perf_counter


def timed(fn, backward: bool, x, y):
    """Seconds for fn(x, y) (+ backward with a gradient of ones), on CLOCK."""
    if backward:
        xg, yg = x.detach().requires_grad_(), y.detach().requires_grad_()
        with Stopwatch(CLOCK) as watch:
            out = fn(xg, yg)
            out.backward(torch.ones_like(out))
        return watch.seconds
    with torch.no_grad(), Stopwatch(CLOCK) as watch:
        fn(x, y)
    return watch.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--entities", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--geoopt-entities", type=int, default=1000, help="N for geoopt's broadcast dist (scaled)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--curvature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="wall: elapsed time; thread: CPU time of this thread, with 1 torch thread (robust to "
                             "other processes sharing the machine)")
    parser.add_argument("--no-reuse-memory", action="store_true",
                        help="keep glibc's default (mmap and unmap every large block) instead of train's setting")
    args = parser.parse_args()
    reuse = False
    if not args.no_reuse_memory:
        from hierloc.device import reuse_freed_cpu_memory

        reuse = reuse_freed_cpu_memory()
    global CLOCK
    if args.clock == "thread":
        CLOCK = time.thread_time
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    c, n_small = args.curvature, args.geoopt_entities

    methods = {
        "x @ y.T (floor)": (lambda x, y: x @ y.T, 1.0),
        "pairwise_sqdist": (lambda x, y: hyperbolic.pairwise_sqdist(x, y, c=c), 1.0),
        "pairwise_dist": (lambda x, y: hyperbolic.pairwise_dist(x, y, c=c), 1.0),
        "euclidean_pairwise_sqdist": (hyperbolic.euclidean_pairwise_sqdist, 1.0),
        "naive closed form": (lambda x, y: naive_sqdist(x, y, c), 1.0),
        f"geoopt broadcast (N={n_small}, scaled)": (
            lambda x, y: geoopt_sqdist(x, y[:n_small], c),
            args.entities / n_small,
        ),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; B={args.batch}, "
          f"N={args.entities}, D={args.dim}, c={c}, float32; {args.repeats} interleaved repeats; freed memory "
          f"{'kept' if reuse else 'returned (glibc default)'}; "
          f"load average {os.getloadavg()[0]:.1f}")

    errors = {}
    for kind in ("random", "near-boundary"):
        x, y = make_points(kind, args.batch, args.entities, args.dim, c)
        acc_rows = min(args.batch, 64)
        xa = x[:acc_rows]
        ref = reference_dist64(xa, y, c)
        with torch.no_grad():
            outputs = {
                "pairwise_sqdist": (hyperbolic.pairwise_sqdist(xa, y, c=c), ref.square()),
                "pairwise_dist": (hyperbolic.pairwise_dist(xa, y, c=c), ref),
                "naive closed form": (naive_sqdist(xa, y, c), ref.square()),
                f"geoopt broadcast (N={n_small}, scaled)": (
                    geoopt_sqdist(xa, y[:n_small], c),
                    ref[:, :n_small].square(),
                ),
                "euclidean_pairwise_sqdist": (
                    hyperbolic.euclidean_pairwise_sqdist(xa, y),
                    torch.cat([(xa.double()[s : s + 8, None] - y.double()[None]).square().sum(-1)
                               for s in range(0, acc_rows, 8)]),
                ),
            }
        for name, (value, reference) in outputs.items():
            errors[(name, kind)] = max_rel_error(value, reference)
        errors[("geoopt float64 (vs reference)", kind)] = max_rel_error(
            geoopt_dist64(xa[:16], y, c), ref[:16]
        )

    fast = ["x @ y.T (floor)", "pairwise_sqdist", "pairwise_dist", "euclidean_pairwise_sqdist"]
    slow = [name for name in methods if name not in fast]
    x, y = make_points("random", args.batch, args.entities, args.dim, c)
    xb, yb = make_points("near-boundary", args.batch, args.entities, args.dim, c)
    boundary = "pairwise_sqdist, near-boundary set"
    times = {(name, bw): [] for name in [*methods, boundary] for bw in (False, True)}
    # the cheap methods interleaved with many repeats; the slow ones (GB-sized temporaries) apart, fewer times
    for _ in range(args.repeats):
        for name in fast:
            for bw in (False, True):
                times[(name, bw)].append(timed(methods[name][0], bw, x, y) * methods[name][1])
        for bw in (False, True):
            times[(boundary, bw)].append(timed(methods["pairwise_sqdist"][0], bw, xb, yb))
    for _ in range(max(2, args.repeats // 5)):
        for name in slow:
            for bw in (False, True):
                times[(name, bw)].append(timed(methods[name][0], bw, x, y) * methods[name][1])

    floor_f, floor_fb = (min(times[("x @ y.T (floor)", bw)]) for bw in (False, True))
    header = (f"{'method':<38} {'fwd ms':>7} {'(med)':>7} {'speed':>6} {'fwd+bwd':>8} {'(med)':>7} {'speed':>6}"
              f" {'relerr random':>13} {'relerr boundary':>15} {'max d(x,x)':>10}")
    print(header)
    print("-" * len(header))

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for name in [*methods, boundary]:
        f, fb = times[(name, False)], times[(name, True)]
        err_random = errors.get((name, "random"), (None, None))[0]
        err_boundary, at_zero = errors.get((name, "near-boundary"), (None, None))
        print(f"{name:<38} {min(f) * 1e3:>7.2f} {statistics.median(f) * 1e3:>7.2f} {floor_f / min(f):>6.2f} "
              f"{min(fb) * 1e3:>8.2f} {statistics.median(fb) * 1e3:>7.2f} {floor_fb / min(fb):>6.2f} "
              f"{fmt(err_random, '.1e'):>13} {fmt(err_boundary, '.1e'):>15} {fmt(at_zero, '.1e'):>10}")
    name = "geoopt float64 (vs reference)"
    err_random = errors[(name, "random")][0]
    err_boundary, at_zero = errors[(name, "near-boundary")]
    print(f"{name:<38} {'':>7} {'':>7} {'':>6} {'':>8} {'':>7} {'':>6} {err_random:>13.1e} {err_boundary:>15.1e} "
          f"{at_zero:>10.1e}")
    print("ms: minimum over repeats (med: median); speed = floor time / method time (>= 0.5 is the target); "
          "relerr: max |v - ref| / ref of d^2 (of d for pairwise_dist) over pairs with ref > 0, first 64 images; "
          "max d(x,x): largest value returned for coincident pairs.")


if __name__ == "__main__":
    main()
