"""Input throughput (the `input` section of `python -m upm_jax.benchmark`): frames/s and
frames per CPU-second of decode + resize in isolation, of the grain pipeline reading raw
files and a prepared set per worker count, and what each shipped config needs.

CPU-seconds are counted over the measuring process and its grain workers (their own
clocks, from /proc), so "per core" is frames per CPU-second whatever else the machine
runs; wall-clock rates depend on the load, which every row records.
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import tempfile
import time

import numpy as np

from upm_jax.data import images, synthetic

# Lower bounds of one training step (MobileNet v1 LAM, batch 64, bfloat16) from XLA's
# compile-time roofline of the accelerator-compile issue: compiler lower bounds, not
# measurements; a real step is slower, so the frame rates they ask for are upper bounds.
ROOFLINE_STEP_MS = {"H100 bf16": 2.7, "TPU v5e bf16": 13.1}
ROOFLINE_BATCH = 64
SHIPPED_CONFIGS = ("demo", "prid", "ilids", "mars", "dukev")


def _frames(folder: str, count: int, size: tuple, ext: str) -> list:
    """Writes `count` synthetic pedestrian frames with the generator's encoder settings."""
    paths = []
    for i in range(count):
        frame = synthetic.render(size[0], size[1], synthetic.identity(0, i),
                                 synthetic.camera(0, i % 2), synthetic.tracklet(0, (i,), 1), 0,
                                 np.random.default_rng(i))
        path = os.path.join(folder, f"{i:04d}{ext}")
        with open(path, "wb") as f:
            f.write(synthetic._encode(frame, path))
        paths.append(path)
    return paths


def _cpu_seconds(pids=()) -> float:
    """CPU-seconds (user + system) of this process's threads and of the processes `pids`."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick   # utime, stime
    return total


def _measure(fn, frames_per_call: int, min_seconds: float, pids=lambda: (),
             warm_up: int = 1) -> dict:
    """Calls fn() until min_seconds have passed (after `warm_up` calls): frames/s of the
    wall clock and per CPU-second (this process and the processes `pids()` lists), and the
    1-minute load average before."""
    for _ in range(warm_up):
        fn()
    load = os.getloadavg()[0]
    calls, watched = 0, list(pids())
    cpu, start = _cpu_seconds(watched), time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            break
    used = _cpu_seconds(watched) - cpu
    frames = calls * frames_per_call
    return {"frames_per_s": frames / elapsed,
            "frames_per_cpu_s": frames / used if used > 0 else None, "load_1min": load}


# (frame size, image_size) decoded and resized: PRID2011's and iLIDS-VID's 128x64 frames
# at the papers' 256 (upsampled), MARS's 256x128 at configs/mars.py's 224 (downsampled, as
# DukeMTMC-VideoReID's larger frames are: the streamed configs decode every step's frames).
FRAME_SHAPES = (((128, 64), 256), ((256, 128), 224))


def decode_resize_throughput(*, shapes=FRAME_SHAPES, num_images: int = 64,
                             min_seconds: float = 1.0) -> list:
    """Decode + TF1 resize of one frame at a time on one thread (`images.decode_resize`,
    what `pipeline.RawFrames` runs per frame), PNG and JPEG: one record per format and shape."""
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for in_size, image_size in shapes:
            h, w = images.image_shape(image_size)
            for fmt, ext in (("png", ".png"), ("jpeg", ".jpg")):
                folder = tempfile.mkdtemp(dir=tmp)
                paths = _frames(folder, num_images, tuple(in_size), ext)
                records.append(dict(
                    measure="decode_resize", format=fmt, in_size=list(in_size), out_size=[h, w],
                    **_measure(lambda: [images.decode_resize(p, h, w) for p in paths],
                               len(paths), min_seconds)))
    return records


def pipeline_throughput(*, ids: int = 20, image_size: int = 256, batch: int = 64,
                        worker_counts=(0, 1, 2), prefetch: int = 2, min_seconds: float = 3.0,
                        folder: str | None = None) -> list:
    """Training batches through grain (`pipeline.StepBatches`, host side) from a synthetic
    PRID2011 set of 128x64 PNGs: raw files and the prepared set, per worker count (0: the
    measuring process reads with `prefetch` threads). One record per (source, workers)."""
    from upm_jax.data import Loading, frame_source, load_dataset  # noqa: PLC0415
    from upm_jax.data import pipeline, prepared  # noqa: PLC0415
    records = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        info = synthetic.generate("prid2011", os.path.join(tmp, "release"), ids=ids, seed=0)
        table = load_dataset("prid2011", info["root"], split_file=info["split_file"]).train
        prepared.prepare("prid2011", info["root"], image_size, os.path.join(tmp, "sets"))
        for source in pipeline.SOURCES:
            frames = frame_source(table, source=source, image_size=image_size,
                                  layout="prid2011", data_dir=os.path.join(tmp, "sets"))
            steps = pipeline.StepBatches(table, frames, seed=0, global_batch=batch,
                                         local=np.arange(batch), num_steps=2**40)
            for workers in worker_counts:
                iterator = pipeline._read_ahead(steps, 0, Loading(workers, prefetch))
                try:
                    def workers_now():
                        return [p.pid for p in multiprocessing.active_children()]

                    # warm-up: every worker started and its buffer filled
                    record = _measure(lambda: next(iterator), batch, min_seconds, workers_now,
                                      warm_up=2 + prefetch * workers)
                finally:
                    iterator.close()
                records.append(dict(measure="pipeline", source=source, workers=workers,
                                    prefetch=prefetch, batch=batch, frames=table.num_frames,
                                    out_size=list(images.image_shape(image_size)), **record))
    return records


def config_needs(pipeline_records: list) -> list:
    """What each shipped config asks of the host at the roofline step rates: frames/s and
    host cores at the measured frames per CPU-second of its source (raw files by default,
    a prepared set when configured so); resident configs read every frame once, then
    sample on the device."""
    from upm_jax.config import load_config_file  # noqa: PLC0415
    configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "configs")
    best = {}
    for r in pipeline_records:
        if r["frames_per_cpu_s"]:
            best[r["source"]] = max(best.get(r["source"], 0.0), r["frames_per_cpu_s"])
    out = []
    for name in SHIPPED_CONFIGS:
        path = os.path.join(configs_dir, f"{name}.py")
        if not os.path.isfile(path):   # an installed package without the repository
            continue
        config = load_config_file(path)
        for target, step_ms in ROOFLINE_STEP_MS.items():
            steps_per_s = 1000.0 / step_ms
            frames_per_s = steps_per_s * config.train.batch_size
            row = dict(measure="config_needs", config=name, layout=config.data.layout,
                       image_size=config.data.image_size, batch=config.train.batch_size,
                       resident=bool(config.data.resident), target=target,
                       roofline_step_ms=step_ms, roofline_batch=ROOFLINE_BATCH,
                       steps_per_s_bound=steps_per_s, frames_per_s_needed=frames_per_s)
            for source, rate in best.items():
                row[f"host_cores_{source}"] = (0.0 if config.data.resident
                                               else frames_per_s / rate)
            out.append(row)
    return out
