"""Input pipeline: the batch of every training step and the ordered test stream, read
through grain from a frame source.

A frame source maps frame-table rows to uint8 frames [n, H, W, 3], (H, W) =
(image_size, image_size // 2): `RawFrames` decodes the table's image files with Pillow and
resizes them with TF1 bilinear semantics; `prepared.PreparedFrames` reads a prepared set's
records, stored already resized by the same code. Either way the bytes are the same.

The training batch at step s holds the frames `batch_indices(seed, s, ...)`, a pure function
of (seed, s): grain reads a random-access source whose element s is this process's rows of
step s's global batch (`StepBatches`), so the pipeline's whole state is the step a
checkpoint already holds, and a resumed run replays the same batches whatever the worker
count. Each process reads only the rows of the global batch that its devices hold under the
batch sharding (`upm_jax.parallel.process_rows`, not device order); they are assembled into
global arrays sharded on the mesh's "data" axis. `Loading` says how many grain worker
processes read (0: threads of this process) and how many batches they read ahead.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import sys
import threading
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from upm_jax import parallel
from upm_jax.data import images
from upm_jax.data.table import FrameTable

__all__ = ["batch_indices", "RawFrames", "Loading", "StepBatches", "OrderedBatches",
           "train_batches", "load_resident", "shared_frames", "resident_batches", "ordered_batches",
           "auto_workers", "frame_source", "input_from_config"]

SOURCES = ("raw", "prepared")
# Frames per element when the resident set is read (one process's share, in order).
_RESIDENT_CHUNK = 256


def batch_indices(seed: int, step: int, num_frames: int, batch: int) -> np.ndarray:
    """Frame rows of the global batch at `step`: [batch] int64, uniform with replacement."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    if num_frames <= 0 or batch <= 0:
        raise ValueError(f"need num_frames > 0 and batch > 0, got {num_frames}, {batch}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step)]))
    return rng.integers(0, num_frames, size=int(batch), dtype=np.int64)


class RawFrames:
    """Frame source: table rows -> uint8 frames decoded from the table's image files and
    resized with TF1 bilinear semantics (`images.decode_resize`)."""

    def __init__(self, paths, image_size: int):
        self.paths = np.asarray(paths, dtype=str)
        self.image_shape = images.image_shape(image_size)

    def __len__(self):
        return len(self.paths)

    def read(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Writes the frames of table `rows` [n] into `out` (uint8 [n, H, W, 3])."""
        height, width = self.image_shape
        for i, row in enumerate(np.asarray(rows).tolist()):
            out[i] = images.decode_resize(self.paths[row], height, width)
        return out


def auto_workers(source: str, cores: int | None = None) -> int:
    """The grain worker processes `config.data.workers=-1` stands for on a host of `cores`.

    Prepared records are read in this process (0): handing a batch from a worker to the
    trainer costs about as much CPU as reading it. Raw frames are decoded by workers when
    the host has cores to spare: half of them (at most 16), none below 4 cores, where the
    trainer itself needs the CPU.
    """
    cores = cores or os.cpu_count() or 1
    if source == "prepared" or cores < 4:
        return 0
    return min(16, cores // 2)


@dataclasses.dataclass(frozen=True)
class Loading:
    """How grain reads: `workers` processes (0: `prefetch` threads of this process), each
    reading `prefetch` batches ahead."""

    workers: int = 0
    prefetch: int = 2

    def __post_init__(self):
        if self.workers < 0 or self.prefetch < 1:
            raise ValueError(f"Loading needs workers >= 0 and prefetch >= 1, got {self}")


class StepBatches:
    """grain random-access source: element s = this process's rows (`local`) of the global
    batch of step s, {"image": uint8 [b, H, W, 3], "track": int32 [b], "camera": int32 [b]}.
    Steps [0, num_steps)."""

    def __init__(self, table: FrameTable, frames, *, seed: int, global_batch: int,
                 local: np.ndarray, num_steps: int):
        if table.num_frames == 0:
            raise ValueError("the training table has no frames")
        if len(frames) != table.num_frames:
            raise ValueError(f"the frame source has {len(frames)} frames, the table "
                             f"{table.num_frames}")
        self.frames, self.seed, self.global_batch = frames, int(seed), int(global_batch)
        self.local, self.num_steps = np.asarray(local, np.int64), int(num_steps)
        self.track = table.track.astype(np.int32)
        self.camera = table.camera.astype(np.int32)

    def __len__(self):
        return self.num_steps

    def __getitem__(self, step):
        rows = batch_indices(self.seed, int(step), len(self.frames), self.global_batch)
        rows = rows[self.local]
        image = np.empty((len(rows), *self.frames.image_shape, 3), np.uint8)
        return {"image": self.frames.read(rows, image), "track": self.track[rows],
                "camera": self.camera[rows]}


class OrderedBatches:
    """grain random-access source: element k = this process's rows (`local`) of the k-th
    batch of `rows` in order, {"image": uint8 [b, H, W, 3], "index": int64 [b] (the table
    row, -1 past the end), "valid": bool [b]}; past the end the image is zeros."""

    def __init__(self, frames, *, batch_size: int, local: np.ndarray, rows=None):
        self.frames, self.batch_size = frames, int(batch_size)
        self.local = np.asarray(local, np.int64)
        self.rows = np.arange(len(frames)) if rows is None else np.asarray(rows, np.int64)

    def __len__(self):
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, k):
        at = int(k) * self.batch_size + self.local
        valid = at < len(self.rows)
        index = np.where(valid, self.rows[np.minimum(at, len(self.rows) - 1)], -1)
        image = np.zeros((len(at), *self.frames.image_shape, 3), np.uint8)
        if valid.all():
            self.frames.read(index, image)
        elif valid.any():
            image[valid] = self.frames.read(index[valid], image[valid])
        return {"image": image, "index": index, "valid": valid}


def frame_source(table: FrameTable, *, source: str, image_size: int, layout: str = "",
                 data_dir: str = ""):
    """The frames of `table`'s rows: its image files ("raw") or the records of the
    prepared set of `layout` at `image_size` under `data_dir` ("prepared")."""
    if source == "raw":
        return RawFrames(table.path, image_size)
    if source == "prepared":
        from upm_jax.data import prepared  # noqa: PLC0415  (imports TFDS)
        return prepared.open_set(data_dir, layout, int(image_size)).frames(table)
    raise ValueError(f"frame source {source!r}: expected one of {SOURCES}")


def input_from_config(config, table: FrameTable) -> tuple:
    """(frame source, Loading) of `table` as `config.data` says (source, data_dir,
    image_size, workers with -1 = `auto_workers`, prefetch)."""
    data = config.data
    frames = frame_source(table, source=data.source, image_size=data.image_size,
                          layout=data.layout, data_dir=data.data_dir)
    workers = auto_workers(data.source) if data.workers < 0 else data.workers
    return frames, Loading(workers=workers, prefetch=data.prefetch)


# The stop signals (upm_jax.interrupts) are the trainer's to handle, not its readers'.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _init_worker(worker_index, worker_count):
    """grain worker_init_fn: a reader never starts an accelerator backend (JAX is imported
    in the workers, the GPU or TPU belongs to the trainer), and the kernel kills it when
    its parent dies (a SIGKILLed trainer must not leave its readers behind). It ignores
    SIGINT and SIGTERM (Ctrl-C reaches the terminal's whole process group, a scheduler
    may signal every process): the trainer decides when reading stops (closing the
    iterator ends the workers), so a stop prints no reader's traceback and leaves no
    shared memory behind. They were blocked since the worker started (`_iterate`)."""
    del worker_index, worker_count
    os.environ["JAX_PLATFORMS"] = "cpu"
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def _read_ahead(source, start: int, loading: Loading):
    """A grain iterator over source[start:] in order, read as `loading` says; the caller
    closes it (that stops the worker processes)."""
    import grain  # noqa: PLC0415  (its import is slow; the resident path does not need it)
    from absl import flags  # noqa: PLC0415
    if not flags.FLAGS.is_parsed():
        # grain 0.2.18 reads an absl flag when it starts workers (google/grain#1355)
        flags.FLAGS.mark_as_parsed()
    dataset = grain.MapDataset.source(source)[int(start):]
    dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=0 if loading.workers else loading.prefetch,
        prefetch_buffer_size=loading.prefetch))
    if loading.workers:
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=loading.workers,
                                         per_worker_buffer_size=loading.prefetch),
            worker_init_fn=_init_worker)
    return iter(dataset)


def _iterate(source, start: int, loading: Loading) -> Iterator[dict]:
    """The elements of source[start:] (`_read_ahead`). The worker processes start with the
    first element, with the stop signals blocked in this thread meanwhile: the threads
    that start them, and the workers, inherit the block until `_init_worker` ignores the
    signals; this process still receives them (in another thread, or once they started)."""
    blocked = loading.workers and threading.current_thread() is threading.main_thread()
    iterator = None
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if blocked else None
        try:
            iterator = _read_ahead(source, start, loading)
            first = next(iterator, None)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if first is not None:
            yield first
            yield from iterator
    finally:
        if iterator is not None:
            iterator.close()


def _local_rows(global_batch: int, mesh) -> np.ndarray:
    """The rows of every global batch this process reads: int64 [rows]."""
    n_data = int(mesh.shape[parallel.DATA_AXIS])
    if global_batch % n_data:
        raise ValueError(f"global batch {global_batch} must be divisible by the {n_data} devices "
                         f"of the mesh's 'data' axis")
    return parallel.process_rows(parallel.batch_sharding(mesh), global_batch)


def step_batches(table: FrameTable, frames, *, global_batch: int, seed: int, mesh,
                 num_steps: int) -> StepBatches:
    """The StepBatches of this process under `mesh`'s batch sharding."""
    return StepBatches(table, frames, seed=seed, global_batch=global_batch,
                       local=_local_rows(int(global_batch), mesh), num_steps=num_steps)


def train_batches(table: FrameTable, frames, *, global_batch: int, seed: int, mesh,
                  start_step: int, end_step: int, loading: Loading = Loading()
                  ) -> Iterator[dict]:
    """Yields the batches of steps start_step ... end_step - 1: {"image": uint8 [B,H,W,3],
    "track": int32 [B], "camera": int32 [B]} global jax.Arrays sharded on the mesh's "data"
    axis, B = the global batch. Closing the generator stops the readers."""
    source = step_batches(table, frames, global_batch=global_batch, seed=seed, mesh=mesh,
                          num_steps=end_step)
    sharding = parallel.batch_sharding(mesh)
    for host in _iterate(source, start_step, loading):
        yield {k: parallel.from_process_rows(sharding, np.asarray(v), int(global_batch))
               for k, v in host.items()}


def load_resident(table: FrameTable, frames, mesh, *, rows: int | None = None,
                  loading: Loading = Loading()) -> dict:
    """All training frames, replicated on the mesh's devices.

    Returns {"image": uint8 [R,H,W,3], "track": int32 [R], "camera": int32 [R]} jax.Arrays
    with R = `rows` (default N, the table's frames): rows N.. are zero padding that no
    batch samples (batches draw rows below N), so the splits of a run padded to one R share
    one compiled training step. With several processes each reads an equal share of the
    frames and the shares are all-gathered, so no host reads the whole set (every host
    then holds all of it, as its devices need a replica).
    """
    n = table.num_frames
    total = n if rows is None else int(rows)
    if total < n:
        raise ValueError(f"load_resident: rows={total} is fewer than the table's {n} frames")
    count, index = jax.process_count(), jax.process_index()
    share = -(-n // count)
    mine = np.arange(index * share, min((index + 1) * share, n))
    # one process reads into the padded whole; several pad their last share to equal length
    local = np.zeros((total if count == 1 else share, *frames.image_shape, 3), np.uint8)
    source = OrderedBatches(frames, batch_size=_RESIDENT_CHUNK,
                            local=np.arange(_RESIDENT_CHUNK), rows=mine)
    for k, chunk in enumerate(_iterate(source, 0, loading)):
        at = k * _RESIDENT_CHUNK
        local[at:at + int(chunk["valid"].sum())] = chunk["image"][chunk["valid"]]
    if count == 1:
        image = local
    else:
        image = np.zeros((total, *frames.image_shape, 3), np.uint8)
        image[:n] = np.asarray(multihost_utils.process_allgather(local, tiled=True))[:n]
    pad = total - n
    host = {"image": image,
            "track": np.concatenate([table.track.astype(np.int32), np.zeros(pad, np.int32)]),
            "camera": np.concatenate([table.camera.astype(np.int32), np.zeros(pad, np.int32)])}
    replicated = parallel.replicated(mesh)
    return {k: jax.make_array_from_callback(v.shape, replicated, lambda idx, v=v: v[idx])
            for k, v in host.items()}


def shared_frames(tables) -> tuple:
    """The frames of several training tables of one dataset held once: (a FrameTable of
    their distinct frames by path, in the order first met, [rows_k] with rows_k int64
    [N_k] the row of each frame of table k in it). The tables' tracklets are concatenated
    into its own (a frame keeps the tracklet of the first table that has it); splits
    trained side by side sample their own rows of one resident copy of these frames."""
    if not tables:
        raise ValueError("shared_frames needs at least one table")
    path = np.concatenate([t.path for t in tables])
    _, first, inverse = np.unique(path, return_index=True, return_inverse=True)
    order = np.argsort(first)                 # distinct frames in the order first met
    rank = np.empty(len(first), np.int64)
    rank[order] = np.arange(len(first))
    keep = first[order]                       # their rows in the concatenation
    offsets = np.cumsum([0] + [t.num_tracklets for t in tables[:-1]])
    tracklet = np.concatenate([t.tracklet + o for t, o in zip(tables, offsets)])
    union = FrameTable(
        path=path[keep], tracklet=tracklet[keep].astype(np.int32),
        frame=np.concatenate([t.frame for t in tables])[keep],
        tracklet_camera=np.concatenate([t.tracklet_camera for t in tables]),
        tracklet_pid=np.concatenate([t.tracklet_pid for t in tables]),
        tracklet_index=np.concatenate([t.tracklet_index for t in tables]),
        num_cameras=max(t.num_cameras for t in tables))
    bounds = np.cumsum([t.num_frames for t in tables])[:-1]
    return union, np.split(rank[inverse.reshape(-1)], bounds)


def resident_batches(num_frames: int, *, global_batch: int, seed: int, mesh,
                     start_step: int = 0) -> Iterator[dict]:
    """Yields {"index": int32 [B]} sharded on "data" for steps start_step, ... (resident mode).

    The same rows as `train_batches` reads at each step.
    """
    local = _local_rows(int(global_batch), mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    step = int(start_step)
    while True:
        rows = batch_indices(seed, step, num_frames, global_batch)[local].astype(np.int32)
        yield {"index": parallel.from_process_rows(batch_sharding, rows, int(global_batch))}
        step += 1


def ordered_batches(frames, *, batch_size: int, sharding=None,
                    loading: Loading = Loading()) -> Iterator[dict]:
    """Ordered stream covering every frame of `frames` once: {"image", "index", "valid"}
    numpy batches (see OrderedBatches).

    Global batch k holds rows k*batch_size ...; the last one is padded with zero images,
    index -1 and valid False. By default every call yields whole global batches; given the
    batch `sharding` it yields only this process's rows of each (image, index and valid
    alike, `upm_jax.parallel.process_rows`), so each host reads only its own frames and
    the batch goes straight into `jax.make_array_from_process_local_data`.
    """
    if batch_size <= 0:
        raise ValueError(f"test batch size {batch_size} must be positive")
    local = (np.arange(batch_size) if sharding is None
             else parallel.process_rows(sharding, batch_size))
    for batch in _iterate(OrderedBatches(frames, batch_size=batch_size, local=local), 0,
                          loading):
        yield {k: np.asarray(v) for k, v in batch.items()}
