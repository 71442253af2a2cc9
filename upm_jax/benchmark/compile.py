"""The `compile` section of the benchmark: the training step and the extraction function of
a config compiled ahead of time for a TPU topology or an H100, on a host without either.

    JAX_PLATFORMS=cpu python -m upm_jax.benchmark --sections compile --config configs/prid.py \
        --targets v5e:1x1,v5e:2x2,v4:2x2x1,h100 --dtypes float32,bfloat16

Everything comes from the run's own factories with the config's real shapes, dtypes and
shardings (`training.trainer.make_trainer(abstract=True)`: jax.eval_shape and
ShapeDtypeStructs carrying NamedShardings on the target's mesh; `extract.make_feature_fn`);
nothing is allocated. Each row gives, per device: XLA's FLOPs and bytes accessed, the
argument / temporary / peak memory against the device's HBM, the collectives (kind, count,
bytes), host transfers, convolutions and precisions in the optimized module, and the
roofline lower bound: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), as time and steps/s,
and whether the step is compute- or memory-bound.

Targets need the `aot` extra: libtpu (TPU topologies, compile-only devices) and the CUDA
plugin with nvcc's ptxas and libdevice (`pip install -e ".[aot]"`).
"""
import dataclasses
import importlib
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp

from upm_jax import data as data_lib
from upm_jax import extract
from upm_jax import methods
from upm_jax import parallel
from upm_jax.benchmark import hlo
from upm_jax.data import synthetic
from upm_jax.training import side_by_side
from upm_jax.training import state as state_lib
from upm_jax.training import trainer as trainer_lib

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target and the published figures of one of its chips (dense, per chip)."""

    platform: str          # "tpu" | "cuda"
    topology: str          # jax.experimental.topologies.get_topology_desc's topology name
    options: tuple         # further get_topology_desc arguments, as (key, value) pairs
    device: str            # what it stands for
    hbm_bytes: float
    hbm_bytes_per_s: float
    bf16_flops: float
    f32_flops: tuple       # ((matmul_precision, FLOP/s of float32 products), ...)


# TPU chips compute float32 products as bfloat16 passes: 6 at 'highest', 3 at 'high', 1
# at 'default'. Figures: Google Cloud's TPU v5e and v4 system architecture pages; NVIDIA's
# H100 Tensor Core GPU datasheet (SXM5: FP32 67 TFLOP/s, TF32 and BF16 Tensor Cores 494.7 and
# 989.4 TFLOP/s without sparsity, 80 GB HBM3 at 3.35 TB/s).
_TPU_PASSES = (("highest", 6), ("high", 3), ("default", 1))
TARGETS = {
    "v5e:1x1": Target("tpu", "v5e:1x1", (("chips_per_host_bounds", (1, 1, 1)),),
                      "TPU v5e, 1 chip", 16 * GIB, 819e9, 197e12,
                      tuple((p, 197e12 / n) for p, n in _TPU_PASSES)),
    "v5e:2x2": Target("tpu", "v5e:2x2", (), "TPU v5e, 4 chips (2x2)", 16 * GIB, 819e9, 197e12,
                      tuple((p, 197e12 / n) for p, n in _TPU_PASSES)),
    "v4:2x2x1": Target("tpu", "v4:2x2x1", (("chip_config_name", "megacore"),),
                       "TPU v4, 4 chips (2x2x1, megacore)", 32 * GIB, 1200e9, 275e12,
                       tuple((p, 275e12 / n) for p, n in _TPU_PASSES)),
    "h100": Target("cuda", "1x1x1", (), "NVIDIA H100 SXM 80GB", 80 * GIB, 3.35e12, 989.4e12,
                   (("highest", 66.9e12), ("high", 494.7e12), ("default", 494.7e12))),
}


def h100_target_config():
    """The GpuTargetConfigProto (text form) XLA compiles for, describing an H100 SXM5.

    Written for upm_jax from NVIDIA's published figures of the H100 SXM5 (the H100
    datasheet and Hopper architecture whitepaper; the CUDA C++ Programming Guide's table for
    compute capability 9.0): 132 SMs of 128 FP32 cores at a 1.98 GHz boost clock, 80 GB of
    HBM3 at 3.35 TB/s, a 50 MB L2, 228 KiB of shared memory per SM of which 227 KiB can go to
    one block (48 KiB without opting in), 64 Ki 32-bit registers per SM and per block, 2048
    threads per SM, 1024 per block, warps of 32, grids up to 2^31-1 x 65535 x 65535 blocks.
    The CUDA and cuDNN versions are those the installed CUDA plugin was built with.
    """
    try:
        versions = importlib.import_module("jax_cuda12_plugin._versions")
    except ImportError as e:
        raise SystemExit("error: the h100 target needs the CUDA plugin: pip install -e "
                         "\".[aot]\" (jax-cuda12-plugin, jax-cuda12-pjrt, nvidia-cuda-nvcc-cu12)"
                         ) from e
    cuda, cudnn = versions.cuda_runtime_build_version(), versions.cudnn_build_version()
    info = {
        "threads_per_block_limit": 1024, "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024, "shared_memory_per_core": 228 * 1024,
        "shared_memory_per_block_optin": 227 * 1024, "threads_per_core_limit": 2048,
        "core_count": 132, "fpus_per_core": 128, "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
        "memory_bandwidth": int(TARGETS["h100"].hbm_bytes_per_s),
        "l2_cache_size": 50 * 2**20, "clock_rate_ghz": 1.98,
        "device_memory_size": int(TARGETS["h100"].hbm_bytes),
        "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
    }
    fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n"
            f'platform_name: "CUDA"\n'
            f"dnn_version_info {{ major: {cudnn // 10000} minor: {cudnn // 100 % 100} }}\n"
            f"runtime_version {{ major: {cuda // 1000} minor: {cuda // 10 % 100} }}\n"
            f'device_description_str: "NVIDIA H100 80GB HBM3"\n')


def target_mesh(name):
    """The data-parallel mesh over the compile-only devices of target `name`."""
    from jax.experimental import topologies  # noqa: PLC0415

    if name not in TARGETS:
        raise SystemExit(f"error: --targets {name!r}: expected one of {sorted(TARGETS)}")
    target = TARGETS[name]
    if target.platform == "cuda":
        topology = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                                target_config=h100_target_config())
    else:
        if importlib.util.find_spec("libtpu") is None:
            raise SystemExit(f"error: the {name} target needs libtpu: pip install -e \".[aot]\"")
        # libtpu takes a lock file per process; compile-only use never opens a chip, so a
        # second process (another compile, a test) may load it too
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        topology = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                                **dict(target.options))
    return parallel.make_mesh(topology.devices)


def train_set_shape(config, override=""):
    """The training set's frame and tracklet counts that shape the step: `override`
    ("FRAMES:T1,T2,..."), else the dataset folder when present (or the synthetic set the
    config generates), else the protocol files shipped with upm_jax; frames of the largest
    of the config's splits, as a run pads its resident frames to them."""
    if override:
        frames, _, tracklets = override.partition(":")
        try:
            return trainer_lib.TrainSetShape(int(frames),
                                             tuple(int(t) for t in tracklets.split(",")))
        except ValueError:
            raise SystemExit(f"error: --train-set {override!r}: expected FRAMES:T1,T2,... (the "
                             "training frames and the tracklets of each camera)") from None
    if config.data.root and os.path.isdir(config.data.root):
        return _shape_on_disk(config, config.data.root, config.data.split_file)
    if config.data.synthetic_ids:   # the set the run would generate, generated here
        with tempfile.TemporaryDirectory() as root:
            synthetic.generate(config.data.layout, root, ids=config.data.synthetic_ids,
                               seed=config.data.synthetic_seed)
            return _shape_on_disk(config, root, synthetic.split_file(root))
    try:
        sets = data_lib.protocol_training_sets(config.data.layout, config.data.splits)
    except data_lib.DatasetError as e:
        raise SystemExit(f"error: {e}: give --train-set FRAMES:T1,T2,... or a config whose "
                         f"data.root ({config.data.root!r}) holds the dataset") from None
    frames, tracklets = max(sets)
    return trainer_lib.TrainSetShape(frames, tracklets)


def _shape_on_disk(config, root, split_file):
    """The shape a run of the config's splits trains with: its resident frames are padded
    to its largest split (run.py), its anchor memory is the first split's."""
    split_file = split_file or None
    plan = data_lib.resolve_splits(config.data.layout, root, config.data.splits, split_file)
    dataset = data_lib.load_dataset(config.data.layout, root, split=plan.numbers[0],
                                    split_file=split_file, splits=config.data.splits)
    return trainer_lib.TrainSetShape(
        max(plan.train_frames.values(), default=dataset.train.num_frames),
        tuple(dataset.train.tracklets_per_camera))


def peak_flops(target, dtype, precision):
    """FLOP/s of one chip for products of `dtype` at `precision`."""
    return target.bf16_flops if dtype == "bfloat16" else dict(target.f32_flops)[precision]


def _resident_layout(compiled, rows, image_shape):
    """How the executable lays out the resident uint8 frames [N, H, W, 3]: its layout text
    and the padded bytes of that layout over the logical bytes (1.0 = no padding)."""
    shape = (rows, *image_shape, 3)
    for fmt, aval in zip(jax.tree.leaves(compiled.input_formats),
                         jax.tree.leaves(compiled.in_avals)):
        if tuple(aval.shape) == shape and aval.dtype == jnp.uint8:
            layout = fmt.layout
            physical = [shape[d] for d in layout.major_to_minor]
            if layout.tiling:
                tile = layout.tiling[0]
                for k, size in enumerate(reversed(tile)):
                    physical[-1 - k] = -(-physical[-1 - k] // size) * size
            return str(layout), math.prod(physical) / math.prod(shape)
    return None, None


def analyse(compiled, lowered, target, *, dtype, precision, batch, num_devices):
    """The row fields of one compiled executable (per device, see the module docstring)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost:   # XLA:GPU has no cost analysis of its executables
        cost = hlo.gpu_cost(compiled, lowered, num_devices)
    flops, moved = float(cost["flops"]), float(cost["bytes accessed"])
    memory = compiled.memory_analysis()
    stats = hlo.summary(compiled.as_text())
    compute_s = flops / peak_flops(target, dtype, precision)
    memory_s = moved / target.hbm_bytes_per_s
    bound = max(compute_s, memory_s)
    peak = memory.peak_memory_in_bytes or (memory.argument_size_in_bytes
                                           + memory.output_size_in_bytes
                                           - memory.alias_size_in_bytes
                                           + memory.temp_size_in_bytes)
    return dict(
        gflops=flops / 1e9, gb_accessed=moved / 1e9,
        argument_mb=memory.argument_size_in_bytes / 2**20,
        temp_mb=memory.temp_size_in_bytes / 2**20, peak_mb=peak / 2**20,
        code_mb=memory.generated_code_size_in_bytes / 2**20,
        hbm_mb=target.hbm_bytes / 2**20, fits=peak <= target.hbm_bytes,
        collectives={k: {"count": v["count"], "mb": v["bytes"] / 2**20}
                     for k, v in stats["collectives"].items()},
        host_transfers=stats["host_transfers"], convolutions=stats["convolutions"],
        operand_precision=stats["operand_precision"], copies=stats["copies"],
        memory_space_copies=stats["memory_space_copies"], transposes=stats["transposes"],
        roofline_ms=bound * 1e3, roofline_per_s=1 / bound if bound else None,
        roofline_frames_per_s=batch / bound if bound else None,
        bound="compute" if compute_s >= memory_s else "memory")


def compile_train(config, head, mesh, train_set, target):
    """(row fields, compiled, lowered) of the config's training step for `head`."""
    trainer = trainer_lib.make_trainer(config, head, train_set, mesh, abstract=True)
    batch, dataset = trainer.input_shapes()
    start = time.perf_counter()
    lowered = trainer.step_fn.lower(trainer.state, trainer.schedule, batch, dataset)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    row = analyse(compiled, lowered, target, dtype=config.model.dtype,
                  precision=config.model.matmul_precision, batch=config.train.batch_size,
                  num_devices=mesh.size)
    row.update(step="train", batch=config.train.batch_size, compile_s=seconds)
    if dataset is not None:
        layout, padding = _resident_layout(compiled, train_set.num_frames, trainer.image_shape)
        row.update(resident_frames=train_set.num_frames, resident_layout=layout,
                   resident_padding=padding)
    return row, compiled, lowered


def compile_split_train(config, head, mesh, train_set, target, num_splits, shared_frames):
    """(row fields, compiled, lowered) of the training step of `num_splits` splits side by
    side (`training.side_by_side`) holding `shared_frames` resident frames, with the memory
    it leaves for more splits: per split-step figures are the row's over `num_splits`."""
    trainer = trainer_lib.make_trainer(config, head, train_set, mesh, abstract=True)
    group = side_by_side.SplitGroup(config, [trainer] * num_splits, mesh, abstract=True)
    index, tables, image = group.input_shapes(shared_frames, rows=train_set.num_frames)
    start = time.perf_counter()
    lowered = group.step_fn.lower(group.state, group.schedule, index, tables, image)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    batch = config.train.batch_size
    row = analyse(compiled, lowered, target, dtype=config.model.dtype,
                  precision=config.model.matmul_precision, batch=batch * num_splits,
                  num_devices=mesh.size)
    frames_mb = math.prod(image.shape) / 2**20   # replicated: on every device
    # the rest of the peak grows with the splits a device holds: an estimate of how many fit
    per_split_mb = (row["peak_mb"] - frames_mb) / (num_splits / group.mesh.shape["split"])
    row.update(step="train", batch=batch, splits=num_splits, compile_s=seconds,
               split_mesh=dict(group.mesh.shape), resident_frames=shared_frames,
               resident_mb=frames_mb, per_split_mb=per_split_mb,
               roofline_ms_per_split_step=row["roofline_ms"] / num_splits,
               splits_fit=int((row["hbm_mb"] - frames_mb) // per_split_mb) * group.mesh.shape[
                   "split"])
    return row, compiled, lowered


def compile_extract(config, head, mesh, target):
    """(row fields, compiled, lowered) of the config's extraction function for `head`."""
    model = methods.build_model(config, head)
    image_shape = methods.image_shape(config)
    variables = state_lib.abstract_variables(model, image_shape=image_shape, mesh=mesh)
    batch = extract.extraction_batch(config, mesh)
    images = jax.ShapeDtypeStruct((batch, *image_shape, 3), jnp.uint8,
                                  sharding=parallel.batch_sharding(mesh))
    start = time.perf_counter()
    lowered = extract.make_feature_fn(model, mesh).lower(variables, images)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    row = analyse(compiled, lowered, target, dtype=config.model.dtype,
                  precision=config.model.matmul_precision, batch=batch, num_devices=mesh.size)
    row.update(step="extract", batch=batch, compile_s=seconds)
    return row, compiled, lowered


def shared_frames_bound(config, train_set, num_splits, override=0):
    """The resident frames of `num_splits` splits side by side: `override`, else at most
    num_splits times the largest split's frames and at most every frame of the protocol's
    persons (`data.protocol_frames`), which ten PRID2011 or iLIDS-VID splits nearly reach."""
    if override:
        return int(override)
    try:
        every = data_lib.protocol_frames(config.data.layout)
    except data_lib.DatasetError as e:
        raise SystemExit(f"error: {e}: give --shared-frames N") from None
    return min(num_splits * train_set.num_frames, every)


def compile_rows(config, *, config_name, targets, dtypes, precisions, train_set="",
                 steps=("train", "extract"), parallel_splits=(1,), shared_frames=0):
    """Yields one row per (target, model of the method, dtype, precision, step; for the
    training step, per count of `parallel_splits`), each as soon as it is compiled."""
    shape = train_set_shape(config, train_set)
    for name in targets:
        mesh = target_mesh(name)
        target = TARGETS[name]
        for _, head in methods.METHODS[config.method]:
            for dtype in dtypes:
                for precision in precisions or [config.model.matmul_precision]:
                    variant = config.copy_and_resolve_references()
                    variant.model.dtype = dtype
                    variant.model.matmul_precision = precision
                    base = dict(section="compile", config=config_name, method=config.method,
                                head=head, target=name, device=target.device,
                                devices=mesh.size, jax=jax.__version__, dtype=dtype,
                                matmul_precision=precision,
                                train_set=f"{shape.num_frames}:"
                                          f"{','.join(map(str, shape.tracklets_per_camera))}",
                                load_average_1min=os.getloadavg()[0])
                    for splits in parallel_splits if "train" in steps else ():
                        if splits == 1:
                            fields, _, _ = compile_train(variant, head, mesh, shape, target)
                        else:
                            fields, _, _ = compile_split_train(
                                variant, head, mesh, shape, target, splits,
                                shared_frames_bound(config, shape, splits, shared_frames))
                        yield dict(base, **fields)
                    if "extract" in steps:
                        fields, _, _ = compile_extract(variant, head, mesh, target)
                        yield dict(base, **fields)


def format_row(row):
    """One line of the printed table."""
    collectives = ", ".join(f"{k} x{v['count']} {v['mb']:.2f} MB"
                            for k, v in row["collectives"].items()) or "none"
    per_s = (f"{row['roofline_per_s']:.0f} steps/s" if row["step"] == "train"
             else f"{row['roofline_frames_per_s']:.0f} frames/s")
    return (f"[{row['target']} x{row['devices']}] {row['config']} {row['head']} {row['step']} "
            f"{row['dtype']}/{row['matmul_precision']} batch {row['batch']}: "
            f"{row['gflops']:.1f} GFLOP, {row['gb_accessed']:.2f} GB, peak {row['peak_mb']:.0f} "
            f"of {row['hbm_mb']:.0f} MB, code {row['code_mb']:.1f} MB; >= {row['roofline_ms']:.2f} "
            f"ms ({per_s}, {row['bound']}-bound){_splits_text(row)}; collectives: {collectives}; "
            f"precision {row['operand_precision']}; compiled in {row['compile_s']:.0f} s")


def _splits_text(row):
    """What a row of splits side by side adds to its line."""
    if row.get("splits", 1) == 1:
        return ""
    return (f"; {row['splits']} splits side by side on {row['split_mesh']}: >= "
            f"{row['roofline_ms_per_split_step']:.2f} ms per split-step, {row['resident_frames']} "
            f"shared frames ({row['resident_mb']:.0f} MB), ~{row['per_split_mb']:.0f} MB per "
            f"split: ~{row['splits_fit']} splits fit")
