"""Distances, stable ranking, CMC and mAP in the paper (MATLAB) and standard modes.

Every query ranks the gallery by distance with ties kept in gallery order. Per query and
gallery entry a category is derived: *good* (same pid, other camera, pid != -1), *junk*
(pid -1, or same pid in the query's camera) or *other*. Ranks are 1-based positions
among the entries that are not skipped.

- paper mode: the gallery as given (it may contain the queries); junk skipped; MARS
  trapezoid AP with P_0 = 1; every query counted (a query without any good entry has
  AP 0 and never hits).
- standard mode: additionally the gallery entries that are queries are skipped; queries
  without any good entry are left out; AP = mean precision at the hits; mINP.
"""
import os
import warnings

import numpy as np

from upm_jax.evaluation import protocols
from upm_jax.evaluation.distances import DISTANCES, pairwise_distances
from upm_jax.evaluation.features import FeaturesError, load_features, validate_features
from upm_jax.evaluation.pooling import (DegenerateFeaturesWarning, SpreadMeter,
                                        tracklet_features_and_sqnorms)
from upm_jax.evaluation.rerank import k_reciprocal_distances

AP_MODES = ("paper", "standard")
RANKS = (1, 5, 10, 20)
_LOW_BITS = 3  # key low bits: category (1 good, 2 or 3 junk), bit 2: the entry is a query
_MAX_GALLERY = 1 << (32 - _LOW_BITS)
_BLOCK_ELEMENTS = 1 << 22  # query-block size x gallery size per ranking step
_PRODUCT_ELEMENTS = 1 << 26  # ... per distance product (256 MB of float32): few, large products


def _count_before(skip_flat, rows, cols, g):
    """For hits at (rows, cols) of a [b, g] block: how many skipped entries precede each
    in its row. `skip_flat`: sorted flat indices of the skipped entries."""
    return np.searchsorted(skip_flat, rows * g + cols) - np.searchsorted(skip_flat, rows * g)


class _Ranker:
    """Sorts query blocks and collects the ranks of the good entries for both modes."""

    def __init__(self, q_pid, q_cam, g_pid, g_cam, g_is_query):
        g = g_pid.shape[0]
        if g >= _MAX_GALLERY:
            raise ValueError(f"gallery has {g} entries; at most {_MAX_GALLERY - 1} are supported")
        self.q_pid, self.q_cam = q_pid, q_cam
        self.g_pid, self.g_cam = g_pid[None, :], g_cam[None, :]
        self.g_junk2 = ((g_pid == -1).astype(np.uint8) << 1)[None, :]  # [1, G]
        self.low = ((np.arange(g, dtype=np.uint64) << np.uint64(_LOW_BITS))
                    | (g_is_query.astype(np.uint64) << np.uint64(2)))  # [G]
        self.hits = {m: ([], []) for m in AP_MODES}

    def add(self, start, dist):
        """Rank queries start..start+len(dist)-1 given their distances [b, G] to the gallery
        (float32; overwritten)."""
        b = dist.shape[0]
        qp = self.q_pid[start:start + b, None]
        qc = self.q_cam[start:start + b, None]
        same = (self.g_pid == qp).view(np.uint8)  # [b, G]
        same_cam = (self.g_cam == qc).view(np.uint8)
        # 1 = same pid in another camera (good), 2 = same pid and camera (junk); pid -1
        # entries get bit 1 too, so any value >= 2 in the low two bits is junk
        cat = np.left_shift(same, same_cam, out=same)
        cat |= self.g_junk2
        np.maximum(dist, 0.0, out=dist)
        dist += 0.0  # -0.0 -> +0.0, so that equal distances have equal bit patterns and tie
        key = dist.view(np.uint32).astype(np.uint64)
        key <<= np.uint64(32)
        key |= self.low
        key |= cat
        key.sort(axis=1)  # unique keys: distance, then gallery position -> a stable ranking
        low_byte = key.view(np.uint8)[:, 0::8] if np.little_endian else key.view(np.uint8)[:, 7::8]
        c = low_byte & 7  # [b, G] category bits in ranked order
        g = c.shape[1]
        c3 = c & 3
        paper_skip = c3 >= 2
        rows, cols = np.nonzero(c3 == 1)  # hits, row-major: ranks ascend within a row
        before = _count_before(np.flatnonzero(paper_skip), rows, cols, g)
        self.hits["paper"][0].append(rows + start)
        self.hits["paper"][1].append(cols - before + 1)
        # standard mode also skips the gallery entries that are queries (bit 2)
        keep = c[rows, cols] < 4
        rows, cols, before = rows[keep], cols[keep], before[keep]
        query_skip = np.flatnonzero((c >= 4) & ~paper_skip)
        before += _count_before(query_skip, rows, cols, g)
        self.hits["standard"][0].append(rows + start)
        self.hits["standard"][1].append(cols - before + 1)


def _summary(n_query, rows, ranks, length, mode):
    """CMC / mAP (/ mINP) from the hit ranks of every query (rows sorted, ranks ascending)."""
    n_good = np.bincount(rows, minlength=n_query)
    first = np.cumsum(n_good) - n_good
    ordinal = np.arange(rows.shape[0]) - first[rows] + 1  # i-th hit of its query
    r = ranks.astype(np.float64)
    prec = ordinal / r
    if mode == "paper":
        prev = np.where(ranks > 1, (ordinal - 1) / np.maximum(r - 1, 1), 1.0)
        contrib = 0.5 * (prev + prec)
    else:
        contrib = prec
    has = n_good > 0
    ap = np.bincount(rows, contrib / n_good[rows], minlength=n_query)
    first_rank = np.full(n_query, length + 1, dtype=np.int64)
    first_rank[has] = ranks[first[has]]
    counted = np.ones(n_query, bool) if mode == "paper" else has
    n_counted = int(counted.sum())
    if n_counted == 0:
        raise ValueError(f"{mode} mode: no query has a valid match in the gallery")
    hist = np.bincount(first_rank[counted] - 1, minlength=length + 1)[:length]
    cmc = np.cumsum(hist) * (100.0 / n_counted)
    out = {f"rank{k}": float(cmc[min(k, length) - 1]) for k in RANKS}
    out["mAP"] = float(100.0 * ap[counted].mean())
    if mode == "standard":
        last = np.cumsum(n_good) - 1
        inp = n_good[has] / ranks[last[has]]
        out["mINP"] = float(100.0 * inp.mean())
    out["num_queries"] = n_counted
    out["gallery_size"] = int(length)
    out["cmc"] = [float(v) for v in cmc]
    return out


def _is_identity(index, n):
    """True if `index` is exactly 0..n-1 (then rows can be used without a copy)."""
    return index.shape[0] == n and bool((index == np.arange(n)).all())


def _modes(ap):
    if ap == "both":
        return AP_MODES
    if ap in AP_MODES:
        return (ap,)
    raise ValueError(f"ap must be 'paper', 'standard' or 'both', got {ap!r}")


def evaluate(features, *, distance="euclidean", ap="both", rerank=False, pooling=None, source=""):
    """Evaluate a features dict (see `load_features`); returns {mode: metrics}.

    metrics: rank1/5/10/20, mAP (and mINP in standard mode) in percent, `cmc` (whole
    curve, percent), `num_queries` (queries counted) and `gallery_size` (entries ranked).
    `rerank=True` applies k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3) first.
    `source` (the file's name) prefixes every error and warning. Gallery features that are
    nearly identical (a degenerate model) give a DegenerateFeaturesWarning.
    """
    modes = _modes(ap)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if pooling not in (None, "max", "mean"):
        raise ValueError(f"pooling must be 'max' or 'mean', got {str(pooling)!r}")
    validate_features(features, source=source, check_values=False)
    feat, sq = tracklet_features_and_sqnorms(features, pooling=pooling, source=source)  # [T, F], [T]
    pid = np.asarray(features["pid"]).astype(np.int64)
    cam = np.asarray(features["cam"]).astype(np.int64)
    _warn_if_degenerate(feat, sq, np.asarray(features["gallery"]).astype(np.int64), source)
    return protocols.combine([(name, _rank(feat, sq, pid, cam, query, gallery, modes, distance, rerank))
                              for name, query, gallery in protocols.rankings(features)])


def _rank(feat, sq, pid, cam, query, gallery, modes, distance, rerank):
    """{mode: metrics} of `query` tracklets ranking the `gallery` tracklets."""
    g_is_query = np.isin(gallery, query)
    ranker = _Ranker(pid[query], cam[query], pid[gallery], cam[gallery], g_is_query)
    n_q, n_g = query.shape[0], gallery.shape[0]
    block = max(1, _BLOCK_ELEMENTS // n_g)
    if rerank:
        dist = k_reciprocal_distances(feat, query, gallery, distance=distance)
        for s in range(0, n_q, block):
            ranker.add(s, dist[s:s + block])
    else:
        same = _is_identity(gallery, feat.shape[0])
        g_feat = feat if same else np.ascontiguousarray(feat[gallery])  # [G, F]
        q_feat = np.ascontiguousarray(feat[query])  # [Q, F]
        q_sq, g_sq = sq[query], sq[gallery]
        product_block = max(block, _PRODUCT_ELEMENTS // n_g // block * block)
        for p in range(0, n_q, product_block):
            dist = pairwise_distances(q_feat[p:p + product_block], g_feat, distance=distance,
                                      a_sqnorm=q_sq[p:p + product_block], b_sqnorm=g_sq,
                                      squared=True)  # [<=product_block, G]
            for s in range(0, dist.shape[0], block):
                ranker.add(p + s, dist[s:s + block])
    lengths = {"paper": n_g, "standard": n_g - int(g_is_query.sum())}
    result = {}
    for mode in modes:
        rows = np.concatenate(ranker.hits[mode][0])
        ranks = np.concatenate(ranker.hits[mode][1])
        result[mode] = _summary(n_q, rows, ranks, lengths[mode], mode)
    return result


def _warn_if_degenerate(feat, sq, gallery, source):
    """Warn when the gallery's nonzero features, made unit, hardly differ from each other."""
    meter = SpreadMeter(feat.shape[1])
    gallery = gallery[sq[gallery] > 0]
    rows = max(1, (8 << 20) // max(1, feat.shape[1]))
    for start in range(0, gallery.shape[0], rows):
        idx = gallery[start:start + rows]
        meter.add(feat[idx] / np.sqrt(sq[idx])[:, None])
    message = meter.warning("gallery tracklet features", source)
    if message:
        warnings.warn(message, DegenerateFeaturesWarning, stacklevel=3)


def mean_results(results):
    """Mean over splits of every number; CMC curves averaged over their common length
    (two-direction results: each direction's numbers are averaged too)."""
    mean = {}
    for mode in results[0]:
        per = [r[mode] for r in results]
        m = protocols.mean_metrics(per, exclude=("directions",))
        if all("directions" in p for p in per):
            m["directions"] = {name: mean_results([{mode: p["directions"][name]} for p in per])[mode]
                               for name in per[0]["directions"]}
        mean[mode] = m
    return mean


def feature_shape(features):
    """(P, D) of a features dict's per-frame or pooled features."""
    feat = features["frame_feat"] if "frame_feat" in features else features["track_feat"]
    return tuple(int(v) for v in feat.shape[1:])


def evaluate_files(paths, *, distance="euclidean", ap="both", rerank=False, pooling=None):
    """Evaluate several features files (splits of one protocol): each, and their mean.

    Returns {"files": [path, ...], "splits": [result, ...], "mean": result}.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no features files given")
    loaded = [load_features(p) for p in paths]
    parts = [feature_shape(f)[0] for f in loaded]
    if len(set(parts)) > 1:
        listing = ", ".join(f"{p} has P={n}" for p, n in zip(paths, parts))
        raise FeaturesError(f"the files are not splits of one protocol: their part counts differ "
                            f"({listing}); evaluate files of one model type together")
    splits = []
    for path, features in zip(paths, loaded):
        try:
            splits.append(evaluate(features, distance=distance, ap=ap, rerank=rerank,
                                   pooling=pooling, source=path))
        except ValueError as e:
            if isinstance(e, FeaturesError) or str(e).startswith(path):
                raise
            raise ValueError(f"{path}: {e}") from None
    return {"files": paths, "splits": splits, "mean": mean_results(splits)}
