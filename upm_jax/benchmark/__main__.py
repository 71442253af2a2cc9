"""How fast is upm_jax here? Every benchmark, one command, a printed table, a JSON file.

    python -m upm_jax.benchmark --out benchmark.json                    # everything, defaults
    python -m upm_jax.benchmark --sections train --backbones mobilenet_v1 --heads upm_local \
        --batches 64,max --dtypes float32,bfloat16

The models are trained as `--config` says (default: the base config, the papers' uPMnet
settings), through the run's own trainer factory (`training.trainer.make_trainer`):
optimizer, schedule, margins, clipping and EMA come from the config; the flags choose only
backbone, method, dtype, batch and image size.

Sections:
  train     training steps/s and frames/s (on-device dataset), XLA FLOPs per step, MFU
  extract   extraction frames/s with the on-device input and the host pipeline
  input     frames/s and frames per CPU-second: decode + resize (PNG and JPEG, 128x64 ->
            256x128 and 256x128 -> 224x112), the grain pipeline from raw files and from a
            prepared set per worker count, and the host cores each shipped config needs at
            the roofline step rate (`benchmark/input.py`)
  export    extraction frames/s of each exported artifact (python -m upm_jax.export) run by
            its own runtime, next to upm_jax's own, and each one's load time (from the file
            to the first features); methods from --export-methods (default upm: LAM + GAM)
  evaluate  evaluator seconds and peak memory at MARS size (`benchmark/evaluation.py`)
  memory    peak memory of extraction and evaluation at MARS size (`benchmark/memory.py`;
            not in the default sections: it writes several GB under --memory-workdir)
  splits    seconds per split-step of splits trained side by side in one step
            (config.train.parallel_splits: --parallel-splits counts) against one split's
            step, wall and CPU (not in the default sections)
  compile   the config's training step and extraction function compiled ahead of time for
            --targets (TPU topologies, an H100) with its own models, shapes and batch:
            FLOPs, bytes, memory, collectives, precisions and the roofline per device
            (`benchmark/compile.py`; not in the default sections; needs the `aot` extra)

Every row names the device kind, the JAX version, the dtype and the batch size. Warm-up
(compilation and the first steps) is excluded; each figure is the median of several
repeats, with the spread (min, max) beside it.
"""
import argparse
import json
import os
import resource
import statistics
import tempfile
import time

if __name__ == "__main__":   # as the run's entry point does (UPM_JAX_MALLOC=default: not)
    from upm_jax import host_malloc
    host_malloc.reexec_with_huge_pages()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from upm_jax import config as config_lib  # noqa: E402
from upm_jax import data as data_lib  # noqa: E402
from upm_jax import extract as extract_lib  # noqa: E402
from upm_jax import methods  # noqa: E402
from upm_jax import parallel  # noqa: E402
from upm_jax.benchmark import hlo  # noqa: E402
from upm_jax.data import FrameTable  # noqa: E402
from upm_jax.files import atomic_write  # noqa: E402
from upm_jax.training import state as state_lib  # noqa: E402
from upm_jax.training import trainer as trainer_lib  # noqa: E402

# Dense peak FLOP/s per chip by device kind (vendor figures, no sparsity), for MFU.
PEAK_FLOPS = {
    "NVIDIA H100": {"bfloat16": 989e12, "float32": 67e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 67e12},
    "NVIDIA A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
}
# HBM bandwidth per chip by device kind (vendor figures), for the roofline.
HBM_BANDWIDTH = {"NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12, "NVIDIA A100": 2.0e12,
                 "TPU v4": 1.2e12, "TPU v5 lite": 819e9, "TPU v5p": 2.765e12,
                 "TPU v6 lite": 1.64e12}
HEADS = {"dal": "dal", "upm_local": "local", "upm_global": "global"}
METHOD_OF_HEAD = {head: method for method, head in HEADS.items()}
# The resident training set the train section samples from (PRID2011-like: 2 cameras).
_FRAMES, _TRACKLETS_PER_CAMERA = 4096, (89, 89)


def roofline_per_s(flops, moved, dtype):
    """1 / max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) of one device's step: the most
    steps/s this chip could run (None for a device without figures here)."""
    bandwidth = next((b for prefix, b in HBM_BANDWIDTH.items()
                      if jax.devices()[0].device_kind.startswith(prefix)), None)
    peak = peak_flops(dtype)
    if not (bandwidth and peak and flops and moved):
        return None
    return 1.0 / max(flops / peak, moved / bandwidth)


def peak_flops(dtype):
    kind = jax.devices()[0].device_kind
    for prefix, peaks in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return peaks[dtype]
    return None


def timed(fn, repeats):
    """Median, min and max seconds of `fn()` over `repeats` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def row_base(dtype, batch):
    return dict(device=jax.devices()[0].device_kind, devices=jax.device_count(),
                jax=jax.__version__, dtype=dtype, batch=batch)


def bench_config(backbone, head, dtype, batch, args):
    """`--config` with the benchmarked backbone, method, dtype, batch and image size."""
    config = (config_lib.load_config_file(args.config) if args.config
              else config_lib.get_base_config())
    config.method = METHOD_OF_HEAD[head]
    config.model.backbone = backbone
    config.model.dtype = dtype
    config.model.n_part = args.n_part
    if backbone != "mobilenet_v1":
        config.model.depth_multiplier = 1.0
    elif args.depth_multiplier:
        config.model.depth_multiplier = args.depth_multiplier
    config.train.batch_size = batch
    config.data.image_size = args.image_size
    return config


def build(backbone, head, dtype, args):
    return methods.build_model(bench_config(backbone, head, dtype, 64, args), head)


def _training_table():
    """A training table of _FRAMES frames over _TRACKLETS_PER_CAMERA tracklets (its paths
    are never read: the frames are random and resident)."""
    rng = np.random.default_rng(0)
    cameras = np.repeat(np.arange(len(_TRACKLETS_PER_CAMERA)), _TRACKLETS_PER_CAMERA)
    tracklet = np.sort(rng.integers(0, len(cameras), _FRAMES)).astype(np.int32)
    return FrameTable(
        path=np.asarray([f"frame_{i}.png" for i in range(_FRAMES)]), tracklet=tracklet,
        frame=np.arange(_FRAMES, dtype=np.int32), tracklet_camera=cameras.astype(np.int32),
        tracklet_pid=np.arange(1, len(cameras) + 1, dtype=np.int32),
        tracklet_index=np.concatenate([np.arange(n) for n in _TRACKLETS_PER_CAMERA]).astype(
            np.int32), num_cameras=len(_TRACKLETS_PER_CAMERA))


def _train_setup(backbone, head, batch, dtype, args, mesh):
    config = bench_config(backbone, head, dtype, batch, args)
    table = _training_table()
    trainer = trainer_lib.make_trainer(config, head, table, mesh, load_weights=False)
    height, width = trainer.image_shape
    rng = np.random.default_rng(0)
    resident = {
        "image": rng.integers(0, 256, (_FRAMES, height, width, 3), dtype=np.uint8),
        "track": table.track, "camera": table.camera,
    }
    resident = jax.device_put(resident, parallel.replicated(mesh))
    batches = [{"index": jax.device_put(rng.integers(0, _FRAMES, batch).astype(np.int32),
                                        parallel.batch_sharding(mesh))} for _ in range(8)]
    return trainer, resident, batches


def bench_train(backbone, head, batch, dtype, args, mesh):
    """Steps/s of the full training step with the on-device dataset."""
    trainer, resident, batches = _train_setup(backbone, head, batch, dtype, args, mesh)
    state, step_fn, schedule = trainer.state, trainer.step_fn, trainer.schedule
    lowered = step_fn.lower(state, schedule, batches[0], resident)
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost and mesh.devices.flat[0].platform == "gpu":   # XLA:GPU has no cost analysis
        try:
            cost = hlo.gpu_cost(compiled, lowered, mesh.size)
        except (AttributeError, ImportError) as e:   # XLA's private bindings moved
            print(f"note: no cost analysis of the GPU step with jax {jax.__version__} ({e}): "
                  "no FLOPs, MFU or roofline in this row", flush=True)
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    moved = float(cost.get("bytes accessed", 0.0)) if cost else 0.0
    memory = compiled.memory_analysis()  # XLA's buffer assignment of one step, per device
    holder = {"state": state, "usage": []}

    def run_steps():
        before = resource.getrusage(resource.RUSAGE_SELF)
        s = holder["state"]
        for i in range(args.steps):
            s, metrics = step_fn(s, schedule, batches[i % len(batches)], resident)
        jax.block_until_ready(metrics["loss"])
        holder["state"] = s
        after = resource.getrusage(resource.RUSAGE_SELF)
        holder["usage"].append((after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt))

    median, low, high = timed(run_steps, args.repeats)
    kernel_s, faults = np.median(np.asarray(holder["usage"][1:]), axis=0) / args.steps  # no warm-up
    steps_per_s = args.steps / median
    peak = peak_flops(dtype)
    return dict(row_base(dtype, batch), section="train", backbone=backbone,
                method=METHOD_OF_HEAD[head],
                steps_per_s=steps_per_s, frames_per_s=steps_per_s * batch,
                steps_per_s_range=[args.steps / high, args.steps / low],
                flops_per_step=flops,
                mfu=(flops * steps_per_s / (peak * jax.device_count())) if peak and flops
                else None,
                roofline_steps_per_s=roofline_per_s(flops, moved, dtype),
                xla_temp_mb=memory.temp_size_in_bytes / 2**20 if memory else None,
                xla_argument_mb=memory.argument_size_in_bytes / 2**20 if memory else None,
                kernel_s_per_step=float(kernel_s), minor_faults_per_step=float(faults),
                glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))


def bench_splits(backbone, head, batch, dtype, args, mesh):
    """Seconds (wall and this process's CPU) per split-step: splits side by side in one step
    (config.train.parallel_splits, `training/side_by_side.py`) against one split's step, as
    splits one after another run it, on the train section's resident set."""
    from upm_jax.training import side_by_side  # noqa: PLC0415
    config = bench_config(backbone, head, dtype, batch, args)
    table = _training_table()
    trainer = trainer_lib.make_trainer(config, head, table, mesh, load_weights=False)
    height, width = trainer.image_shape
    image = np.random.default_rng(0).integers(0, 256, (_FRAMES, height, width, 3), np.uint8)
    counts = [int(n) for n in args.parallel_splits.split(",")]

    def measure(advance, splits):
        """(wall, CPU) seconds per split-step of `advance(step)` over args.steps steps."""
        usage = []

        def run_steps():
            before = resource.getrusage(resource.RUSAGE_SELF)
            for step in range(args.steps):
                metrics = advance(step)
            jax.block_until_ready(metrics["loss"])
            after = resource.getrusage(resource.RUSAGE_SELF)
            usage.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)

        median, _, _ = timed(run_steps, args.repeats)
        return median / args.steps / splits, float(np.median(usage[1:])) / args.steps / splits

    seconds = {}
    # the groups first: the one split's step then donates the trainer's state
    for count in sorted(set(counts) - {1}, reverse=True):
        group = side_by_side.SplitGroup(config, [trainer] * count, mesh)
        group.place_resident(parallel.replicate(image, group.mesh), [np.arange(_FRAMES)] * count,
                             [table.track] * count, [table.camera] * count)
        seconds[count] = measure(group.step, count)
        group = None
    resident = parallel.replicate({"image": image, "track": table.track,
                                   "camera": table.camera}, mesh)
    indices = data_lib.resident_batches(_FRAMES, global_batch=batch, seed=config.seed,
                                        mesh=mesh)

    def one_split(step):
        del step   # the next batch, drawn on the host as in a run
        trainer.state, metrics = trainer.step_fn(trainer.state, trainer.schedule, next(indices),
                                                 resident)
        return metrics

    seconds[1] = measure(one_split, 1)
    alone = seconds[1][0]
    return [dict(row_base(dtype, batch), section="splits", backbone=backbone,
                 method=METHOD_OF_HEAD[head], image_size=args.image_size,
                 depth_multiplier=config.model.depth_multiplier, splits=count,
                 seconds_per_split_step=seconds[count][0],
                 cpu_seconds_per_split_step=seconds[count][1],
                 speedup_over_one_after_another=alone / seconds[count][0],
                 load_average_1min=os.getloadavg()[0])
            for count in counts]


def largest_batch(backbone, head, dtype, args, mesh):
    """The largest power-of-two batch (>= 64) whose training step compiles and runs."""
    batch, best = 64, None
    while batch <= args.max_batch_limit:
        try:
            trainer, resident, batches = _train_setup(backbone, head, batch, dtype, args, mesh)
            trainer.state, metrics = trainer.step_fn(trainer.state, trainer.schedule,
                                                     batches[0], resident)
            jax.block_until_ready(metrics["loss"])
            best = batch
        except Exception as e:  # XLA reports running out of memory as a runtime error.
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            break
        finally:
            trainer = resident = batches = None
        batch *= 2
    return best


def bench_extract(backbone, head, batch, dtype, args, mesh):
    """Extraction frames/s: device-resident frames vs the host pipeline from files."""
    model = build(backbone, head, dtype, args)
    height, width = args.image_size, args.image_size // 2
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, height, width, 3)),
                                             train=False))(jax.random.PRNGKey(0))
    feature_fn = extract_lib.make_feature_fn(model, mesh)
    images = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8),
        parallel.batch_sharding(mesh))

    def device_input():
        for _ in range(args.steps):
            out = feature_fn(variables, images)
        jax.block_until_ready(out)

    median, low, high = timed(device_input, args.repeats)
    rows = [dict(row_base(dtype, batch), section="extract", backbone=backbone,
                method=METHOD_OF_HEAD[head],
                 input="on-device", frames_per_s=args.steps * batch / median,
                 frames_per_s_range=[args.steps * batch / high, args.steps * batch / low])]
    rows.append(_bench_extract_host(model, variables, batch, dtype, args, mesh, backbone, head))
    return rows


def _bench_extract_host(model, variables, batch, dtype, args, mesh, backbone, head):
    from upm_jax.data import synthetic
    from upm_jax import data as data_lib
    with tempfile.TemporaryDirectory() as root:
        synthetic.generate("prid2011", root, ids=args.extract_ids, seed=0)
        dataset = data_lib.load_dataset("prid2011", root, split=1,
                                        split_file=synthetic.split_file(root))
        table = dataset.test

        frames = data_lib.RawFrames(table.path, args.image_size)

        def host_input():
            extract_lib.extract_frame_features(model, variables, frames, mesh=mesh,
                                               batch_size=batch)

        median, low, high = timed(host_input, max(1, args.repeats // 2))
    frames = len(table.path)
    return dict(row_base(dtype, batch), section="extract", backbone=backbone,
                method=METHOD_OF_HEAD[head],
                input="host pipeline (PNG files)", frames_per_s=frames / median,
                frames_per_s_range=[frames / high, frames / low])


def bench_export(backbone, method, dtype, args):
    """Rows of upm_jax's extraction and of each --export-formats artifact of `method`'s
    models (random weights), one --extract-batch of random frames at a time, one device."""
    from upm_jax.export import artifact  # noqa: PLC0415
    from upm_jax.extractor import Extractor, TrainedModel  # noqa: PLC0415

    batch = args.extract_batch
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    models = []
    for i, (name, head) in enumerate(methods.METHODS[method]):
        model = build(backbone, head, dtype, args)
        variables = state_lib.init_variables(model, jax.random.PRNGKey(i), mesh=mesh,
                                             image_shape=methods.image_shape(
                                                 bench_config(backbone, head, dtype, batch, args)))
        models.append(TrainedModel(name, head, None, model, variables))
    extractor = Extractor(models, image_size=args.image_size, batch_size=batch, mesh=mesh)
    height, width = extractor.image_shape
    frames = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), np.uint8)
    base = dict(row_base(dtype, batch), devices=1, section="export", backbone=backbone,
                method=method)

    def row(runtime, fmt, run, load_s, size=None):
        median, low, high = timed(lambda: [run(frames) for _ in range(args.steps)], args.repeats)
        rate = args.steps * batch
        return dict(base, runtime=runtime, format=fmt, load_s=load_s, bytes=size,
                    frames_per_s=rate / median, frames_per_s_range=[rate / high, rate / low])

    start = time.perf_counter()
    reference = extractor(frames)
    rows = [row("upm_jax (jit)", "", extractor, time.perf_counter() - start)]
    runtimes = {"stablehlo": "jax.export reloaded", "onnx": "onnxruntime",
                "savedmodel": "TensorFlow"}
    with tempfile.TemporaryDirectory() as folder:
        for fmt in args.export_formats.split(","):
            module = artifact.format_module(fmt)
            path = os.path.join(folder, f"features.{fmt}")
            module.write(extractor, path)
            start = time.perf_counter()
            run = module.open_artifact(path)
            got = run(frames)
            rows.append(dict(row(runtimes[fmt], fmt, run, time.perf_counter() - start,
                                 artifact.artifact_bytes(path)),
                             error=artifact.feature_error(got, reference)))
    return rows


def bench_input(args):
    from upm_jax.benchmark import input as input_bench  # noqa: PLC0415
    records = input_bench.decode_resize_throughput(min_seconds=args.input_seconds)
    pipeline = input_bench.pipeline_throughput(
        ids=args.input_ids, image_size=args.image_size, batch=args.input_batch,
        worker_counts=[int(w) for w in args.input_workers.split(",")],
        min_seconds=args.input_seconds, folder=args.input_dir or None)
    records += pipeline + input_bench.config_needs(pipeline)
    return [dict(row_base("uint8", r.get("batch", 1)), section="input", cpu_cores=os.cpu_count(),
                 **{k: v for k, v in r.items() if k != "batch"}) for r in records]


def bench_evaluate(args):
    from upm_jax.benchmark import evaluation as evaluation_bench  # noqa: PLC0415
    sizes = ((1, 1024), (8, 1280))
    results = evaluation_bench.mars_size_benchmark(
        evaluate_sizes=sizes, rerank_sizes=sizes if args.rerank else (), verbose=False)
    return [dict(row_base("float32", 0), section="evaluate", **r) for r in results]


def bench_memory(args):
    from upm_jax.benchmark import memory as memory_bench  # noqa: PLC0415
    if not args.memory_workdir:
        raise SystemExit("error: --sections memory needs --memory-workdir (a folder with a few "
                         "GB free)")
    records = memory_bench.mars_memory(args.memory_workdir, frames=args.memory_frames)
    return [dict(row_base(r["features"].split()[-1], 0), section="memory", **r)
            for r in records]


def format_table(rows):
    lines = []
    for row in rows:
        keys = [k for k in row if k not in ("device", "jax", "devices")]
        text = ", ".join(f"{k}={_fmt(row[k])}" for k in keys)
        lines.append(f"[{row['device']} x{row['devices']}, jax {row['jax']}] {text}")
    return "\n".join(lines)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m upm_jax.benchmark",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="train,extract,input,evaluate")
    parser.add_argument("--backbones", default="mobilenet_v1,resnet_v1_50")
    parser.add_argument("--heads", default="dal,upm_local,upm_global")
    parser.add_argument("--batches", default="64,max",
                        help="comma list of global batch sizes; 'max' searches the largest")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--n-part", type=int, default=8)
    parser.add_argument("--depth-multiplier", type=float, default=1.0,
                        help="MobileNet v1 width (0: the config's)")
    parser.add_argument("--config", default="",
                        help="config file whose training settings are timed (default: the "
                        "base config, the papers' uPMnet settings)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-batch-limit", type=int, default=4096)
    parser.add_argument("--extract-ids", type=int, default=40,
                        help="synthetic PRID-layout ids for the host extraction figure")
    parser.add_argument("--extract-batch", type=int, default=512)
    parser.add_argument("--input-ids", type=int, default=20,
                        help="input section: synthetic PRID-layout ids the pipeline reads")
    parser.add_argument("--input-workers", default="0,1,2",
                        help="input section: grain worker counts to measure")
    parser.add_argument("--input-batch", type=int, default=64)
    parser.add_argument("--input-seconds", type=float, default=3.0,
                        help="input section: seconds each rate is measured over")
    parser.add_argument("--input-dir", default="",
                        help="input section: folder for its frames and prepared set "
                             "(default: the system's temporary folder)")
    parser.add_argument("--export-methods", default="upm",
                        help="export section: methods whose models are exported together")
    parser.add_argument("--export-formats", default="stablehlo,onnx,savedmodel",
                        help="export section: the formats timed")
    parser.add_argument("--rerank", action="store_true", help="also time re-ranking")
    parser.add_argument("--memory-workdir", default="",
                        help="memory section: a folder for its frames and features files")
    parser.add_argument("--memory-frames", type=int, default=681089,
                        help="memory section: test frames (MARS has 681,089)")
    parser.add_argument("--targets", default="v5e:1x1,v5e:2x2,v4:2x2x1,h100",
                        help="compile section: targets (benchmark/compile.py TARGETS)")
    parser.add_argument("--precisions", default="",
                        help="compile section: comma list of model.matmul_precision values "
                        "(default: the config's)")
    parser.add_argument("--compile-steps", default="train,extract",
                        help="compile section: which of the config's steps to compile")
    parser.add_argument("--train-set", default="",
                        help="compile section: FRAMES:T1,T2,... training frames and tracklets "
                        "per camera, for a dataset upm_jax ships no protocol file of")
    parser.add_argument("--parallel-splits", default="1",
                        help="compile and splits sections: comma list of how many splits train "
                        "side by side (config.train.parallel_splits)")
    parser.add_argument("--shared-frames", type=int, default=0,
                        help="compile section: resident frames of splits side by side (default: "
                        "bounded by the protocol's frames, benchmark/compile.py)")
    parser.add_argument("--out", default="benchmark.json")
    return parser.parse_args(argv)


def bench_compile(args):
    from upm_jax.benchmark import compile as compile_bench  # noqa: PLC0415
    if not args.config:
        raise SystemExit("error: --sections compile needs --config (the experiment whose "
                         "steps are compiled)")
    config = config_lib.load_config_file(args.config)
    name = os.path.splitext(os.path.basename(args.config.partition(":")[0]))[0]
    rows = []
    for row in compile_bench.compile_rows(
            config, config_name=name, targets=args.targets.split(","),
            dtypes=args.dtypes.split(","),
            precisions=[p for p in args.precisions.split(",") if p],
            train_set=args.train_set, steps=args.compile_steps.split(","),
            parallel_splits=[int(n) for n in args.parallel_splits.split(",")],
            shared_frames=args.shared_frames):
        print(compile_bench.format_row(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(argv)
    sections = args.sections.split(",")
    if sections == ["compile"] and not os.environ.get("JAX_PLATFORMS"):
        # compiles only: the host's own accelerator plugins need not start
        jax.config.update("jax_platforms", "cpu")
    mesh = parallel.make_mesh()
    rows = []

    def emit(new_rows):
        rows.extend(new_rows)
        print(format_table(new_rows), flush=True)

    for backbone in args.backbones.split(","):
        for method in args.heads.split(","):
            head = HEADS[method]
            for dtype in args.dtypes.split(","):
                if "train" in sections:
                    for batch in args.batches.split(","):
                        if batch == "max":
                            size = largest_batch(backbone, head, dtype, args, mesh)
                            if size is None:
                                continue
                        else:
                            size = int(batch)
                        row = bench_train(backbone, head, size, dtype, args, mesh)
                        row["largest_batch"] = batch == "max"
                        emit([row])
                if "extract" in sections:
                    emit(bench_extract(backbone, head, args.extract_batch, dtype, args, mesh))
                if "splits" in sections:
                    emit(bench_splits(backbone, head, int(args.batches.split(",")[0]), dtype,
                                      args, mesh))
    if "export" in sections:
        for backbone in args.backbones.split(","):
            for method in args.export_methods.split(","):
                for dtype in args.dtypes.split(","):
                    emit(bench_export(backbone, method, dtype, args))
    if "input" in sections:
        emit(bench_input(args))
    if "evaluate" in sections:
        emit(bench_evaluate(args))
    if "memory" in sections:
        emit(bench_memory(args))
    if "compile" in sections:
        rows.extend(bench_compile(args))
    atomic_write(args.out, lambda f: json.dump(rows, f, indent=2), mode="w")
    print(f"wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
