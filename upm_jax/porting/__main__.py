"""Convert a TF-slim ImageNet checkpoint to the .npz that ``config.model.pretrained`` points at.

    python -m upm_jax.porting --from slim mobilenet_v1_1.0_224.ckpt --out weights/mobilenet_v1.npz
    python -m upm_jax.porting --from slim resnet_v1_50.ckpt --out weights/resnet_v1_50.npz

Needs neither TensorFlow nor JAX (see upm_jax.porting).
"""
import argparse
import sys

from upm_jax.porting.checkpoint import CheckpointFormatError
from upm_jax.porting.slim import BACKBONES, PortError, port_checkpoint
from upm_jax.porting.weights_file import STATS_PREFIX


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m upm_jax.porting",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, choices=["slim"],
                        help="checkpoint family (TF-slim)")
    parser.add_argument("checkpoint", metavar="CKPT_PREFIX",
                        help="V2 bundle prefix (without .index) or V1 checkpoint file")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--backbone", default="auto", choices=("auto",) + BACKBONES)
    args = parser.parse_args(argv)
    try:
        p = port_checkpoint(args.checkpoint, args.out, args.backbone)
    except (CheckpointFormatError, PortError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = sum(target.startswith(STATS_PREFIX) for target in p.restore.values())
    print(f"{args.checkpoint}: {p.backbone}, restored {len(p.restore) - stats} weights and "
          f"{stats} BatchNorm moving statistics, skipped {len(p.skip)} -> {args.out}")
    return 0


if __name__ == "__main__":
    from upm_jax import interrupts
    sys.exit(interrupts.command(main))
