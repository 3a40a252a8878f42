"""`hierloc explain` (the hierarchy and the concepts behind it) and `hierloc plot-embeddings` (the Poincare disk)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gazetteer.atomic import atomic_write_text
from hierloc.cli import HelpFormatter, parse_point
from hierloc.errors import InputError
from hierloc.inference import disk_plot, pictures
from hierloc.inference.answers import check_options

HEADER = ("# p = probability among the level's candidates; the chosen entity lies on the best path (joint score); "
          "'(higher at this level alone)' marks a more probable candidate on a lower-scoring path; "
          "[+x] = concept contribution")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain", formatter_class=HelpFormatter, help="explain where images were taken, level by level",
        description="Print the predicted hierarchy as a tree: each level's entity and probability, its runner-ups, "
                    "and the concepts seen in the image that set the chosen entity apart from the runner-up "
                    "(contribution = p(concept in image) x (profile of chosen - profile of runner-up)).\n"
                    "The chosen entity of each level is the one on the best path: beam search ranks whole paths by\n"
                    "their joint score, so another candidate of a level can be more probable at that level alone;\n"
                    "the output marks such a candidate '(higher at this level alone)'.",
        epilog="inputs: what `hierloc predict` takes (image files, directories, quoted glob patterns, CSV files and\n"
               ".txt/.lst lists; --image-root, --image-col).")
    p.add_argument("images", nargs="+", help="image files, directories, glob patterns, CSV or .txt list files")
    p.add_argument("--model", required=True, help="trained model directory (what `hierloc train` writes), or a hub id of one in the local cache")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch a --model hub id that is not in the local cache (off: never download silently)")
    p.add_argument("--top-k", type=int, default=None,
                   help="top paths to search (alternatives on the map and in JSON; default: the model's)")
    p.add_argument("--beam", type=int, default=None, help="beam width per level (default: the model's)")
    p.add_argument("--runners-up", type=int, default=2, help="runner-ups shown per level")
    p.add_argument("--reasons", type=int, default=3, help="supporting concepts shown per level")
    p.add_argument("--candidates", default="siblings", choices=["siblings", "paths"],
                   help="runner-ups: children of the chosen parent, or entities of the top-k paths")
    p.add_argument("--min-prob", type=float, default=None,
                   help="stop the explanation before the first level whose chosen probability is below this value")
    p.add_argument("--exif", default="compare", choices=["compare", "ignore"],
                   help="GPS stored in the image: report it next to the answer (and on the map), or ignore it")
    p.add_argument("--format", default="text", choices=["text", "json"], help="output format")
    p.add_argument("--out", default="-", help="write to this file (atomically); - is standard output")
    p.add_argument("--image-root", default=None,
                   help="directory that relative paths in CSV/list inputs are relative to (default: the file's)")
    p.add_argument("--image-col", default=None, help="image column of CSV inputs (default: detected)")
    p.add_argument("--map", default=None, metavar="OUT",
                   help="also draw a map (.png or .html); several images write OUT-<n>-<image name>.png")
    p.add_argument("--basemap", default="relief", choices=["relief", "bluemarble"], help="map background")
    p.add_argument("--truth", default=None, metavar="LAT,LON", help="true location to mark on the map (one image)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-calibration", action="store_true",
                   help="report the model's raw probabilities, ignoring its calibration.json")
    p.set_defaults(func=run_explain)

    q = subparsers.add_parser(
        "plot-embeddings", formatter_class=HelpFormatter, help="draw the learned entity hierarchy in the Poincare disk",
        description="Project every entity to the Poincare disk (logmap0 -> 2-D principal directions -> expmap0, "
                    "keeping each entity's hyperbolic distance to the origin) and draw parent -> child edges.")
    q.add_argument("--model", required=True, help="trained model directory")
    q.add_argument("--out", required=True, help="output PNG")
    q.add_argument("--max-level", default="city", choices=["country", "region", "subregion", "city"],
                   help="deepest level drawn")
    q.add_argument("--labels", type=int, default=40, help="label this many countries (most images first)")
    q.add_argument("--size", type=int, default=1000, help="picture width in pixels")
    q.set_defaults(func=run_plot_embeddings)


def _parse_truth(text: str | None):
    return None if text is None else parse_point(text, f"--truth {text!r}")


def _map_path(out: str, index: int, n_images: int, source: str) -> Path:
    path = Path(out)
    if n_images == 1:
        return path
    return path.with_name(f"{path.stem}-{index + 1}-{Path(source).stem}{path.suffix}")


def run_explain(args: argparse.Namespace) -> int:
    # torch-heavy: imported when the command runs, so that `hierloc --help` and the other commands stay fast
    from hierloc.data.prediction import expand_inputs
    from hierloc.inference import explain, maps
    from hierloc.inference.predictor import HierLoc

    truth = _parse_truth(args.truth)
    check_options(args.min_prob, "city", "ignore", args.beam, args.top_k)
    paths = expand_inputs(args.images, image_root=args.image_root, image_col=args.image_col)
    if truth is not None and len(paths) != 1:
        raise InputError("--truth: give exactly one image with it")
    if args.map is not None:
        pictures.output_path(args.map, (".png", ".html", ".htm"))
    model = HierLoc.from_pretrained(args.model, device=args.device, calibrated=not args.no_calibration,
                                    allow_download=args.allow_download)
    results = explain.explain_images(model, paths, model_dir=args.model, top_k=args.top_k, beam=args.beam,
                                     n_reasons=args.reasons, n_runners_up=args.runners_up,
                                     candidates=args.candidates, exif=args.exif, min_prob=args.min_prob)
    if args.format == "json":
        text = explain.to_json(results) + "\n"
    else:
        prov = results[0].model if results else explain.model_provenance(args.model)
        text = "\n".join([f"# {explain.provenance_line(prov)}", HEADER] + [explain.format_text(r) for r in results])
        text += "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(args.out, text)
    if args.map is not None:
        for index, result in enumerate(results):
            out = _map_path(args.map, index, len(results), result.source)
            maps.render_prediction_map(result, out, basemap=args.basemap, truth=truth)
            print(f"map written to {out}", file=sys.stderr)
    return 0


def run_plot_embeddings(args: argparse.Namespace) -> int:
    import numpy as np

    from hierloc.inference.explain import model_provenance, provenance_line
    from hierloc.inference.predictor import HierLoc

    model = HierLoc.from_pretrained(args.model, device="cpu")
    gaz = model.gazetteer
    depth = ("country", "region", "subregion", "city").index(args.max_level)
    keep = int(gaz.level_offsets[depth + 1])
    if not model.model.is_hyperbolic:
        _euclidean_error(args.model)
    points = model.entity_points().cpu().double().numpy()[:keep]
    disk = disk_plot.project_to_disk(points, c=model.cfg.model.curvature)
    names = [str(name) for name in gaz.names[:keep]]
    disk_plot.render_poincare_disk(disk, np.asarray(gaz.levels[:keep]), np.asarray(gaz.parents[:keep]), names,
                                   args.out, c=model.cfg.model.curvature, size=args.size, label_countries=args.labels,
                                   counts=np.asarray(gaz.counts[:keep]),
                                   subtitle=provenance_line(model_provenance(args.model)))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _euclidean_error(model_dir: str):
    raise InputError(f"{model_dir}: this model is Euclidean (model.geometry=euclidean); there is no Poincare disk "
                     "to draw")
