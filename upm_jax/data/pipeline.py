"""Input pipeline: deterministic training batches, resident data, ordered test stream.

Frames are decoded with Pillow in a thread pool and resized to (image_size, image_size // 2)
with TF1 bilinear semantics, rounded to uint8 (the train step maps uint8 to [-1, 1]).
The training batch at step s is `batch_indices(seed, s, ...)`, a pure function of (seed, s),
so a resumed run replays the same batches. Each process decodes only the rows of the global
batch that its devices hold under the batch sharding (`upm_jax.parallel.process_rows`, not
device order); they are assembled into global arrays sharded on the mesh's "data" axis.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from upm_jax import parallel
from upm_jax.data import images
from upm_jax.data.table import FrameTable

__all__ = ["batch_indices", "TrainInput", "load_resident", "resident_batches", "ordered_batches",
           "decode_frames"]


def _threads(num_threads: int | None) -> int:
    return int(num_threads) if num_threads else min(32, (os.cpu_count() or 1) + 2)


def batch_indices(seed: int, step: int, num_frames: int, batch: int) -> np.ndarray:
    """Frame rows of the global batch at `step`: [batch] int64, uniform with replacement."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    if num_frames <= 0 or batch <= 0:
        raise ValueError(f"need num_frames > 0 and batch > 0, got {num_frames}, {batch}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step)]))
    return rng.integers(0, num_frames, size=int(batch), dtype=np.int64)


def decode_frames(paths, image_size: int, pool: concurrent.futures.Executor) -> np.ndarray:
    """Decodes and resizes `paths` in `pool`: uint8 [len(paths), H, W, 3]."""
    h, w = images.image_shape(image_size)
    out = np.empty((len(paths), h, w, 3), np.uint8)

    def one(i):
        out[i] = images.decode_resize(paths[i], h, w)

    for _ in pool.map(one, range(len(paths))):
        pass
    return out


def _local_rows(global_batch: int, mesh) -> np.ndarray:
    """The rows of every global batch this process decodes: int64 [rows]."""
    n_data = int(mesh.shape[parallel.DATA_AXIS])
    if global_batch % n_data:
        raise ValueError(f"global batch {global_batch} must be divisible by the {n_data} devices "
                         f"of the mesh's 'data' axis")
    return parallel.process_rows(parallel.batch_sharding(mesh), global_batch)


class TrainInput:
    """Host training pipeline: decodes this process's slice of each global batch ahead of time.

    `iterate(start_step)` yields {"image": uint8 [B,H,W,3], "track": int32 [B],
    "camera": int32 [B]} as global jax.Arrays sharded on the mesh's "data" axis, B = the
    global batch; step s always carries the frames `batch_indices(seed, s, N, B)`.
    `local` holds the rows of each global batch this process decodes (those its devices
    hold).
    """

    def __init__(self, table: FrameTable, *, global_batch: int, image_size: int, seed: int, mesh,
                 prefetch: int = 2, num_threads: int | None = None):
        if table.num_frames == 0:
            raise ValueError("TrainInput: the training table has no frames")
        self.table, self.global_batch, self.image_size = table, int(global_batch), int(image_size)
        self.seed, self.mesh, self.prefetch = int(seed), mesh, max(1, int(prefetch))
        self.num_threads = _threads(num_threads)
        self.local = _local_rows(self.global_batch, mesh)
        self._sharding = parallel.batch_sharding(mesh)
        self._track = table.track.astype(np.int32)
        self._camera = table.camera.astype(np.int32)

    def host_batch(self, step: int, pool: concurrent.futures.Executor | None = None) -> dict:
        """This process's numpy rows (`self.local`) of the batch at `step`."""
        rows = batch_indices(self.seed, step, self.table.num_frames, self.global_batch)[self.local]
        if pool is None:
            with concurrent.futures.ThreadPoolExecutor(self.num_threads) as own:
                return self.host_batch(step, own)
        image = decode_frames(self.table.path[rows], self.image_size, pool)
        return {"image": image, "track": self._track[rows], "camera": self._camera[rows]}

    def _device_batch(self, step: int, pool) -> dict:
        host = self.host_batch(step, pool)
        return {k: parallel.from_process_rows(self._sharding, v, self.global_batch)
                for k, v in host.items()}

    def iterate(self, start_step: int = 0) -> Iterator[dict]:
        """Yields the batches of steps start_step, start_step + 1, ... (endless)."""
        decode_pool = concurrent.futures.ThreadPoolExecutor(self.num_threads)
        feeder = concurrent.futures.ThreadPoolExecutor(1)
        pending = collections.deque()
        step = int(start_step)
        try:
            while True:
                while len(pending) < self.prefetch:
                    pending.append(feeder.submit(self._device_batch, step + len(pending),
                                                 decode_pool))
                batch = pending.popleft().result()
                step += 1
                yield batch
        finally:
            for f in pending:
                f.cancel()
            feeder.shutdown(wait=True)
            decode_pool.shutdown(wait=True)


def load_resident(table: FrameTable, image_size: int, mesh, *, rows: int | None = None,
                  num_threads: int | None = None) -> dict:
    """All training frames decoded, replicated on the mesh's devices.

    Returns {"image": uint8 [R,H,W,3], "track": int32 [R], "camera": int32 [R]} jax.Arrays
    with R = `rows` (default N, the table's frames): rows N.. are zero padding that no
    batch samples (batches draw rows below N), so the splits of a run padded to one R share
    one compiled training step. With several processes each decodes an equal share of the
    frames and the shares are all-gathered, so no host decodes the whole set (every host
    then holds all of it, as its devices need a replica).
    """
    n = table.num_frames
    total = n if rows is None else int(rows)
    if total < n:
        raise ValueError(f"load_resident: rows={total} is fewer than the table's {n} frames")
    h, w = images.image_shape(image_size)
    count, index = jax.process_count(), jax.process_index()
    share = -(-n // count)
    mine = np.arange(index * share, min((index + 1) * share, n))
    # the last share padded to equal length; one process decodes into the padded whole
    local = np.zeros((total if count == 1 else share, h, w, 3), np.uint8)
    with concurrent.futures.ThreadPoolExecutor(_threads(num_threads)) as pool:
        local[:len(mine)] = decode_frames(table.path[mine], image_size, pool)
    if count == 1:
        image = local
    else:
        image = np.zeros((total, h, w, 3), np.uint8)
        image[:n] = np.asarray(multihost_utils.process_allgather(local, tiled=True))[:n]
    pad = total - n
    host = {"image": image,
            "track": np.concatenate([table.track.astype(np.int32), np.zeros(pad, np.int32)]),
            "camera": np.concatenate([table.camera.astype(np.int32), np.zeros(pad, np.int32)])}
    replicated = parallel.replicated(mesh)
    return {k: jax.make_array_from_callback(v.shape, replicated, lambda idx, v=v: v[idx])
            for k, v in host.items()}


def resident_batches(num_frames: int, *, global_batch: int, seed: int, mesh,
                     start_step: int = 0) -> Iterator[dict]:
    """Yields {"index": int32 [B]} sharded on "data" for steps start_step, ... (resident mode).

    The same rows as TrainInput would decode at each step.
    """
    local = _local_rows(int(global_batch), mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    step = int(start_step)
    while True:
        rows = batch_indices(seed, step, num_frames, global_batch)[local].astype(np.int32)
        yield {"index": parallel.from_process_rows(batch_sharding, rows, int(global_batch))}
        step += 1


def ordered_batches(table: FrameTable, *, batch_size: int, image_size: int,
                 num_threads: int | None = None, prefetch: int = 2,
                 sharding=None) -> Iterator[dict]:
    """Ordered stream covering every frame once: {"image", "index", "valid"} numpy batches.

    Global batch k holds rows k*batch_size ...; the last one is padded with zero images,
    index -1 and valid False. By default every call yields whole global batches; given the
    batch `sharding` it yields only this process's rows of each (image, index and valid
    alike, `upm_jax.parallel.process_rows`), so each host decodes only its own frames and
    the batch goes straight into `jax.make_array_from_process_local_data`.
    """
    if batch_size <= 0:
        raise ValueError(f"test batch size {batch_size} must be positive")
    local = (np.arange(batch_size) if sharding is None
             else parallel.process_rows(sharding, batch_size))
    h, w = images.image_shape(image_size)
    n = table.num_frames
    starts = range(0, n, batch_size)

    def make(start, pool):
        rows = start + local
        valid = rows < n
        image = np.zeros((len(rows), h, w, 3), np.uint8)
        image[valid] = decode_frames(table.path[rows[valid]], image_size, pool)
        return {"image": image, "index": np.where(valid, rows, -1), "valid": valid}

    with concurrent.futures.ThreadPoolExecutor(_threads(num_threads)) as pool, \
            concurrent.futures.ThreadPoolExecutor(1) as feeder:
        pending = collections.deque()
        for start in starts:
            pending.append(feeder.submit(make, start, pool))
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
