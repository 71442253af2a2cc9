"""Frame features -> tracklet features (design §7), streamed in chunks of frames.

Per frame and part the [D] vector is L2-normalised and divided by sqrt(P); the
tracklet's frames are max-pooled (default) or mean-pooled; the pooled [P*D] vector is
L2-normalised. Frames are read chunk by chunk (a memory-mapped `frame_feat` is read
with plain file reads, so the process never maps all frames in), and the frames of a
tracklet may be scattered over the file.
"""
import mmap

import numpy as np

from upm_jax.evaluation.features import FeaturesError, check_finite, first_nonfinite_row

CHUNK_BYTES = 32 << 20
_EPS = 1e-12


def normalize_parts(x):
    """In place: L2-normalise each part vector of `x` [n, P, D] and divide by sqrt(P)."""
    norms = np.sqrt(np.einsum("npd,npd->np", x, x))  # [n, P]
    np.maximum(norms, _EPS, out=norms)
    norms *= np.sqrt(x.shape[1])
    x /= norms[:, :, None]
    return x


def l2_normalize_rows(x):
    """In place: L2-normalise each row of `x` [n, F] (zero rows stay zero)."""
    norms = np.sqrt(np.einsum("nf,nf->n", x, x))
    np.maximum(norms, _EPS, out=norms)
    x /= norms[:, None]
    return x


def _iter_chunks(feat, rows):
    """Yield (start, float32 chunk [c, P, D]) of `feat`, `rows` frames at a time.

    A chunk may be a reused buffer: it is valid (and writable) until the next is requested.
    """
    n = feat.shape[0]
    direct = (isinstance(feat, np.memmap) and isinstance(feat.base, mmap.mmap)
              and feat.flags.c_contiguous and isinstance(feat.filename, str))
    if not direct:
        for start in range(0, n, rows):
            yield start, np.array(feat[start:start + rows], dtype=np.float32)
        return
    row_bytes = feat[0:1].nbytes
    buf = np.empty((min(rows, n),) + feat.shape[1:], dtype=feat.dtype)
    with open(feat.filename, "rb", buffering=0) as f:
        f.seek(feat.offset)
        for start in range(0, n, rows):
            c = min(rows, n - start)
            view = memoryview(buf[:c].reshape(-1).view(np.uint8))
            got = 0
            while got < c * row_bytes:
                k = f.readinto(view[got:])
                if not k:
                    raise FeaturesError(f"{feat.filename}: array 'frame_feat': file is truncated")
                got += k
            chunk = buf[:c]
            yield start, (chunk if chunk.dtype == np.float32 else chunk.astype(np.float32))


def pool_tracklets(frame_feat, frame_track, num_tracklets, *, pooling="max", required=None,
                   chunk_bytes=CHUNK_BYTES):
    """Pool per-frame features [N, P, D] into unit tracklet features [T, P*D] (float32).

    `frame_track` [N] gives each frame's tracklet (0..T-1, any order). Tracklets listed in
    `required` (e.g. query and gallery) must own at least one frame; others without frames
    come back as zero rows. NaN/inf frames and out-of-range tracklet ids raise FeaturesError.
    """
    if pooling not in ("max", "mean"):
        raise ValueError(f"pooling must be 'max' or 'mean', got {pooling!r}")
    n, p, d = frame_feat.shape
    t = int(num_tracklets)
    rows = max(1, chunk_bytes // (p * d * 4))
    out = np.full((t, p * d), -np.inf if pooling == "max" else 0.0, dtype=np.float32)  # [T, P*D]
    counts = np.zeros(t, dtype=np.int64)
    for start, x in _iter_chunks(frame_feat, rows):
        c = x.shape[0]
        tracks = np.asarray(frame_track[start:start + c]).astype(np.int64)  # [c]
        if tracks.min() < 0 or tracks.max() >= t:
            raise FeaturesError(f"array 'frame_track': indices must lie in [0, {t}), found range "
                                f"[{tracks.min()}, {tracks.max()}] in frames {start}..{start + c - 1}")
        bad = first_nonfinite_row(x)
        if bad is not None:
            raise FeaturesError(f"array 'frame_feat': contains NaN or inf (first at row {start + bad})")
        normalize_parts(x)
        x = x.reshape(c, p * d)  # [c, P*D]
        if np.any(tracks[1:] < tracks[:-1]):
            order = np.argsort(tracks, kind="stable")
            tracks, x = tracks[order], x[order]
        starts = np.flatnonzero(np.concatenate(([True], tracks[1:] != tracks[:-1])))
        ids = tracks[starts]  # unique within the chunk
        if pooling == "max":
            out[ids] = np.maximum(out[ids], np.maximum.reduceat(x, starts, axis=0))
        else:
            out[ids] += np.add.reduceat(x, starts, axis=0)
        counts[ids] += np.diff(np.append(starts, c))
    if required is not None:
        missing = np.asarray(required)[counts[np.asarray(required)] == 0]
        if missing.size:
            raise FeaturesError(f"array 'frame_track': tracklet(s) {missing[:10].tolist()} used as "
                                f"query/gallery have no frames")
    empty = counts == 0
    out[empty] = 0.0
    if pooling == "mean":
        out[~empty] /= counts[~empty, None].astype(np.float32)
    return l2_normalize_rows(out)


def tracklet_features_and_sqnorms(arrays, *, pooling=None):
    """(tracklet features [T, P*D] float32, their squared norms [T]) of a features dict.

    Pooled (`track_feat`) rows are used as given; a NaN/inf among them shows up in the
    squared norms, which are computed anyway for the distances, so no extra scan is needed.
    """
    t = arrays["pid"].shape[0]
    if "track_feat" in arrays:
        feat = np.ascontiguousarray(arrays["track_feat"], dtype=np.float32).reshape(t, -1)
        sq = np.einsum("tf,tf->t", feat, feat)
        if not np.isfinite(sq).all():
            check_finite("track_feat", feat)
            row = int(np.flatnonzero(~np.isfinite(sq))[0])
            raise FeaturesError(f"array 'track_feat': values too large (squared norm of row {row} "
                                f"overflows float32)")
        return feat, sq
    pooling = pooling or str(arrays.get("pooling", "max"))
    required = np.union1d(arrays["query"], arrays["gallery"])
    feat = pool_tracklets(arrays["frame_feat"], arrays["frame_track"], t, pooling=pooling,
                          required=required)
    return feat, np.einsum("tf,tf->t", feat, feat)


def tracklet_features(arrays, *, pooling=None):
    """Unit tracklet features [T, P*D] float32 from a validated features dict.

    `pooling` overrides the file's own `pooling` entry (default "max"); it only matters
    for per-frame files.
    """
    return tracklet_features_and_sqnorms(arrays, pooling=pooling)[0]
