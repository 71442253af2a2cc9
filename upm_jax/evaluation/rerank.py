"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, CVPR 2017), blockwise and memory-bounded.

Written from the paper's equations over the set S = query ∪ gallery (an entry that is
both counts once):
- d(p, g): the squared evaluation distance, divided by p's largest one (so in [0, 1]).
- N(p, k): p itself followed by its k nearest neighbours in S (ties by position).
- R(p, k) = {g in N(p, k) : p in N(g, k)}  (k-reciprocal neighbours).
- R*(p, k) = R(p, k) ∪ R(q, k/2) for every q in R(p, k) with
  |R(p, k) ∩ R(q, k/2)| > 2/3 |R(q, k/2)| (strictly more, as in the authors' code, which
  torchreid and fast-reid follow).
- V_p[g] = exp(-d(p, g)) on R*(p, k1), 0 elsewhere, normalised to sum 1.
- local query expansion: V_p <- mean of V_g over N(p, k2 - 1) (k2 entries incl. p).
- Jaccard distance d_J(p, g) = 1 - sum_j min(V_p, V_g) / sum_j max(V_p, V_g), computed
  with an inverted index over the sparse V (only the non-zeros are visited).
- final distance = (1 - lambda) d_J + lambda d.
Memory: one [S, S] float32 table of d (about 600 MB at MARS size), sparse V, and
[block, S] float32 working blocks.
"""
import numpy as np
import scipy.sparse as sp

from upm_jax.evaluation.distances import pairwise_distances

_ROW_BLOCK = 512
_DIST_ROWS = 1536  # rows per distance product: few large products (BLAS re-packs S x F each)
_JACCARD_ENTRIES = 1 << 22


def _reciprocal_mask(nn):
    """mask [S, k+1]: nn[p, j] is a k-reciprocal neighbour of p (p in N(nn[p, j], k))."""
    s = nn.shape[0]
    mask = np.empty(nn.shape, dtype=bool)
    for a in range(0, s, _ROW_BLOCK * 4):
        b = min(s, a + _ROW_BLOCK * 4)
        back = nn[nn[a:b]]  # [B, k+1, k+1] neighbour lists of p's neighbours
        mask[a:b] = (back == np.arange(a, b)[:, None, None]).any(axis=2)
    return mask


def _expanded_sets(nn, half):
    """COO rows/cols of R*(p, k1) for every p, from the neighbour lists nn [S, k1+1]
    (p first) and the expansion size half = k1/2."""
    s = nn.shape[0]
    r_mask = _reciprocal_mask(nn)  # [S, k1+1]
    nnh = np.ascontiguousarray(nn[:, :half + 1])
    h_mask = _reciprocal_mask(nnh)  # [S, half+1]
    h_size = h_mask.sum(axis=1)  # |R(q, k1/2)|
    rows, cols = [], []
    for a in range(0, s, _ROW_BLOCK):
        b = min(s, a + _ROW_BLOCK)
        base = np.where(r_mask[a:b], nn[a:b], -1)  # [B, k1+1] R(p, k1), -1 = absent
        cand = nn[a:b]  # [B, k1+1] candidates q
        members = np.where(h_mask[cand], nnh[cand], -2)  # [B, k1+1, half+1] R(q, k1/2)
        inside = (members[:, :, :, None] == base[:, None, None, :]).any(axis=3)
        overlap = inside.sum(axis=2)  # [B, k1+1] |R(p,k1) ∩ R(q,k1/2)|
        accept = r_mask[a:b] & (3 * overlap > 2 * h_size[cand])
        extra = np.where(accept[:, :, None], members, -1).reshape(b - a, -1)
        allm = np.concatenate([base, extra], axis=1)
        allm.sort(axis=1)
        keep = allm >= 0
        keep[:, 1:] &= allm[:, 1:] != allm[:, :-1]
        r, c = np.nonzero(keep)
        rows.append(r + a)
        cols.append(allm[r, c])
    return np.concatenate(rows), np.concatenate(cols)


def k_reciprocal_distances(feat, query, gallery, *, distance="euclidean", k1=20, k2=6,
                           lambda_value=0.3):
    """Re-ranked distances [Q, G] float32 between tracklets `query` and `gallery` of `feat` [T, F]."""
    query = np.asarray(query, dtype=np.int64)
    gallery = np.asarray(gallery, dtype=np.int64)
    items = np.union1d(query, gallery)  # S, sorted tracklet indices
    s = items.shape[0]
    if not 1 <= k2 <= k1 + 1:
        raise ValueError(f"re-ranking needs 1 <= k2 <= k1 + 1, got k1={k1}, k2={k2}")
    k = min(k1, s - 1)
    x = feat if items.shape[0] == feat.shape[0] else feat[items]
    x = np.ascontiguousarray(x, dtype=np.float32)  # [S, F]
    x_sq = np.einsum("sf,sf->s", x, x)
    q_pos = np.searchsorted(items, query)
    g_pos = np.searchsorted(items, gallery)
    q_of = np.full(s, -1, dtype=np.int64)
    q_of[q_pos] = np.arange(query.shape[0])
    table = np.empty((s, s), dtype=np.float32)  # d(p, g), normalised per row
    d_qg = np.empty((query.shape[0], gallery.shape[0]), dtype=np.float32)  # [Q, G]
    nn = np.empty((s, k + 1), dtype=np.int64)
    for a in range(0, s, _DIST_ROWS):
        b = min(s, a + _DIST_ROWS)
        d = pairwise_distances(x[a:b], x, distance=distance, a_sqnorm=x_sq[a:b], b_sqnorm=x_sq,
                               squared=True)  # [B, S]
        if distance != "euclidean":
            np.square(d, out=d)
        d /= np.maximum(d.max(axis=1, keepdims=True), 1e-12)
        table[a:b] = d
        is_q = q_of[a:b] >= 0
        d_qg[q_of[a:b][is_q]] = d[is_q][:, g_pos]
        d[np.arange(b - a), np.arange(a, b)] = -1.0  # p itself comes first in N(p, k)
        if k + 1 < s:
            part = np.argpartition(d, k, axis=1)[:, :k + 1]  # [B, k+1] unordered
        else:
            part = np.tile(np.arange(s), (b - a, 1))
        order = np.lexsort((part, np.take_along_axis(d, part, axis=1)), axis=1)
        nn[a:b] = np.take_along_axis(part, order, axis=1)
    rows, cols = _expanded_sets(nn, min(int(round(k1 / 2)), k))
    w = np.exp(-table[rows, cols])
    w /= np.bincount(rows, w, minlength=s)[rows].astype(np.float32)
    v = sp.csr_array((w, (rows, cols)), shape=(s, s), dtype=np.float32)
    if k2 > 1:
        kk = min(k2, k + 1)
        e_rows = np.repeat(np.arange(s), kk)
        e = sp.csr_array((np.full(s * kk, 1.0 / kk, dtype=np.float32),
                          (e_rows, nn[:, :kk].reshape(-1))), shape=(s, s))
        v = (e @ v).tocsr()
    del table
    v_sum = np.asarray(v.sum(axis=1)).reshape(-1)  # [S]
    v_csc = v.tocsc()
    final = np.empty_like(d_qg)
    per_row = max(1, int(np.diff(v.indptr).mean() * np.diff(v_csc.indptr).mean()))
    q_block = max(1, _JACCARD_ENTRIES // per_row)
    for a in range(0, query.shape[0], q_block):
        pos = q_pos[a:a + q_block]
        sub = v[pos]  # CSR rows of the block's queries
        n_b = pos.shape[0]
        r = np.repeat(np.arange(n_b), np.diff(sub.indptr))
        j, val = sub.indices, sub.data
        start = v_csc.indptr[j]
        cnt = v_csc.indptr[j + 1] - start
        src = np.repeat(np.arange(j.shape[0]), cnt)
        offs = np.arange(src.shape[0]) - np.repeat(np.cumsum(cnt) - cnt, cnt) + start[src]
        mins = np.minimum(val[src], v_csc.data[offs])
        inter = np.bincount(r[src] * s + v_csc.indices[offs], mins, minlength=n_b * s)
        inter = inter.reshape(n_b, s)[:, g_pos]  # [b, G] sum_j min(V_p, V_g)
        union = v_sum[pos][:, None] + v_sum[g_pos][None, :] - inter
        jac = 1.0 - inter / np.maximum(union, 1e-12)
        final[a:a + n_b] = (1.0 - lambda_value) * jac + lambda_value * d_qg[a:a + n_b]
    return final
