"""Inspect a dataset folder the way training reads it.

  python -m upm_jax.data ROOT --layout prid2011 [--split K] [--split-file F] [--json]
"""
import argparse
import json
import sys

from upm_jax.data.readers import LAYOUTS, load_dataset
from upm_jax.data.table import DatasetError


def _format(summary: dict) -> str:
    lines = [f"{summary['layout']} at {summary['root']}"
             + (f" (split {summary['split']})" if summary["split"] is not None else ""),
             f"cameras: {summary['num_cameras']}"]
    for part in ("train", "test"):
        s = summary[part]
        lines.append(f"{part}: {s['frames']} frames, {s['tracklets']} tracklets, "
                     f"{s['persons']} persons")
        for c in s["cameras"]:
            extra = ""
            if c["distractor_tracklets"] or c["junk_tracklets"]:
                extra = (f", {c['distractor_tracklets']} distractor and {c['junk_tracklets']} "
                         "junk tracklets")
            lines.append(f"  camera {c['camera']}: {c['frames']} frames, {c['tracklets']} "
                         f"tracklets, {c['persons']} persons{extra}")
    lines.append(f"query: {summary['query']} tracklets, gallery: {summary['gallery']} tracklets")
    lines.append(f"skipped: {len(summary['skipped'])} unreadable frames")
    lines.extend(f"  {s['path']}: {s['reason']}" for s in summary["skipped"])
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m upm_jax.data",
                                     description="Reads a raw dataset folder as training will "
                                                 "and prints what it found.")
    parser.add_argument("root", help="the dataset folder, as distributed")
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--split", type=int, default=1, help="PRID2011/iLIDS-VID split (1-based)")
    parser.add_argument("--split-file", default=None, help="split JSON in the official schema")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="decode every frame and list (skip) unreadable ones")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        ds = load_dataset(args.layout, args.root, split=args.split, split_file=args.split_file,
                          skip_corrupt=args.skip_corrupt)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = ds.summary()
    print(json.dumps(summary, indent=1) if args.json else _format(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
