"""Peak memory of extraction and evaluation at MARS size (681,089 test frames): the
`memory` section of `python -m upm_jax.benchmark`.

Builds a synthetic test table shaped like MARS (12,180 tracklets in 6 cameras, 1,980
queries; frames spread over the tracklets at random) whose frames are a few hundred tiny
PNGs, and two cheap stand-in models (a Dense layer on each image's mean colour) with the
part counts and widths of uPMnet's LAM and GAM. Then, each in a fresh process so that its
peak RSS (ru_maxrss) is its own:

  extract   `extract.write_frame_features` of each model (what `--mode extract` runs:
            decoding, sharded batches, the file streamed to disk on process 0)
  evaluate  `evaluation.fuse_features` (LAM + GAM fused per part and pooled per
            tracklet chunk by chunk, as `--mode evaluate` does with
            eval.frame_features=False) and `evaluation.evaluate` of the result

The features files (P x (lam+gam) x N x itemsize bytes in all) are deleted at the end.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np

from upm_jax.evaluation.synthetic import MARS_FRAMES, MARS_TRACKLETS, synthetic_mars

IMAGES = 256
IMAGE_SIZE = 32  # frames are 32 x 16: the stand-in model's cost does not matter here


def synthetic_table(frames, seed=0):
    """(frame tracklet [N], tracklet pid [T], camera [T] 1-based, query, gallery) like MARS."""
    proto = synthetic_mars(parts=1, dim=1, seed=seed)
    rng = np.random.default_rng(seed)
    t = MARS_TRACKLETS
    lengths = 1 + rng.multinomial(frames - t, np.full(t, 1.0 / t))
    return np.repeat(np.arange(t, dtype=np.int32), lengths), proto


def _dataset(workdir, frames):
    from upm_jax.data import FrameTable
    from PIL import Image
    image_dir = os.path.join(workdir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(1)
    files = []
    for i in range(IMAGES):
        files.append(os.path.join(image_dir, f"{i:03d}.png"))
        if not os.path.exists(files[-1]):
            pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE // 2, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(files[-1])
    tracklet, proto = synthetic_table(frames)
    cams = (proto["cam"] - 1).astype(np.int32)
    index = np.zeros_like(cams)
    for c in range(int(cams.max()) + 1):
        index[cams == c] = np.arange(int((cams == c).sum()))
    frame = (np.arange(frames) - np.searchsorted(tracklet, tracklet)).astype(np.int32)
    table = FrameTable(path=np.array(files)[np.arange(frames) % IMAGES], tracklet=tracklet,
                       frame=frame, tracklet_camera=cams, tracklet_pid=proto["pid"],
                       tracklet_index=index, num_cameras=int(cams.max()) + 1)
    return types.SimpleNamespace(test=table, query=proto["query"], gallery=proto["gallery"],
                                 directions="one")


def _stand_in(parts, dim):
    import flax.linen as nn

    class StandIn(nn.Module):
        """[B, parts, dim] features from the mean colour of each image (one small matmul)."""

        @nn.compact
        def __call__(self, images, train=False):
            x = images.mean(axis=(1, 2))  # [B, 3]
            return nn.Dense(parts * dim)(x).reshape(-1, parts, dim)

    return StandIn()


def stage_extract(workdir, frames, parts, dims, dtype, batch):
    """Extract every frame with each stand-in model into `workdir/<name>.npz`."""
    import jax
    import jax.numpy as jnp
    from upm_jax import extract, parallel
    from upm_jax.data.pipeline import RawFrames
    dataset = _dataset(workdir, frames)
    mesh = parallel.make_mesh()
    t0 = time.perf_counter()
    for i, (name, dim) in enumerate(zip(("lam", "gam"), dims)):
        model = _stand_in(parts, dim)
        variables = model.init(jax.random.PRNGKey(i), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE // 2, 3)))
        extract.write_frame_features(model, variables, dataset, os.path.join(workdir, f"{name}.npz"),
                                     mesh=mesh, batch_size=batch,
                                     frames=RawFrames(dataset.test.path, IMAGE_SIZE),
                                     pooling="max", dtype=dtype)
    return {"seconds": time.perf_counter() - t0,
            "files_gb": sum(os.path.getsize(os.path.join(workdir, f"{n}.npz"))
                            for n in ("lam", "gam")) / 2**30}


def stage_evaluate(workdir, frames, parts, dims, dtype, batch):
    """Fuse + pool the two files chunk by chunk, then evaluate the fused file."""
    from upm_jax import evaluation
    t0 = time.perf_counter()
    fused = os.path.join(workdir, "fused.npz")
    evaluation.fuse_features([os.path.join(workdir, f"{n}.npz") for n in ("lam", "gam")],
                             fused, frame_level=False, pooling="max", num_parts=parts)
    fuse_seconds = time.perf_counter() - t0
    result = evaluation.evaluate(evaluation.load_features(fused), ap="both", source=fused)
    return {"seconds": time.perf_counter() - t0, "fuse_and_pool_seconds": fuse_seconds,
            "fused_file_gb": os.path.getsize(fused) / 2**30,
            "paper_rank1": result["paper"]["rank1"], "gallery": result["paper"]["gallery_size"]}


STAGES = {"extract": stage_extract, "evaluate": stage_evaluate}


def _run_stage(name, workdir, frames, parts, dims, dtype, batch):
    """One stage in a fresh interpreter; its record with the stage's own peak RSS."""
    code = ("import json, resource\n"
            "from upm_jax.benchmark import memory as m\n"
            f"rec = m.STAGES[{name!r}]({workdir!r}, {frames}, {parts}, {tuple(dims)!r}, "
            f"{dtype!r}, {batch})\n"
            "rec['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
            "print(json.dumps(rec))\n")
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory stage {name} failed:\n{proc.stderr[-4000:]}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(stage=name, frames=frames, features=f"{parts} x ({dims[0]} + {dims[1]}) {dtype}",
                load_average_1min_before=load, **record)


def mars_memory(workdir, *, frames=MARS_FRAMES, parts=8, dims=(2048, 512), dtype="float16",
                batch=256, stages=("extract", "evaluate")):
    """Runs the stages in `workdir` (created; its images and features files removed at the
    end); returns one record per stage."""
    os.makedirs(workdir, exist_ok=True)
    records = []
    try:
        for name in stages:
            records.append(_run_stage(name, workdir, frames, parts, dims, dtype, batch))
    finally:
        for n in ("lam", "gam", "fused"):
            for suffix in (".npz", ".paths.txt"):
                path = os.path.join(workdir, n + suffix)
                if os.path.exists(path):
                    os.remove(path)
        shutil.rmtree(os.path.join(workdir, "images"), ignore_errors=True)
    return records
