"""Decode + TF1-resize throughput of the host pipeline (the `input` section of
`python -m upm_jax.benchmark`)."""
from __future__ import annotations

import concurrent.futures
import os
import tempfile
import time

import numpy as np

from upm_jax.data import images, synthetic
from upm_jax.data.pipeline import decode_frames


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


def _rate(fn, frames_per_call: int, min_seconds: float) -> float:
    fn()  # warm-up (file cache, lazy imports)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * frames_per_call / elapsed


def decode_resize_throughput(*, in_size=(128, 64), image_size: int = 256, num_images: int = 64,
                             num_threads: int | None = None, min_seconds: float = 1.0) -> dict:
    """Frames/s of decode + resize to (image_size, image_size // 2), PNG and JPEG.

    Returns {"cpu_cores", "threads", "png": {...}, "jpeg": {...}} where each format has
    "single_thread" (frames/s on one core), "pool" (frames/s with the thread pool) and
    "pool_per_core" (pool / cpu_cores).
    """
    cores = os.cpu_count() or 1
    threads = num_threads or min(32, cores + 2)
    h, w = images.image_shape(image_size)
    out = {"cpu_cores": cores, "threads": threads, "in_size": list(in_size),
           "out_size": [h, w]}
    with tempfile.TemporaryDirectory() as tmp, \
            concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for name, ext in (("png", ".png"), ("jpeg", ".jpg")):
            paths = np.asarray(_frames(tmp, num_images, tuple(in_size), ext))

            def single(paths=paths):
                for p in paths:
                    images.decode_resize(p, h, w)

            def pooled(paths=paths):
                decode_frames(paths, image_size, pool)

            single_fps = _rate(single, len(paths), min_seconds)
            pool_fps = _rate(pooled, len(paths), min_seconds)
            out[name] = {"single_thread": single_fps, "pool": pool_fps,
                         "pool_per_core": pool_fps / cores}
    return out
