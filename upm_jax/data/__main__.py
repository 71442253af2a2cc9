"""Inspect a dataset folder, or prepare it as a TFDS set of resized frames.

  python -m upm_jax.data ROOT --layout prid2011 [--split SPEC] [--split-file F] [--json]
  python -m upm_jax.data prepare --layout mars --root ROOT --image-size 256 --data-dir DIR
      [--skip-corrupt] [--threads N]

Inspection: what is on disk, then what the chosen protocol selects. SPEC is what
config.data.splits takes: '3', '1,2,5', 'all', 'random:SEED[:COUNT]'. The on-disk report
is printed even when no protocol applies. Preparing writes every frame of the release
folder ROOT, resized for config.data.image_size, under DIR (a local folder or gs://...;
see upm_jax.data.prepared); a run reads it with config.data.source='prepared' and
config.data.data_dir=DIR. Errors exit 2 without a traceback.
"""
import argparse
import json
import os
import sys

from upm_jax.data.readers import LAYOUTS, inspect_disk, load_dataset, resolve_splits
from upm_jax.data.table import DatasetError


def _format_disk(disk: dict) -> list:
    lines = [f"{disk['layout']} folder {disk['root']} holds:"]
    for part, cams in disk["parts"].items():
        lines.append(f"  {part}:" if part != "all" else "  on disk:")
        for c in cams:
            folder = f" ({c['folder']})" if "folder" in c else ""
            lines.append(f"    camera {c['camera']}{folder}: {c['persons']} persons, "
                         f"{c['tracklets']} tracklets, {c['frames']} frames")
    if "persons_in_both_cameras" in disk:
        lines.append(f"  persons seen by both cameras: {disk['persons_in_both_cameras']}")
    return lines


def _format_split(summary: dict) -> list:
    lines = [f"split {summary['split']}:" if summary["split"] is not None
             else "the protocol selects:"]
    for part in ("train", "test"):
        s = summary[part]
        lines.append(f"  {part}: {s['frames']} frames, {s['tracklets']} tracklets, "
                     f"{s['persons']} persons")
        for c in s["cameras"]:
            extra = ""
            if c["distractor_tracklets"] or c["junk_tracklets"]:
                extra = (f", {c['distractor_tracklets']} distractor and {c['junk_tracklets']} "
                         "junk tracklets")
            lines.append(f"    camera {c['camera']}: {c['frames']} frames, {c['tracklets']} "
                         f"tracklets, {c['persons']} persons{extra}")
    scored = ("both directions, mean (camera 1 -> 2 and 2 -> 1)" if summary["directions"] == "both"
              else "query -> gallery")
    lines.append(f"  query: {summary['query']} tracklets, gallery: {summary['gallery']} "
                 f"tracklets; scored {scored}")
    lines.extend(f"  warning: {w}" for w in summary["warnings"])
    lines.append(f"  skipped: {len(summary['skipped'])} unreadable frames")
    lines.extend(f"    {s['path']}: {s['reason']}" for s in summary["skipped"])
    return lines


def _report(args, out: dict) -> int:
    """Fills `out` step by step; returns 2 at the first data error (kept in out['error'])."""
    try:
        out["disk"] = inspect_disk(args.layout, args.root)
        plan = resolve_splits(args.layout, args.root, args.split, args.split_file, field="--split")
        out["protocol"] = {"source": plan.protocol, "splits_available": plan.available,
                           "selected": plan.numbers}
        out["splits"] = []
        for number in plan.numbers:
            ds = load_dataset(args.layout, args.root, split=number, split_file=args.split_file,
                              splits=args.split, skip_corrupt=args.skip_corrupt)
            out["splits"].append(ds.summary())
    except DatasetError as e:
        out["error"] = str(e)
        return 2
    return 0


def _text(out: dict) -> str:
    lines = _format_disk(out["disk"]) if "disk" in out else []
    if "protocol" in out:
        p = out["protocol"]
        lines.append(f"protocol: {p['source']}; splits {p['splits_available']}, "
                     f"showing {p['selected']}")
    for summary in out.get("splits", []):
        lines.extend(_format_split(summary))
    return "\n".join(lines)


def prepare_main(argv) -> int:
    """The prepare command: writes the set, prints what it holds and what was skipped."""
    parser = argparse.ArgumentParser(
        prog="python -m upm_jax.data prepare",
        description="Writes every frame of a release folder, resized, as a TFDS set "
                    "(ArrayRecord) that runs read with config.data.source='prepared'.")
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--root", required=True, help="the release folder, as downloaded")
    parser.add_argument("--image-size", type=int, required=True,
                        help="config.data.image_size of the runs that will read the set "
                             "(frames are stored at image_size x image_size/2)")
    parser.add_argument("--data-dir", required=True,
                        help="where the set is written (config.data.data_dir): a local folder "
                             "or gs://BUCKET/PATH (written locally, then copied; needs gcsfs)")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="leave unreadable frames out (listed in the set) instead of "
                             "stopping at the first")
    parser.add_argument("--threads", type=int, default=None,
                        help="decoding threads (default: CPU cores + 2)")
    args = parser.parse_args(argv)
    if args.image_size < 32 or args.image_size % 2:
        print(f"error: --image-size {args.image_size}: expected an even size of at least 32 "
              "(config.data.image_size)", file=sys.stderr)
        return 2
    from upm_jax.data import prepared  # noqa: PLC0415  (imports TFDS)
    try:
        summary = prepared.prepare(args.layout, args.root, args.image_size, args.data_dir,
                                   skip_corrupt=args.skip_corrupt, threads=args.threads)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"prepared {summary['frames']} frames of {summary['release']} in {summary['path']} "
          f"({summary['bytes'] / 2**30:.2f} GiB)")
    print(f"skipped: {len(summary['skipped'])} unreadable frames")
    for path, reason in summary["skipped"]:
        print(f"  {path}: {reason}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare"]:
        return prepare_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m upm_jax.data",
                                     description="Reports what a raw dataset folder holds and "
                                                 "what training will read from it.")
    parser.add_argument("root", help="the dataset folder, as distributed")
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--split", default="1",
                        help="PRID2011/iLIDS-VID splits, as config.data.splits: '3', '1,2,5', "
                             "'all' or 'random:SEED[:COUNT]' (1-based; default 1)")
    parser.add_argument("--split-file", default=None,
                        help="a split file: our JSON, torchreid's list JSON or the iLIDS-VID .mat")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="decode every frame and list (skip) unreadable ones")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    out = {}
    status = _report(args, out)
    try:
        text = json.dumps(out, indent=1) if args.json else _text(out)
        if text:
            print(text, flush=True)
        if "error" in out:
            print(f"error: {out['error']}", file=sys.stderr, flush=True)
    except BrokenPipeError:
        # the reader (e.g. `| head`) stopped early: not an error; silence the final flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return status


if __name__ == "__main__":
    sys.exit(main())
