"""Writes a synthetic re-id set in a benchmark's raw layout (see upm_jax/data/synthetic.py).

  python tools/make_synthetic.py --layout prid2011 --out /tmp/synth --ids 60 --seed 0
"""
import argparse

from upm_jax.data import synthetic


def _pair(text, name, sep):
    parts = [int(p) for p in text.replace(sep, ",").split(",")]
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--{name}: expected N or A{sep}B, got {text!r}")
    return tuple(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", required=True, choices=synthetic.LAYOUTS)
    parser.add_argument("--out", required=True, help="folder to create (absent or empty)")
    parser.add_argument("--ids", type=int, required=True, help="identities of the protocol")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", default="8,16", help="frames per tracklet: N or MIN,MAX")
    parser.add_argument("--size", default="128x64", help="frame size HxW")
    parser.add_argument("--splits", type=int, default=10, help="PRID/iLIDS: splits to write")
    parser.add_argument("--duke-naming", choices=("new", "old"), default="new",
                        help="dukev frame names: 0001_C6_F0099_X30823.jpg (new) or 0001C6F0099X30823.jpg")
    args = parser.parse_args(argv)
    try:
        frames = _pair(args.frames, "frames", ",")
        size = _pair(args.size.lower(), "size", "x")
        info = synthetic.generate(args.layout, args.out, ids=args.ids, seed=args.seed,
                                  frames=frames, size=size, num_splits=args.splits,
                                  duke_naming=args.duke_naming)
    except (ValueError, FileExistsError, argparse.ArgumentTypeError) as e:
        parser.error(str(e))
    print(f"wrote {info['frames']} frames in {info['tracklets']} tracklets to {info['root']}")
    if info["split_file"]:
        print(f"split file: {info['split_file']}")


if __name__ == "__main__":
    main()
