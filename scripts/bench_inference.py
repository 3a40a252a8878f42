"""Inference benchmark: HierLoc's entity index vs image retrieval, end-to-end throughput, beam width vs accuracy.

    .venv/bin/python scripts/bench_inference.py --model runs/demo --csv runs/demo-data/test_nearby.csv

Parts (each prints a Markdown table; docs/inference.md holds the numbers measured on the reference machine):

1. Index search, image encoder excluded. The GLOBAL gazetteer (`Gazetteer.build_global()`, ~165k entities) with a
   randomly initialised `HierLocModel` (D = --dim) over it; entity points computed once and cached (as
   `HierLoc.entity_points` does). Queries = image points from random features through the model's image head.
   Timed: beam search (`HierLoc.search_points`, beam 10, top-5 paths: `hierloc.inference.search.beam_search`, distances
   for the candidates only), the dense reference beam search (`hierloc.inference.search.beam_search_dense` on full
   distance matrices from `HierLocModel.level_sqdists`: the implementation before the candidate-only one; its
   top-5 paths are compared with the fast one's), the flat scan over all cities (`flat=True`), and brute-force
   nearest-neighbour retrieval over a gallery of --gallery random image embeddings of the same dimension
   (squared Euclidean distance in matrix-product form |g|^2 - 2 q.g, in chunks of --chunk rows, keeping the
   running best), the paradigm HierLoc replaces. Timings are the best and the median of --repeats runs over
   --queries queries in batches of --batch (the machine may be shared: the best run is the uncontended
   estimate). Index memory: the tensors each method needs at query time.
2. End-to-end images/s (--model): `HierLoc.iter_predict` over --e2e-images images of --csv (decode + preprocess in
   DataLoader workers, encoder, search, answer objects), with the model's own encoder.
3. Accuracy (--model --csv): images embedded once, then searched with beam widths --beams and with the flat scan;
   OSV5M-protocol metrics (`hierloc.inference.evaluate.score_points`) and predicted-path accuracy for each.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from _common import Stopwatch, best_and_median, time_runs


def timed(fn, repeats: int) -> tuple[float, float]:
    """(best, median) wall seconds of `fn()` over `repeats` runs (after one warm-up run)."""
    return best_and_median(time_runs(fn, repeats))


def mib(n_bytes: int) -> str:
    """A byte count as MiB, for the tables."""
    return f"{n_bytes / 2**20:,.1f} MiB"


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- part 1: index
def build_global_hierloc(dim: int, seed: int):
    """A randomly initialised HierLoc (D = dim) over the global gazetteer, its entity points computed once ->
    (HierLoc, gazetteer build seconds, entity points seconds)."""
    from gazetteer import Gazetteer
    from hierloc.inference.predictor import HierLoc
    from hierloc.config import Config, ModelConfig
    from hierloc.training.losses import GWHInfoNCE
    from hierloc.model.network import EntityTable, HierLocModel

    with Stopwatch() as build:
        gaz = Gazetteer.build_global(progress=False)
    cfg = Config(model=ModelConfig(embed_dim=dim))
    torch.manual_seed(seed)
    model = HierLocModel(cfg.model, EntityTable.from_gazetteer(gaz), feature_dim=dim, seed=seed).eval()
    loss = GWHInfoNCE(cfg.loss).eval()
    hierloc = HierLoc(cfg, model, loss.state_dict(), encoder=None, gaz=gaz, device="cpu",
                      source="<random, global gazetteer>")
    with Stopwatch() as points:
        hierloc.entity_points()
    return hierloc, build.seconds, points.seconds


def retrieval_top1(queries: torch.Tensor, gallery: torch.Tensor, gallery_sqnorm: torch.Tensor,
                   chunk: int) -> torch.Tensor:
    """Nearest gallery row per query: (B, D), (G, D), (G,) -> (B,) int64. argmin |g|^2 - 2 q.g (|q|^2 is constant
    per query), one matrix product per chunk of rows, keeping the running best."""
    best_value = torch.full((queries.shape[0],), float("inf"))
    best_index = torch.zeros(queries.shape[0], dtype=torch.int64)
    for start in range(0, gallery.shape[0], chunk):
        block = torch.addmm(gallery_sqnorm[start:start + chunk].unsqueeze(0), queries,
                            gallery[start:start + chunk].T, alpha=-2.0)
        value, index = block.min(dim=1)
        better = value < best_value
        best_value = torch.where(better, value, best_value)
        best_index = torch.where(better, index + start, best_index)
    return best_index


def bench_index(args) -> None:
    from hierloc.inference.search import beam_search_dense, local_parents

    print(f"\n## 1. Index search (encoder excluded): global gazetteer, D={args.dim}, {args.queries} queries in "
          f"batches of {args.batch}, torch threads {torch.get_num_threads()}\n")
    hierloc, build_s, points_s = build_global_hierloc(args.dim, args.seed)
    gaz = hierloc.gazetteer
    counts = [int(gaz.level_offsets[i + 1] - gaz.level_offsets[i]) for i in range(4)]
    print(f"global gazetteer: {gaz.n_entities:,} entities ({', '.join(f'{n:,}' for n in counts)}); built in "
          f"{build_s:.1f} s; entity points computed once in {points_s:.2f} s")
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        features = torch.randn(args.queries, args.dim, generator=generator)
        queries = hierloc.model.embed_features(features)
    batches = list(queries.split(args.batch))

    def run_search(**kwargs):
        for batch in batches:
            hierloc.search_points(batch, top_k=5, **kwargs)

    model = hierloc.model
    distances, children = hierloc.search_index()
    parents_local = local_parents(model.entity_parents, model.level_offsets)
    print(f"children contiguous in the gazetteer: {children.contiguous} (the CSR index works either way)")

    @torch.no_grad()
    def run_dense():
        return [beam_search_dense(model.level_sqdists(batch, hierloc.entity_points()), parents_local,
                                  model.level_offsets, hierloc.tau, beam=10, top_k=5) for batch in batches]

    beam_best, beam_median = timed(lambda: run_search(beam=10), args.repeats)
    dense_best, dense_median = timed(run_dense, args.repeats)
    flat_best, flat_median = timed(lambda: run_search(flat=True), args.repeats)

    gallery = torch.randn(args.gallery, args.dim, generator=generator)
    gallery_sqnorm = gallery.square().sum(1)
    gallery_coords = torch.zeros(args.gallery, 2, dtype=torch.float32)  # lat, lon of each gallery image
    retrieval_queries = torch.randn(args.queries, args.dim, generator=generator)
    retrieval_batches = list(retrieval_queries.split(args.batch))

    def run_retrieval():
        for batch in retrieval_batches:
            retrieval_top1(batch, gallery, gallery_sqnorm, args.chunk)

    retrieval_best, retrieval_median = timed(run_retrieval, max(1, args.repeats // 2))

    fast = [hierloc.search_points(batch, beam=10, top_k=5) for batch in batches]
    dense = run_dense()
    same_best = float(np.mean(np.concatenate([(f.paths[:, 0] == d.paths[:, 0]).all(1).numpy()
                                              for f, d in zip(fast, dense)])))
    same_top5 = float(np.mean(np.concatenate([(f.paths == d.paths).all(2).all(1).numpy()
                                              for f, d in zip(fast, dense)])))
    score_gap = max(float((f.scores - d.scores).abs().max()) for f, d in zip(fast, dense))
    entity_bytes = hierloc.entity_points().numel() * hierloc.entity_points().element_size()
    tree_bytes = model.entity_parents.numel() * 8 + gaz.lat_deg.nbytes + gaz.lon_deg.nbytes
    beam_bytes = entity_bytes + tree_bytes + children.nbytes + distances.nbytes
    dense_bytes = entity_bytes + tree_bytes + sum(t.numel() * 8 for t in parents_local)
    gallery_bytes = gallery.numel() * 4 + gallery_sqnorm.numel() * 4 + gallery_coords.numel() * 4
    n = args.queries
    rows = []
    for name, best, median, size, detail in [
        ("HierLoc beam search (beam 10, top-5)", beam_best, beam_median, beam_bytes,
         f"{gaz.n_entities:,} entity points + tree + children index"),
        ("dense reference beam search (before)", dense_best, dense_median, dense_bytes,
         f"{gaz.n_entities:,} entity points + tree"),
        ("HierLoc flat scan (all cities)", flat_best, flat_median, entity_bytes + tree_bytes, "entity points + tree"),
        (f"image retrieval, brute force ({args.gallery:,} images)", retrieval_best, retrieval_median,
         gallery_bytes, f"{args.gallery:,} embeddings + norms + coordinates"),
    ]:
        rows.append([name, f"{n / best:,.0f}", f"{n / median:,.0f}", f"{1000 * best / n:.3f}", mib(size), detail])
    print(table(["method", "queries/s (best)", "queries/s (median)", "ms/query (best)", "index memory", "index"],
                rows))
    print(f"\nbeam vs retrieval: {retrieval_best / beam_best:.1f}x the queries/s (best runs), "
          f"{retrieval_median / beam_median:.1f}x (medians); retrieval needs {gallery_bytes / beam_bytes:.1f}x "
          f"the index memory ({gallery_bytes / entity_bytes:.1f}x the entity points alone).")
    print(f"beam vs the dense reference: {dense_best / beam_best:.1f}x the queries/s (best runs), "
          f"{dense_median / beam_median:.1f}x (medians); same best path on {100 * same_best:.1f}% of the queries, "
          f"identical top-5 paths on {100 * same_top5:.1f}%, largest path-score difference {score_gap:.2e}.")
    print(f"flat vs beam: {beam_best / flat_best:.2f}x the queries/s of beam search.")


# ---------------------------------------------------------------------------------------- part 2: end to end
def bench_end_to_end(args, hierloc, paths: list[str]) -> None:
    paths = paths[:args.e2e_images]
    print(f"\n## 2. End to end (decode + preprocess + encoder + beam search + answers): {len(paths)} images, "
          f"batch {args.batch_size}\n")
    backbone = hierloc.encoder.info.architecture if hasattr(hierloc.encoder, "info") else "?"
    rows = []
    for workers in args.workers:
        def run():
            for _ in hierloc.iter_predict(paths, top_k=3, batch_size=args.batch_size, num_workers=workers):
                pass

        best, median = timed(run, max(1, args.repeats // 2))
        rows.append([f"{workers}", f"{len(paths) / best:,.1f}", f"{len(paths) / median:,.1f}"])
    print(f"model {hierloc.source}: backbone {backbone} ({hierloc.encoder.preprocessor.image_size} px), "
          f"gazetteer {hierloc.gazetteer.n_entities:,} entities")
    print(table(["DataLoader workers", "images/s (best)", "images/s (median)"], rows))


# ------------------------------------------------------------------------------------------ part 3: accuracy
def bench_accuracy(args, hierloc, table_) -> None:
    from hierloc.inference import evaluate
    from hierloc.inference import metrics

    print(f"\n## 3. Accuracy vs beam width: {len(table_)} images of {table_.source}\n")
    points, ok, errors = evaluate.embed_table(hierloc, table_, batch_size=args.batch_size,
                                              num_workers=max(args.workers))
    true_lat, true_lon = table_.lat_deg[ok], table_.lon_deg[ok]
    true_fields = metrics.reverse_geocode(true_lat, true_lon)
    true_paths = hierloc.gazetteer.locate(true_lat, true_lon)
    rows = []
    for mode in [("beam", width) for width in args.beams] + [("flat", None)]:
        with Stopwatch() as search:
            answer = evaluate.paths_from_points(hierloc, points[torch.from_numpy(ok)], beam=mode[1],
                                                flat=mode[0] == "flat")
        summary, _ = evaluate.score_points(answer["pred_lat_deg"], answer["pred_lon_deg"], true_lat, true_lon,
                                           true_fields=true_fields)
        summary.update(evaluate.path_accuracy(answer["paths"], true_paths, true_fields))
        name = "flat" if mode[0] == "flat" else f"beam {mode[1]}"
        rows.append([name, f"{summary['mean_km']:.0f}", f"{summary['median_km']:.0f}", f"{summary['geoscore']:.0f}",
                     *(f"{100 * summary[f'acc_{r}km']:.1f}" for r in (25, 200, 750, 2500)),
                     *(f"{100 * summary[f'acc_{lv}']:.1f} / {100 * summary[f'path_acc_{lv}']:.1f}"
                       for lv in metrics.LEVELS),
                     f"{int(ok.sum()) / search.seconds:,.0f}"])
    print(table(["search", "mean km", "median km", "GeoScore", "<25 km %", "<200 km %", "<750 km %", "<2500 km %",
                 "country % (OSV5M / path)", "region %", "subregion %", "city %", "search q/s"], rows))
    if errors:
        print(f"\n{len(errors)} images unreadable (left out)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="trained model directory (parts 2 and 3)")
    parser.add_argument("--csv", default=None, help="labelled test CSV (parts 2 and 3)")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension D of the index benchmark")
    parser.add_argument("--queries", type=int, default=1024, help="queries per timed run (part 1)")
    parser.add_argument("--batch", type=int, default=256, help="queries per search batch (part 1)")
    parser.add_argument("--gallery", type=int, default=1_000_000, help="retrieval gallery size (part 1)")
    parser.add_argument("--chunk", type=int, default=65_536, help="gallery rows per matrix product (part 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--e2e-images", type=int, default=1024, help="images for the end-to-end run (part 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (parts 2 and 3)")
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 2],
                        help="DataLoader worker counts to try in part 2, e.g. 0,2")
    parser.add_argument("--beams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3, 10, 30],
                        help="beam widths of part 3")
    parser.add_argument("--skip-index", action="store_true", help="skip part 1 (the global gazetteer build)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 is steadier on a busy machine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import logging

    logging.basicConfig(level=logging.WARNING)
    if not args.skip_index:
        bench_index(args)
    if args.model:
        from hierloc.data import tables as data
        from hierloc.inference.predictor import HierLoc

        hierloc = HierLoc.from_pretrained(args.model, device="cpu")
        if not args.csv:
            raise SystemExit("--model needs --csv (labelled test images) for parts 2 and 3")
        table_ = data.read_image_table(args.csv)
        bench_end_to_end(args, hierloc, [str(p) for p in table_.paths])
        bench_accuracy(args, hierloc, table_)


if __name__ == "__main__":
    main()
