"""upm_jax against the original TF1 code on this machine: interleaved time ratios and peak RSS.

    python tools/bench_vs_tf1.py --bench-dir ../shared/bench_tf1 --tf1-python /tmp/tfvenv/bin/python \
        --out vs_tf1.json [--sections train,extract,rss] [--rounds 5]

``--bench-dir`` is the shared ``bench_tf1`` folder (the original training and extraction
graphs, run unchanged in TF1 graph mode, and its interleaving driver); ``--tf1-python`` a
Python with TensorFlow and tf-slim (its README says how to make one). Sections:

  train    one training step, DAL and uPMnet LAM (8 stripes): MobileNet v1, batch 64,
           256x128, float32, RMSProp, PRID2011-like anchors (2 x 89), cross association on,
           random initial weights; upm_jax gets uint8 host batches (the original a float32
           feed_dict), both include that transfer.
  extract  features of a batch of decoded frames: the original at its batch 1 against
           upm_jax at batch 1 and at ``--extract-batches``.
  rss      peak resident memory of one training process per side (2 steps after warm-up).

Every worker is warmed first (graph build, jit compilation); then rounds run each worker's
block of calls in turn, the order rotating, so that a loaded machine slows both sides alike.
Printed per pair: the median ratio of time per item (upm_jax / original) with its min and
max over the rounds, and the CPU-time ratio; the JSON keeps every round. Run it with the
machine otherwise as quiet as it gets, and state ``uptime`` beside the figures.

This file is also its own upm_jax worker (``--worker train|extract``), speaking the bench's
line protocol (``wproto``) on stdin/stdout.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACKLETS_PER_CAMERA = (89, 89)
METHOD_HEADS = {"dal": "dal", "upm_local": "local"}


# ----------------------------------------------------------------------------- workers

def _jax_model(method):
    import jax.numpy as jnp
    from upm_jax import models
    head = METHOD_HEADS[method]
    return models.build_model("mobilenet_v1", head, n_part=1 if head == "dal" else 8,
                              dtype=jnp.float32)


def train_worker(method, batch, image_size):
    """call(i) -> seconds of one training step on the i-th of 4 fixed host batches."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from upm_jax import parallel
    from upm_jax.training import optim
    from upm_jax.training import state as state_lib
    from upm_jax.training import step as step_lib
    from upm_jax.training.association import AnchorMemory

    mesh = parallel.make_mesh()
    model = _jax_model(method)
    height, width = image_size, image_size // 2
    feature_shape = jax.eval_shape(lambda: model.init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((1, height, width, 3)), train=False)[0]).shape
    memory = AnchorMemory.zeros(TRACKLETS_PER_CAMERA, feature_shape[1], feature_shape[2])
    tx = optim.make_optimizer("rmsprop")
    schedule = optim.make_schedule("rmsprop", learning_rate=0.045, steps_per_epoch=4096 / batch,
                                   total_steps=20000)
    holder = {"state": state_lib.create_train_state(model, jax.random.PRNGKey(0),
                                                    image_shape=(height, width), tx=tx,
                                                    memory=memory, mesh=mesh)}
    step_fn = step_lib.make_train_step(model, "rmsprop", mesh=mesh,
                                        frozen_scopes=model.frozen_scopes)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8),
                "track": rng.integers(0, TRACKLETS_PER_CAMERA[0], batch).astype(np.int32),
                "camera": rng.integers(0, 2, batch).astype(np.int32)} for _ in range(4)]

    def call(i):
        start = time.perf_counter()
        holder["state"], metrics = step_fn(holder["state"], schedule,
                                           parallel.global_batch(batches[i % 4], mesh))
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(f"training step {i}: loss {loss}")
        return time.perf_counter() - start

    return call, {"method": method, "batch": batch}


def extract_worker(method, batch, image_size):
    """call(i) -> seconds of the features of one uint8 batch already on the device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from upm_jax import extract as extract_lib
    from upm_jax import parallel

    mesh = parallel.make_mesh()
    model = _jax_model(method)
    height, width = image_size, image_size // 2
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, height, width, 3)), train=False))(
        jax.random.PRNGKey(0))
    feature_fn = extract_lib.make_feature_fn(model, mesh)
    images = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8),
        parallel.batch_sharding(mesh))

    def call(i):
        start = time.perf_counter()
        np.asarray(feature_fn(variables, images))  # to the host, as the original's loop does
        return time.perf_counter() - start

    return call, {"method": method, "batch": batch}


def run_worker(args):
    sys.path.insert(0, args.bench_dir)
    import jax
    import wproto  # the bench's protocol module (pure Python)
    make = train_worker if args.worker == "train" else extract_worker
    call, info = make(args.method, args.batch, args.image_size)
    for i in range(args.warmup):
        call(i)
    info.update(framework="jax " + jax.__version__, device=jax.devices()[0].device_kind,
                glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
    if args.once:
        times = [call(i) for i in range(args.once)]
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({**info, "step_s": times, "peak_rss_mb": peak_mb}), flush=True)
        return
    wproto.serve(call, args.batch, info)


# ----------------------------------------------------------------------------- driver

def _jax_cmd(args, kind, method, batch, extra=()):
    return [sys.executable, os.path.abspath(__file__), "--worker", kind, "--method", method,
            "--batch", str(batch), "--image-size", str(args.image_size),
            "--bench-dir", args.bench_dir, *extra]


def _tf_train_cmd(args, method, extra=()):
    return [args.tf1_python, os.path.join(args.bench_dir, "tf_train_worker.py"), "--method", method,
            "--batch", str(args.batch), "--image-size", str(args.image_size), *extra]


def interleave_config(args, sections):
    """The bench driver's CONFIG: workers and the (upm_jax, original) pairs to compare."""
    env = {"JAX_PLATFORMS": "cpu"}
    tf_env = {"TF_TRAIN_DIR": os.path.join(args.work_dir, "tf_train_dir")}
    workers, pairs = {}, []
    if "train" in sections:
        for method in args.methods.split(","):
            workers[f"tf_{method}"] = {"cmd": _tf_train_cmd(args, method), "cwd": args.bench_dir,
                                       "env": tf_env, "calls": args.train_calls}
            workers[f"jax_{method}"] = {"cmd": _jax_cmd(args, "train", method, args.batch),
                                        "cwd": ROOT, "env": env, "calls": args.train_calls}
            pairs.append([f"jax_{method}", f"tf_{method}"])
    if "extract" in sections:
        workers["tf_extract_b1"] = {
            "cmd": [args.tf1_python, os.path.join(args.bench_dir, "tf_extract_worker.py"),
                    "--batch", "1", "--image-size", str(args.image_size)],
            "cwd": args.bench_dir, "calls": args.extract_frames}
        for batch in sorted({1, *map(int, args.extract_batches.split(","))}):
            calls = max(1, args.extract_frames // batch)
            workers[f"jax_extract_b{batch}"] = {"cmd": _jax_cmd(args, "extract", "dal", batch),
                                                "cwd": ROOT, "env": env, "calls": calls}
            pairs.append([f"jax_extract_b{batch}", "tf_extract_b1"])
    return {"workers": workers, "rounds": args.rounds, "pairs": pairs}


def peak_rss(cmd, cwd, env):
    """Peak resident MB of a worker run to completion (its `--once` mode)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, **env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss / 1024


def run_driver(args):
    for path, what in ((args.bench_dir, "--bench-dir"), (args.tf1_python, "--tf1-python")):
        if not os.path.exists(path):
            print(f"error: {what} {path!r} does not exist", file=sys.stderr)
            return 2
    os.makedirs(args.work_dir, exist_ok=True)
    sections = args.sections.split(",")
    result = {"uptime_before": os.getloadavg()}
    interleaved = [s for s in sections if s in ("train", "extract")]
    if interleaved:
        config_path = os.path.join(args.work_dir, "interleave_config.json")
        out_path = os.path.join(args.work_dir, "interleave.json")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(interleave_config(args, interleaved), f, indent=1)
        subprocess.run([sys.executable, os.path.join(args.bench_dir, "interleave.py"), config_path,
                        out_path], check=True)
        with open(out_path, encoding="utf-8") as f:
            result["interleave"] = json.load(f)
    if "rss" in sections:
        env = {"JAX_PLATFORMS": "cpu"}
        tf_env = {"TF_TRAIN_DIR": os.path.join(args.work_dir, "tf_train_dir")}
        rss = {}
        for method in args.methods.split(","):
            rss[f"tf_{method}"] = peak_rss(_tf_train_cmd(args, method, ["--once", "2"]),
                                           args.bench_dir, tf_env)
            rss[f"jax_{method}"] = peak_rss(
                _jax_cmd(args, "train", method, args.batch, ["--once", "2"]), ROOT, env)
            print(f"peak RSS {method}: upm_jax {rss[f'jax_{method}']:.0f} MB, original "
                  f"{rss[f'tf_{method}']:.0f} MB, ratio "
                  f"{rss[f'jax_{method}'] / rss[f'tf_{method}']:.3f}", flush=True)
        result["peak_rss_mb"] = rss
    result["uptime_after"] = os.getloadavg()
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench-dir", default=os.path.join(ROOT, "..", "shared", "bench_tf1"))
    parser.add_argument("--tf1-python", default="/tmp/tfvenv/bin/python")
    parser.add_argument("--sections", default="train,extract,rss")
    parser.add_argument("--methods", default="dal,upm_local")
    parser.add_argument("--batch", type=int, default=64, help="training batch")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--extract-batches", default="1,256")
    parser.add_argument("--extract-frames", type=int, default=256,
                        help="frames per worker per round in the extract section")
    parser.add_argument("--train-calls", type=int, default=2, help="steps per worker per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work-dir", default="/tmp/bench_vs_tf1")
    parser.add_argument("--out", default="vs_tf1.json")
    parser.add_argument("--worker", choices=["train", "extract"], help=argparse.SUPPRESS)
    parser.add_argument("--method", default="dal", choices=sorted(METHOD_HEADS), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--once", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.bench_dir = os.path.abspath(args.bench_dir)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        from upm_jax import host_malloc
        host_malloc.reexec_with_huge_pages()   # as the run's entry point does
        run_worker(args)
        return 0
    return run_driver(args)


if __name__ == "__main__":
    sys.exit(main())
