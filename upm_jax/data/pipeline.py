"""Input pipeline: deterministic training batches, resident data, ordered test stream.

Frames are decoded with Pillow in a thread pool and resized to (image_size, image_size // 2)
with TF1 bilinear semantics, rounded to uint8 (the train step maps uint8 to [-1, 1]).
The training batch at step s is `batch_indices(seed, s, ...)`, a pure function of (seed, s),
so a resumed run replays the same batches. Each process decodes only its slice of the global
batch; slices are assembled into global arrays sharded on the mesh's "data" axis.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from upm_jax.data import images
from upm_jax.data.table import FrameTable

__all__ = ["batch_indices", "TrainInput", "load_resident", "resident_batches", "test_batches",
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


def _process_slice(global_batch: int, mesh, process_index, process_count):
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    n_data = int(mesh.shape["data"])
    if global_batch % n_data or global_batch % count:
        raise ValueError(f"global batch {global_batch} must be divisible by the {n_data} devices "
                         f"of the mesh's 'data' axis and by the {count} processes")
    local = global_batch // count
    return slice(index * local, (index + 1) * local)


def _global(mesh, local: np.ndarray, global_batch: int):
    """A global array sharded on 'data' from this process's rows."""
    sharding = NamedSharding(mesh, P("data"))
    return jax.make_array_from_process_local_data(sharding, local,
                                                  (global_batch,) + local.shape[1:])


class TrainInput:
    """Host training pipeline: decodes this process's slice of each global batch ahead of time.

    `iterate(start_step)` yields {"image": uint8 [B,H,W,3], "track": int32 [B],
    "camera": int32 [B]} as global jax.Arrays sharded on the mesh's "data" axis, B = the
    global batch; step s always carries the frames `batch_indices(seed, s, N, B)`.
    cache=True keeps every decoded frame in host memory (small sets).
    """

    def __init__(self, table: FrameTable, *, global_batch: int, image_size: int, seed: int, mesh,
                 prefetch: int = 2, num_threads: int | None = None, cache: bool = False,
                 process_index: int | None = None, process_count: int | None = None):
        if table.num_frames == 0:
            raise ValueError("TrainInput: the training table has no frames")
        self.table, self.global_batch, self.image_size = table, int(global_batch), int(image_size)
        self.seed, self.mesh, self.prefetch = int(seed), mesh, max(1, int(prefetch))
        self.num_threads = _threads(num_threads)
        self.local = _process_slice(self.global_batch, mesh, process_index, process_count)
        self._track = table.track.astype(np.int32)
        self._camera = table.camera.astype(np.int32)
        h, w = images.image_shape(self.image_size)
        self._cache = np.zeros((table.num_frames, h, w, 3), np.uint8) if cache else None
        self._cached = np.zeros(table.num_frames, bool) if cache else None

    def host_batch(self, step: int, pool: concurrent.futures.Executor | None = None) -> dict:
        """This process's numpy slice of the batch at `step`."""
        rows = batch_indices(self.seed, step, self.table.num_frames, self.global_batch)[self.local]
        if pool is None:
            with concurrent.futures.ThreadPoolExecutor(self.num_threads) as own:
                return self.host_batch(step, own)
        if self._cache is None:
            image = decode_frames(self.table.path[rows], self.image_size, pool)
        else:
            todo = np.unique(rows[~self._cached[rows]])
            if todo.size:
                self._cache[todo] = decode_frames(self.table.path[todo], self.image_size, pool)
                self._cached[todo] = True
            image = self._cache[rows]
        return {"image": image, "track": self._track[rows], "camera": self._camera[rows]}

    def _device_batch(self, step: int, pool) -> dict:
        host = self.host_batch(step, pool)
        return {k: _global(self.mesh, v, self.global_batch) for k, v in host.items()}

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


def load_resident(table: FrameTable, image_size: int, mesh, *,
                  num_threads: int | None = None) -> dict:
    """All training frames decoded, replicated on the mesh's devices.

    Returns {"image": uint8 [N,H,W,3], "track": int32 [N], "camera": int32 [N]} jax.Arrays.
    Every process decodes the whole table (the arrays are replicated).
    """
    with concurrent.futures.ThreadPoolExecutor(_threads(num_threads)) as pool:
        host = {"image": decode_frames(table.path, image_size, pool),
                "track": table.track.astype(np.int32), "camera": table.camera.astype(np.int32)}
    replicated = NamedSharding(mesh, P())
    return {k: jax.make_array_from_callback(v.shape, replicated, lambda idx, v=v: v[idx])
            for k, v in host.items()}


def resident_batches(num_frames: int, *, global_batch: int, seed: int, mesh,
                     start_step: int = 0, process_index: int | None = None,
                     process_count: int | None = None) -> Iterator[dict]:
    """Yields {"index": int32 [B]} sharded on "data" for steps start_step, ... (resident mode).

    The same rows as TrainInput would decode at each step.
    """
    local = _process_slice(int(global_batch), mesh, process_index, process_count)
    step = int(start_step)
    while True:
        rows = batch_indices(seed, step, num_frames, global_batch)[local].astype(np.int32)
        yield {"index": _global(mesh, rows, int(global_batch))}
        step += 1


def test_batches(table: FrameTable, *, batch_size: int, image_size: int,
                 num_threads: int | None = None, prefetch: int = 2, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """Ordered stream covering every frame once: {"image", "index", "valid"} numpy batches.

    Global batch k holds rows k*batch_size ...; the last one is padded with zero images,
    index -1 and valid False. By default every call yields whole global batches; with
    process_count > 1 it yields only the process's equal contiguous slice of each (image,
    index and valid alike), so each host decodes only its own frames.
    """
    index, count = int(process_index), int(process_count)
    if batch_size <= 0 or batch_size % count or not 0 <= index < count:
        raise ValueError(f"test batch size {batch_size} must be positive and divisible by "
                         f"process_count={count}, with 0 <= process_index={index} < count")
    local = batch_size // count
    h, w = images.image_shape(image_size)
    n = table.num_frames
    starts = range(0, n, batch_size)

    def make(start, pool):
        rows = np.arange(start + index * local, start + (index + 1) * local)
        valid = rows < n
        image = np.zeros((local, h, w, 3), np.uint8)
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


test_batches.__test__ = False  # a library function, not a pytest test, when imported into tests
