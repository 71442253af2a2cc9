"""Anchor memory and the DAL / uPMnet association loss.

Every training tracklet owns one row of two tables per part: ``intra`` (the
intra-camera anchor) and ``cross`` (the cross-camera anchor). All cameras share one
flat tracklet axis; camera ``c`` occupies rows ``offsets[c] : offsets[c] + N_c``, and
per-camera logic is expressed with masks over that axis (no Python loop over cameras
or samples). Tables are stored un-normalised and L2-normalised at every use.

One step (``associate``), per part, in float32:

1. positives against the tables *before* this step's updates (clean pre-update reads;
   the original TF graph read the cross table without ordering and could tear);
2. hard negative = nearest intra anchor of the sample's own camera (ties -> lowest
   row); if that is the sample's own tracklet, the negative distance falls back to the
   mean nearest-anchor distance over the batch samples of the same camera;
3. hinge losses on intra and cross positives, averaged over the batch, then over parts;
   gradients reach the features only (anchors are constants);
4. intra update ``intra[l] -= eta * (A[l] - f)``; a tracklet seen k times in the batch
   receives the sum of its k updates;
5. cyclic ranking on the updated anchors A': a = A'[l], R = nearest row among all other
   cameras, b = nearest row to A'[R] in the own camera; consistent iff b == l and
   cross association is on;
6. cross overwrite ``cross[l] = (a + A'[R]) / 2`` if consistent else ``a``.

Write conflicts: every occurrence of a tracklet in the batch computes its cross value
from the same row of A', so all occurrences agree. The update is nevertheless written
by the *first* occurrence of each tracklet in the batch only (later ones are dropped),
and the k intra deltas of a tracklet are summed with a 0/1 matrix product before one
write. This makes the update deterministic (GPU scatters with duplicate indices apply
them in no fixed order) with the same values as a scatter-add / scatter-update.

Rankings compare |t|^2 - 2 q.t with the exact norm of each normalised row (1, or 0 for
a zero row), so mathematically tied candidates tie exactly and resolve to the lowest
row, as the semantics require (e.g. a zero row R ranked back against unit anchors).

Gradients follow the original TF graph: the negative's gradient goes to the selected
anchor only (as ``top_k``), the hinge passes gradient at exactly zero (as
``tf.maximum(x, 0)``), and the fallback mean spreads gradient over the same-camera
samples.
"""
from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / sqrt(max(|x|^2, 1e-10)) over the last axis (as tf.nn.l2_normalize; zero rows stay zero)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-10))


@flax.struct.dataclass
class AnchorMemory:
    """Intra- and cross-camera anchors of every tracklet, one table pair per part.

    intra, cross: float32 [P, T, D], stored un-normalised.
    offsets: static start row of each camera on the flat tracklet axis (length C).
    """

    intra: jax.Array  # [P, T, D]
    cross: jax.Array  # [P, T, D]
    offsets: tuple = flax.struct.field(pytree_node=False)

    @property
    def num_cameras(self) -> int:
        return len(self.offsets)

    @property
    def num_tracklets(self) -> int:
        return int(self.intra.shape[1])

    @property
    def tracklets_per_camera(self) -> tuple:
        ends = self.offsets[1:] + (self.num_tracklets,)
        return tuple(e - s for s, e in zip(self.offsets, ends))

    @property
    def row_camera(self) -> np.ndarray:
        """Camera of every row of the flat tracklet axis, int32 [T] (a static constant)."""
        return np.repeat(np.arange(self.num_cameras, dtype=np.int32),
                         self.tracklets_per_camera).astype(np.int32)

    @classmethod
    def zeros(cls, tracklets_per_camera: Sequence[int], num_parts: int, dim: int) -> "AnchorMemory":
        """All anchors at zero (the originals' default initialisation)."""
        sizes = _check_sizes(tracklets_per_camera)
        for name, value in (("num_parts", num_parts), ("dim", dim)):
            if int(value) != value or value < 1:
                raise ValueError(f"AnchorMemory.zeros: {name} must be a positive integer, got {value!r}")
        shape = (int(num_parts), sum(sizes), int(dim))
        return cls(intra=jnp.zeros(shape, jnp.float32), cross=jnp.zeros(shape, jnp.float32),
                   offsets=_offsets(sizes))

    def from_features(self, features, track, camera) -> "AnchorMemory":
        """This memory with its anchors initialised from a first pass over the training frames.

        features [N, P, D] (raw model output), track [N] (0-based within camera),
        camera [N] (0-based); P, D and the cameras' tracklet counts come from this
        memory. Each tracklet's intra and cross anchors become the mean of its frames'
        L2-normalised features (per part); tracklets without frames are zero. (The
        originals loaded externally extracted features for this option; the
        per-tracklet mean is our documented choice.) Call as
        ``AnchorMemory.from_features(memory, features, track, camera)`` or
        ``memory.from_features(features, track, camera)``.
        """
        sizes = self.tracklets_per_camera
        num_parts, total, dim = self.intra.shape
        features = np.asarray(features, np.float32)
        track = np.asarray(track)
        camera = np.asarray(camera)
        if features.ndim != 3 or features.shape[1:] != (num_parts, dim):
            raise ValueError(f"AnchorMemory.from_features: features must be [N, {num_parts}, {dim}] "
                             f"to match the memory, got shape {features.shape}")
        n = features.shape[0]
        if track.shape != (n,) or camera.shape != (n,):
            raise ValueError(f"AnchorMemory.from_features: track {track.shape} and camera {camera.shape} "
                             f"must both be [{n}] to match features {features.shape}")
        _check_ids(track, camera, sizes, "AnchorMemory.from_features")
        rows = np.asarray(self.offsets, np.int64)[camera] + track  # [N]
        normed = l2_normalize(jnp.asarray(features))  # [N, P, D]
        sums = jax.ops.segment_sum(normed, jnp.asarray(rows), num_segments=total)  # [T, P, D]
        counts = np.bincount(rows, minlength=total).astype(np.float32)  # [T]
        mean = sums / jnp.maximum(jnp.asarray(counts), 1.0)[:, None, None]
        table = jnp.transpose(mean, (1, 0, 2)).astype(jnp.float32)  # [P, T, D]
        # two distinct buffers: the train step donates the memory, and a buffer may not be donated twice
        return self.replace(intra=table, cross=jnp.array(table, copy=True))


def _check_sizes(tracklets_per_camera) -> tuple:
    # a camera may have no training tracklets (it gets no rows); the memory as a whole needs one
    sizes = tuple(int(n) for n in tracklets_per_camera)
    if (not sizes or any(n < 0 for n in sizes) or sum(sizes) < 1
            or any(int(n) != n for n in tracklets_per_camera)):
        raise ValueError("AnchorMemory: tracklets_per_camera must list at least one camera, each with "
                         "a non-negative integer number of tracklets and at least one in total, got "
                         f"{tuple(tracklets_per_camera)!r}")
    return sizes


def _offsets(sizes: tuple) -> tuple:
    return tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes)[:-1]]))


def _check_ids(track: np.ndarray, camera: np.ndarray, sizes: tuple, where: str) -> None:
    if camera.size and (camera.min() < 0 or camera.max() >= len(sizes)):
        bad = camera[(camera < 0) | (camera >= len(sizes))][0]
        raise ValueError(f"{where}: camera value {bad} outside [0, {len(sizes)})")
    limit = np.asarray(sizes)[np.clip(camera, 0, len(sizes) - 1)]
    if track.size and ((track < 0) | (track >= limit)).any():
        i = int(np.argmax((track < 0) | (track >= limit)))
        raise ValueError(f"{where}: track value {track[i]} of camera {camera[i]} outside [0, {limit[i]})")


def _sq_dist(x: jax.Array, y: jax.Array) -> jax.Array:
    """Row-wise squared Euclidean distance, [..., D] x [..., D] -> [...]."""
    return jnp.sum(jnp.square(x - y), axis=-1)


def _unit_sq_norm(raw: jax.Array) -> jax.Array:
    """Exact |l2_normalize(raw)|^2 per row, [T, D] -> [T]: 1 for a normal row, 0 for a zero row."""
    return jnp.minimum(jnp.sum(raw * raw, axis=-1) / 1e-10, 1.0)


def _nearest(queries: jax.Array, table: jax.Array, table_sq: jax.Array, allowed: jax.Array) -> jax.Array:
    """Index of the nearest allowed table row for every query (ties -> lowest index).

    queries [B, D], table [T, D] (normalised rows), table_sq [T] their exact squared
    norms, allowed bool [B, T] -> int32 [B]. Ranks by |t|^2 - 2 q.t (|q|^2 is constant
    per query), which avoids a [B, T, D] temporary; the dot runs at full float32. Using
    the exact norms makes mathematically tied rows (e.g. every unit anchor seen from a
    zero query) tie exactly, so they resolve to the lowest index instead of by rounding.
    """
    d = table_sq[None, :] - 2.0 * jnp.dot(queries, table.T, precision=_HIGHEST)  # [B, T]
    return jnp.argmin(jnp.where(allowed, d, jnp.inf), axis=1).astype(jnp.int32)


def _hinge(x: jax.Array) -> jax.Array:
    """max(x, 0) with gradient 1 at x == 0, as TF's Maximum gradient."""
    return jnp.where(x >= 0.0, x, 0.0)


def _associate_part(intra, cross, feats, row, cam, row_cam, first, margin, eta, cross_on):
    """One part: intra/cross [T, D], feats [B, D] -> (loss, new_intra, new_cross, n_consistent, n_fallback)."""
    total = intra.shape[0]
    f = l2_normalize(feats)  # [B, D]
    anchors = l2_normalize(jax.lax.stop_gradient(intra))  # [T, D]
    cross_n = l2_normalize(jax.lax.stop_gradient(cross))  # [T, D]
    own_pos = anchors[row]  # [B, D]

    # 1-3: loss against the pre-update tables.
    d_pos_intra = _sq_dist(f, own_pos)  # [B]
    d_pos_cross = _sq_dist(f, cross_n[row])  # [B]
    own_cam = row_cam[None, :] == cam[:, None]  # [B, T]
    anchors_sq = _unit_sq_norm(jax.lax.stop_gradient(intra))  # [T]
    nearest = _nearest(jax.lax.stop_gradient(f), anchors, anchors_sq, own_cam)  # [B]
    d_min = _sq_dist(f, anchors[nearest])  # [B]
    same_cam = cam[:, None] == cam[None, :]  # [B, B]
    mean_min = (jnp.sum(jnp.where(same_cam, d_min[None, :], 0.0), axis=1)
                / jnp.sum(same_cam, axis=1).astype(jnp.float32))  # [B]
    fallback = nearest == row  # [B]
    d_neg = jnp.where(fallback, mean_min, d_min)  # [B]
    loss = (jnp.mean(_hinge(d_pos_intra - d_neg + margin))
            + jnp.mean(_hinge(d_pos_cross - d_neg + margin)))

    # 4: intra update, k occurrences of a tracklet summed, written once per tracklet.
    f_const = jax.lax.stop_gradient(f)
    delta = -eta * (own_pos - f_const)  # [B, D]
    same_row = (row[:, None] == row[None, :]).astype(jnp.float32)  # [B, B]
    summed = jnp.dot(same_row, delta, precision=_HIGHEST)  # [B, D]
    write_row = jnp.where(first, row, total)  # out-of-range rows are dropped
    new_intra = intra.at[write_row].add(summed, mode="drop")

    # 5-6: cyclic ranking on the updated anchors and cross overwrite.
    updated = l2_normalize(new_intra)  # [T, D]
    updated_sq = _unit_sq_norm(new_intra)  # [T]
    a = updated[row]  # [B, D]
    other = jnp.logical_not(own_cam)  # [B, T]
    match = updated[_nearest(a, updated, updated_sq, other)]  # [B, D]
    back = _nearest(match, updated, updated_sq, own_cam)  # [B]
    has_other = jnp.any(other, axis=1)  # [B]; False only with a single camera
    consistent = (back == row) & has_other & cross_on  # [B]
    value = jnp.where(consistent[:, None], (a + match) / 2.0, a)  # [B, D]
    new_cross = cross.at[write_row].set(value, mode="drop")
    return (loss, new_intra, new_cross, jnp.sum(consistent.astype(jnp.float32)),
            jnp.sum(fallback.astype(jnp.float32)))


def associate_with_metrics(memory: AnchorMemory, features, track, camera, *, margin, eta, cross_on):
    """``associate`` plus metrics.

    Returns (loss, new_memory, metrics) with metrics = {"cross_consistent": fraction of
    (sample, part) pairs whose cross association was consistent, "negative_fallback":
    fraction of (sample, part) pairs whose negative fell back to the camera mean}.
    """
    num_parts, total, dim = memory.intra.shape
    if features.ndim != 3 or features.shape[1] != num_parts or features.shape[2] != dim:
        raise ValueError(f"associate: features must be [B, {num_parts}, {dim}] to match the anchor memory "
                         f"[P, T, D] = {tuple(memory.intra.shape)}, got shape {tuple(features.shape)}")
    batch = features.shape[0]
    for name, ids in (("track", track), ("camera", camera)):
        if tuple(jnp.shape(ids)) != (batch,):
            raise ValueError(f"associate: {name} must have shape [{batch}] (one id per sample), "
                             f"got {tuple(jnp.shape(ids))}")
    track = jnp.asarray(track, jnp.int32)
    camera = jnp.asarray(camera, jnp.int32)
    row = jnp.asarray(memory.offsets, jnp.int32)[camera] + track  # [B]
    row_cam = jnp.asarray(memory.row_camera)  # [T]
    same_row = row[:, None] == row[None, :]  # [B, B]
    first = jnp.argmax(same_row, axis=1) == jnp.arange(batch)  # [B] first occurrence of each row
    cross_on = jnp.asarray(cross_on, jnp.bool_)

    part = jax.vmap(_associate_part, in_axes=(0, 0, 1, None, None, None, None, None, None, None))
    loss, intra, cross, n_consistent, n_fallback = part(
        memory.intra, memory.cross, features.astype(jnp.float32), row, camera, row_cam, first,
        margin, eta, cross_on)
    denom = float(batch * num_parts)
    metrics = {"cross_consistent": jnp.sum(n_consistent) / denom,
               "negative_fallback": jnp.sum(n_fallback) / denom}
    return jnp.mean(loss), memory.replace(intra=intra, cross=cross), metrics


def associate(memory: AnchorMemory, features, track, camera, *, margin, eta, cross_on):
    """One association step: (loss averaged over parts, updated memory).

    features [B, P, D] raw, track [B] within-camera tracklet index, camera [B]
    (0-based), cross_on a (traced) boolean scalar. See the module docstring.
    """
    loss, new_memory, _ = associate_with_metrics(memory, features, track, camera,
                                                 margin=margin, eta=eta, cross_on=cross_on)
    return loss, new_memory
