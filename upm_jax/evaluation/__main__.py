"""CLI: python -m upm_jax.evaluation FILE [FILE ...] -- CMC / mAP table, JSON, pictures.

Several FILEs are the splits of one protocol (e.g. the 10 PRID2011 splits): each is
reported, then their mean.
"""
import argparse
import json
import os
import sys
import warnings

from upm_jax.evaluation.features import FeaturesError, load_features, montage_paths_file
from upm_jax.evaluation.metrics import evaluate_files
from upm_jax.evaluation.plots import plot_cmc, plot_montage, rank_lists
from upm_jax.files import atomic_write

_COLUMNS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")


def _parser():
    p = argparse.ArgumentParser(prog="python -m upm_jax.evaluation", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", metavar="FILE", help="features .npz file(s), one per split")
    p.add_argument("--features", action="append", default=[], metavar="FILE",
                   help="another way to name a features file (repeatable)")
    p.add_argument("--ap", choices=("paper", "standard", "both"), default="both")
    p.add_argument("--distance", choices=("euclidean", "cosine"), default="euclidean")
    p.add_argument("--pooling", choices=("max", "mean"), default=None,
                   help="frame pooling (default: the file's 'pooling' entry, else max)")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)")
    p.add_argument("--json", metavar="OUT", help="write the full results (CMC curves included) here")
    p.add_argument("--plot", metavar="OUT.png", help="CMC curves PNG")
    p.add_argument("--montage", metavar="OUT.png", help="rank-list montage PNG (first FILE)")
    p.add_argument("--paths", metavar="PATHS.txt",
                   help="one image path per tracklet (line t = tracklet t), for --montage "
                        "(default: the FILE's own X.paths.txt, written by extraction)")
    p.add_argument("--queries", default="0,1,2", metavar="i,j,k",
                   help="positions in the query list shown by --montage")
    p.add_argument("--topk", type=int, default=10, help="gallery entries per montage row")
    return p


def format_table(result):
    """Text table of an `evaluate_files` result: one row per split and mode, then the mean."""
    header = f"{'split':<28} {'mode':<9}" + "".join(f"{c:>8}" for c in _COLUMNS) + f"{'queries':>9}{'gallery':>9}"
    lines = [header, "-" * len(header)]
    names = [os.path.basename(f) for f in result["files"]]
    rows = list(zip(names, result["splits"]))
    if len(rows) > 1:
        rows.append((f"mean of {len(rows)}", result["mean"]))
    for name, res in rows:
        for mode, m in res.items():
            # a two-direction split (iLIDS-VID): the mean row, then each direction
            for label, row in [(name, m)] + [(f"  {d}", v) for d, v in m.get("directions", {}).items()]:
                cells = "".join(f"{row[c]:8.2f}" if c in row else f"{'-':>8}" for c in _COLUMNS)
                lines.append(f"{label[:28]:<28} {mode:<9}{cells}{row['num_queries']:9.0f}"
                             f"{row['gallery_size']:9.0f}")
    return "\n".join(lines)


def _read_paths(path):
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    return [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines]


def main(argv=None):
    args = _parser().parse_args(argv)
    files = args.files + args.features
    if not files:
        _parser().error("give at least one features FILE")
    if args.montage and not args.paths:
        args.paths = montage_paths_file(files[0])
        if not os.path.isfile(args.paths):
            _parser().error(f"--montage needs --paths PATHS.txt ({args.paths}, which extraction "
                            f"writes next to {files[0]}, does not exist)")
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args, files)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _run(args, files):
    for flag, out in (("--json", args.json), ("--plot", args.plot), ("--montage", args.montage)):
        folder = os.path.dirname(os.path.abspath(out)) if out else None
        if folder and not os.path.isdir(folder):
            print(f"error: {flag} {out}: the folder {folder} does not exist", file=sys.stderr)
            return 2
    try:
        result = evaluate_files(files, distance=args.distance, ap=args.ap, rerank=args.rerank,
                                pooling=args.pooling)
        print(format_table(result))
        if args.json:
            options = {"ap": args.ap, "distance": args.distance, "pooling": args.pooling,
                       "rerank": args.rerank}
            atomic_write(args.json, lambda f: json.dump({"options": options, **result}, f), mode="w")
        if args.plot:
            source = result["mean"] if len(files) > 1 else result["splits"][0]
            stem = "mean" if len(files) > 1 else os.path.basename(files[0])
            plot_cmc({f"{stem} {mode}": m["cmc"] for mode, m in source.items()}, args.plot)
        if args.montage:
            positions = [int(v) for v in args.queries.split(",") if v.strip()]
            mode = "standard" if args.ap == "standard" else "paper"
            ranked = rank_lists(load_features(files[0]), positions, k=args.topk,
                                distance=args.distance, mode=mode, rerank=args.rerank,
                                pooling=args.pooling, source=files[0])
            plot_montage(_read_paths(args.paths), ranked, args.montage)
    except (FeaturesError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from upm_jax import interrupts
    sys.exit(interrupts.command(main))
