"""Frame features -> tracklet features, streamed in chunks of frames.

Per frame and part the [D] vector is L2-normalised and divided by sqrt(P); the
tracklet's frames are max-pooled (default) or mean-pooled; the pooled [P*D] vector is
L2-normalised. Every nonzero vector is normalised, however small or large (as MATLAB's
`normc`): vectors are first scaled by a power of two (exact) so that squaring can neither
overflow nor underflow; zero vectors stay zero. Frames are read chunk by chunk (a
memory-mapped `frame_feat` is read with plain file reads, so the process never maps all
frames in), and the frames of a tracklet may be scattered over the file.
"""
import mmap

import numpy as np

from upm_jax.evaluation.features import FeaturesError, check_finite, first_nonfinite_row

CHUNK_BYTES = 32 << 20
# Unit rows whose total variance across rows is below this differ by squared distances of
# ~2e-6 or less: about ten float32 roundings of |a|^2 + |b|^2 - 2ab, so a ranking of them
# is rounding noise and tie order, not a measurement.
DEGENERATE_VARIANCE = 1e-6


class DegenerateFeaturesWarning(UserWarning):
    """Features (nearly) identical across frames or tracklets: rankings are tie order."""


# Squared norms of float32 vectors in this range are exact to float32 rounding; outside it
# (overflow to inf, or squares in the subnormal range) the vector is rescaled first.
_SAFE_SQNORM = (2.0**-100, 2.0**100)
_BLOCK_BYTES = 32 << 20


def _rescaled(x, axis):
    """float32 x * 2**-e, with 2**e the power of two just above max|x| of each vector along
    `axis` (exact scaling, in x's own dtype; all-zero vectors unchanged)."""
    _, exponent = np.frexp(np.max(np.abs(x), axis=axis, keepdims=True))
    return np.ldexp(x, -exponent).astype(np.float32, copy=False)


def unit_vectors(x, axis=-1, scale=1.0, out=None):
    """float32 `x` with every nonzero vector along `axis` (not 0) scaled to norm `scale`.

    Exact for any finite input (tiny, subnormal or near the dtype's maximum): vectors whose
    squared norm would leave float32's comfortable range are first scaled by a power of two
    in x's own dtype. Zero vectors stay zero; `out` (may be `x` itself when float32) receives
    the result. Works in row blocks of about 32 MB, so temporaries stay small.
    """
    x = np.asarray(x)
    if out is None:
        out = np.empty(x.shape, np.float32)
    rows = max(1, _BLOCK_BYTES // max(1, x[0:1].nbytes)) if x.shape[0] else 1
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows]
        if block.dtype.itemsize > 4:  # float64 may not fit float32 before scaling
            y = _rescaled(block, axis)
        else:
            y = out[start:start + rows]
            y[...] = block
        sq = np.sum(np.square(y), axis=axis, keepdims=True)
        # also zero squares: a subnormal vector's square is 0 although the vector is not
        extreme = ~((sq >= _SAFE_SQNORM[0]) & (sq <= _SAFE_SQNORM[1]))
        if extreme.any():  # rare: rescale those vectors (an inf/NaN stays non-finite)
            where = np.broadcast_to(extreme, y.shape)
            y = np.where(where, _rescaled(np.asarray(block, dtype=np.result_type(block, np.float32)),
                                          axis), y)
            sq = np.sum(np.square(y), axis=axis, keepdims=True)
        norms = np.sqrt(sq)
        norms[norms == 0] = 1.0  # zero vectors stay zero
        if scale != 1.0:
            norms /= np.float32(scale)
        np.divide(y, norms, out=out[start:start + rows])
    return out


def normalize_parts(x):
    """float32 [n, P, D]: each nonzero part vector of `x` normalised, then divided by sqrt(P)."""
    return unit_vectors(x, axis=2, scale=1.0 / np.sqrt(x.shape[1]))


def l2_normalize_rows(x):
    """In place for float32 `x` [n, F]: each nonzero row normalised (zero rows stay zero)."""
    return unit_vectors(x, axis=1, out=x if x.dtype == np.float32 else None)


class SpreadMeter:
    """Total variance across rows of unit [F] vectors, accumulated chunk by chunk (float64).

    For unit rows it lies in [0, 1]: 0 when every row is the same vector.
    """

    def __init__(self, width):
        self.count = 0
        self.sum = np.zeros(width, np.float64)
        self.sum_sq = 0.0

    def add(self, rows):
        """Add unit rows [n, F]."""
        rows = rows.reshape(rows.shape[0], -1)
        self.count += rows.shape[0]
        self.sum += rows.sum(axis=0, dtype=np.float64)
        self.sum_sq += float(np.einsum("nf,nf->", rows, rows, dtype=np.float64))

    def variance(self):
        if self.count == 0:
            return 0.0
        mean = self.sum / self.count
        return max(self.sum_sq / self.count - float(mean @ mean), 0.0)

    def warning(self, what, source=""):
        """A message saying the rows are degenerate, or None when they are not."""
        variance = self.variance()
        if self.count < 2 or variance >= DEGENERATE_VARIANCE:
            return None
        where = f"{source}: " if source else ""
        return (f"{where}{what} are nearly identical across all {self.count} rows (variance "
                f"{variance:.2e} of the unit vectors, below {DEGENERATE_VARIANCE:g}); rankings "
                "of them are only tie order. Train longer or check the model and data")


def iter_chunks(feat, rows):
    """Yield (start, chunk [c, P, D] in feat's own dtype) of `feat`, `rows` frames at a time.

    A chunk may be a reused buffer: it is valid (and writable) until the next is requested.
    """
    n = feat.shape[0]
    direct = (isinstance(feat, np.memmap) and isinstance(feat.base, mmap.mmap)
              and feat.flags.c_contiguous and isinstance(feat.filename, str))
    if not direct:
        for start in range(0, n, rows):
            yield start, np.array(feat[start:start + rows])
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
            yield start, buf[:c]


def chunk_rows(feat_shape, chunk_bytes=CHUNK_BYTES):
    """Frames per chunk so that a float32 chunk of [P, D] frames takes about `chunk_bytes`."""
    return max(1, chunk_bytes // (int(np.prod(feat_shape[1:])) * 4))


class TrackletPooler:
    """Pools frames into unit tracklet features [T, P*D], fed chunk by chunk in any order."""

    def __init__(self, num_tracklets, parts, dim, *, pooling="max", source=""):
        if pooling not in ("max", "mean"):
            raise ValueError(f"pooling must be 'max' or 'mean', got {str(pooling)!r}")
        self.t, self.p, self.d = int(num_tracklets), parts, dim
        self.pooling = pooling
        self.where = f"{source}: " if source else ""
        fill = -np.inf if pooling == "max" else 0.0
        self.out = np.full((self.t, parts * dim), fill, dtype=np.float32)  # [T, P*D]
        self.counts = np.zeros(self.t, dtype=np.int64)

    def add(self, start, chunk, tracks):
        """Frames start..start+c-1: `chunk` [c, P, D] (any float dtype), `tracks` [c]."""
        c = chunk.shape[0]
        tracks = np.asarray(tracks).astype(np.int64)
        if tracks.min() < 0 or tracks.max() >= self.t:
            raise FeaturesError(f"{self.where}array 'frame_track': indices must lie in [0, {self.t}), "
                                f"found range [{tracks.min()}, {tracks.max()}] in frames "
                                f"{start}..{start + c - 1}")
        x = normalize_parts(chunk).reshape(c, self.p * self.d)  # [c, P*D]
        if not np.isfinite(x).all():
            bad = first_nonfinite_row(chunk)
            raise FeaturesError(f"{self.where}array 'frame_feat': contains NaN or inf (first at "
                                f"row {start + bad})")
        if np.any(tracks[1:] < tracks[:-1]):
            order = np.argsort(tracks, kind="stable")
            tracks, x = tracks[order], x[order]
        starts = np.flatnonzero(np.concatenate(([True], tracks[1:] != tracks[:-1])))
        ids = tracks[starts]  # unique within the chunk
        if self.pooling == "max":
            self.out[ids] = np.maximum(self.out[ids], np.maximum.reduceat(x, starts, axis=0))
        else:
            self.out[ids] += np.add.reduceat(x, starts, axis=0)
        self.counts[ids] += np.diff(np.append(starts, c))

    def result(self, required=None):
        """Unit tracklet features [T, P*D]; tracklets without frames are zero rows, an error
        when listed in `required` (e.g. query and gallery)."""
        if required is not None:
            required = np.asarray(required)
            missing = required[self.counts[required] == 0]
            if missing.size:
                raise FeaturesError(f"{self.where}array 'frame_track': tracklet(s) "
                                    f"{missing[:10].tolist()} used as query/gallery have no frames")
        out, counts = self.out, self.counts
        empty = counts == 0
        out[empty] = 0.0
        if self.pooling == "mean":
            out[~empty] /= counts[~empty, None].astype(np.float32)
        return l2_normalize_rows(out)


def pool_tracklets(frame_feat, frame_track, num_tracklets, *, pooling="max", required=None,
                   chunk_bytes=CHUNK_BYTES, source=""):
    """Pool per-frame features [N, P, D] into unit tracklet features [T, P*D] (float32).

    `frame_track` [N] gives each frame's tracklet (0..T-1, any order). Tracklets listed in
    `required` (e.g. query and gallery) must own at least one frame; others without frames
    come back as zero rows. NaN/inf frames and out-of-range tracklet ids raise FeaturesError
    (naming `source`, the file, when given).
    """
    _, p, d = frame_feat.shape
    pooler = TrackletPooler(num_tracklets, p, d, pooling=pooling, source=source)
    for start, x in iter_chunks(frame_feat, chunk_rows(frame_feat.shape, chunk_bytes)):
        pooler.add(start, x, frame_track[start:start + x.shape[0]])
    return pooler.result(required)


def _scaled_track_feat(feat, source):
    """Pooled features [T, F] as float32, scaled by one power of two when their squares
    could overflow or underflow float32 (Euclidean and cosine rankings unchanged)."""
    rows = max(1, _BLOCK_BYTES // max(1, feat[0:1].nbytes)) if feat.shape[0] else 1
    peak = max((float(np.max(np.abs(feat[s:s + rows]))) for s in range(0, feat.shape[0], rows)),
               default=0.0)
    if not np.isfinite(peak):
        check_finite("track_feat", feat.reshape(feat.shape[0], 1, -1), source)
    if peak > 2.0**40 or 0.0 < peak < 2.0**-40:
        feat = np.ldexp(np.asarray(feat), -int(np.frexp(peak)[1]))
    return np.ascontiguousarray(feat, dtype=np.float32)


def tracklet_features_and_sqnorms(arrays, *, pooling=None, source=""):
    """(tracklet features [T, P*D] float32, their squared norms [T]) of a features dict.

    Pooled (`track_feat`) rows are used as given, up to one exact power-of-two scale when
    their magnitude is extreme. Per-frame features are pooled by the rule above.
    """
    t = arrays["pid"].shape[0]
    if "track_feat" in arrays:
        feat = _scaled_track_feat(np.asarray(arrays["track_feat"]).reshape(t, -1), source)
        return feat, np.einsum("tf,tf->t", feat, feat)
    pooling = pooling or str(arrays.get("pooling", "max"))
    required = np.union1d(arrays["query"], arrays["gallery"])
    feat = pool_tracklets(arrays["frame_feat"], arrays["frame_track"], t, pooling=pooling,
                          required=required, source=source)
    return feat, np.einsum("tf,tf->t", feat, feat)


def tracklet_features(arrays, *, pooling=None, source=""):
    """Unit tracklet features [T, P*D] float32 from a validated features dict.

    `pooling` overrides the file's own `pooling` entry (default "max"); it only matters
    for per-frame files.
    """
    return tracklet_features_and_sqnorms(arrays, pooling=pooling, source=source)[0]
