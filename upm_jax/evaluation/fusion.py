"""Fusing the per-frame features of several models (uPMnet: LAM + GAM), chunk by chunk.

Per frame and part the models' vectors are concatenated along D ([N, P, D1 + D2]), as
the papers' test feature does; the fused frames are written per frame or pooled per
tracklet straight away, so memory stays at one chunk of frames (plus the pooled
[T, P*D] when pooling), whatever N is.
"""
import os
import shutil

import numpy as np

from upm_jax.evaluation.features import (FeaturesError, load_features, montage_paths_file,
                                         save_features, save_frame_features)
from upm_jax.evaluation.pooling import CHUNK_BYTES, TrackletPooler, chunk_rows, iter_chunks
from upm_jax.files import atomic_write

PROTOCOL_KEYS = ("frame_track", "pid", "cam", "query", "gallery")
SCALAR_KEYS = ("directions",)   # how the protocol is scored, when the file says


def _check_compatible(paths, loaded, num_parts):
    """The files must hold per-frame features of the same frames, parts and protocol."""
    for path, f in zip(paths, loaded):
        if "frame_feat" not in f:
            raise FeaturesError(f"{path}: holds pooled 'track_feat'; fusing needs per-frame "
                                "'frame_feat' (re-extract the model's features)")
        parts = f["frame_feat"].shape[1]
        if num_parts is not None and parts != num_parts:
            raise FeaturesError(f"{path}: array 'frame_feat' has P={parts} parts, but this run's "
                                f"models have {num_parts} (config.model.n_part); re-extract it "
                                "with the run's own checkpoint")
    first_path, first = paths[0], loaded[0]
    for path, f in zip(paths[1:], loaded[1:]):
        if f["frame_feat"].shape[:2] != first["frame_feat"].shape[:2]:
            raise FeaturesError(
                f"{path}: array 'frame_feat' has [N, P] = {list(f['frame_feat'].shape[:2])} but "
                f"{first_path} has {list(first['frame_feat'].shape[:2])}; only features of the "
                "same test frames and part count can be fused")
        for key in PROTOCOL_KEYS:
            if not np.array_equal(f[key], first[key]):
                raise FeaturesError(f"{path}: array '{key}' differs from {first_path}'s; the files "
                                    "are not of the same test set and split")
        for key in SCALAR_KEYS:
            if str(f.get(key, "")) != str(first.get(key, "")):
                raise FeaturesError(f"{path}: '{key}' is {str(f.get(key, '(absent)'))!r} but "
                                    f"{str(first.get(key, '(absent)'))!r} in {first_path}")


def fuse_features(inputs, out_path, *, frame_level=True, pooling=None, num_parts=None,
                  chunk_bytes=CHUNK_BYTES):
    """Fuse the per-frame features files `inputs` into the features file `out_path`.

    `frame_level`: write the fused per-frame features (else the tracklet-pooled ones,
    pooling rule (`pooling.tracklet_features`) with `pooling`, default the first file's entry, else max). `num_parts`: the P
    every input must have. The first input's montage paths file, when present, is copied
    next to `out_path`. Returns `out_path`.
    """
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise ValueError("fuse_features: no input files")
    loaded = [load_features(p) for p in inputs]
    _check_compatible(inputs, loaded, num_parts)
    first = loaded[0]
    pooling = pooling or str(first.get("pooling", "max"))
    n, p, _ = first["frame_feat"].shape
    d = sum(f["frame_feat"].shape[2] for f in loaded)
    dtype = np.result_type(*[f["frame_feat"].dtype for f in loaded])
    rows = chunk_rows((n, p, d), chunk_bytes)
    protocol = {k: first[k] for k in ("pid", "cam", "query", "gallery", *SCALAR_KEYS)
                if k in first}

    def fused_chunks():
        streams = [iter_chunks(f["frame_feat"], rows) for f in loaded]
        for pieces in zip(*streams):
            yield pieces[0][0], np.concatenate([c for _, c in pieces], axis=2)  # [c, P, D]

    if frame_level:
        save_frame_features(out_path, (chunk for _, chunk in fused_chunks()), shape=(n, p, d),
                            dtype=dtype, frame_track=first["frame_track"], pooling=pooling,
                            **protocol)
    else:
        t = first["pid"].shape[0]
        pooler = TrackletPooler(t, p, d, pooling=pooling, source=" + ".join(inputs))
        track = first["frame_track"]
        for start, chunk in fused_chunks():
            pooler.add(start, chunk, track[start:start + len(chunk)])
        pooled = pooler.result(required=np.union1d(first["query"], first["gallery"]))
        save_features(out_path, track_feat=pooled.reshape(t, p, d), pooling=pooling, **protocol)
    paths_file = montage_paths_file(inputs[0])
    if os.path.isfile(paths_file):
        with open(paths_file, "rb") as src:
            atomic_write(montage_paths_file(out_path), lambda f: shutil.copyfileobj(src, f))
    return out_path
