"""Command line: export a finished workdir's feature extractor (see upm_jax.export).

    python -m upm_jax.export --workdir DIR --format stablehlo|onnx|savedmodel --out PATH \
        [--split K] [--model NAME ...]

A user's mistake (workdir, split, model, format, path, missing packages, an artifact that
fails its parity check) is one line `error: ...` on stderr and exit status 2.
"""
import argparse
import os
import sys


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m upm_jax.export",
        description="Export a trained workdir's feature extractor (uint8 frames -> features) "
                    "with a JSON file beside it describing its contract.")
    p.add_argument("--workdir", required=True, help="a folder written by python -m upm_jax.main")
    p.add_argument("--format", required=True, metavar="F",
                   help="stablehlo: jax.export (CPU, CUDA, TPU); onnx: opset 17 for "
                        "onnxruntime; savedmodel: TensorFlow (TF Serving, TFLite conversion)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="the artifact to write (a folder for savedmodel); PATH.json beside it")
    p.add_argument("--split", type=int, default=None,
                   help="split K (default: the lowest split where the models finished training)")
    p.add_argument("--model", action="append", default=None, metavar="NAME",
                   help="export only this model (dal, lam or gam; repeatable; default: the "
                        "method's test feature, all its models)")
    return p


def _shape(dims):
    return "[" + ", ".join(str(d) for d in dims) + "]"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from upm_jax import extractor as extractor_lib
    from upm_jax import run
    from upm_jax.export import artifact

    try:
        artifact.check_output(args.format, args.out)  # before the models are restored
        extractor = extractor_lib.load(args.workdir, split=args.split, models=args.model)
        record = artifact.export(extractor, args.format, args.out)
    except (artifact.ExportError, extractor_lib.ExtractorError) + run.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    check = record["parity"]
    print(f"wrote {args.out} ({args.format}, {record['bytes'] / 1e6:.1f} MB): uint8 "
          f"{_shape(record['input']['shape'])} -> float32 {_shape(record['output']['shape'])}, "
          f"models {'+'.join(m['name'] for m in record['source']['models'])} of split "
          f"{record['source']['split']}; features within {check['error']:.2g} of upm_jax's "
          f"(tolerance {check['tolerance']:.2g}); contract in {artifact.sidecar_path(args.out)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    from upm_jax import interrupts
    sys.exit(interrupts.command(main))
