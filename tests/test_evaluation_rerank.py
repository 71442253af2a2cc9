"""k-reciprocal re-ranking against a dense, set-based reference written from the paper."""
import numpy as np
import pytest

from upm_jax.evaluation import evaluate, k_reciprocal_distances


def _dense_rerank(feat, query, gallery, k1, k2, lam):
    """Straightforward dense version: full matrices and Python sets."""
    items = sorted(set(query) | set(gallery))
    x = feat[items].astype(np.float64)
    s = len(items)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    d = d / d.max(axis=1, keepdims=True)
    ranked = []
    for p in range(s):
        others = sorted((i for i in range(s) if i != p), key=lambda i: (d[p, i], i))
        ranked.append([p] + others)

    def reciprocal(p, k):
        return {g for g in ranked[p][:k + 1] if p in ranked[g][:k + 1]}

    half = int(round(k1 / 2))
    v = np.zeros((s, s))
    for p in range(s):
        r = reciprocal(p, k1)
        expanded = set(r)
        for q in r:
            rq = reciprocal(q, half)
            if len(r & rq) >= 2 / 3 * len(rq):
                expanded |= rq
        idx = sorted(expanded)
        w = np.exp(-d[p, idx])
        v[p, idx] = w / w.sum()
    v = np.stack([v[ranked[p][:k2]].mean(axis=0) for p in range(s)])
    pos = {t: i for i, t in enumerate(items)}
    qi, gi = [pos[t] for t in query], [pos[t] for t in gallery]
    out = np.zeros((len(query), len(gallery)))
    for a, p in enumerate(qi):
        for b, g in enumerate(gi):
            jac = 1 - np.minimum(v[p], v[g]).sum() / np.maximum(v[p], v[g]).sum()
            out[a, b] = (1 - lam) * jac + lam * d[p, g]
    return out


def _clustered(rng, n, dim=6, groups=8):
    centre = rng.standard_normal((groups, dim))
    x = centre[rng.integers(0, groups, n)] + 0.7 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("k1, k2", [(6, 3), (20, 6)])
def test_matches_dense_reference_queries_inside_gallery(k1, k2):
    rng = np.random.default_rng(k1)
    feat = _clustered(rng, 70)
    query = np.array([3, 10, 11, 40, 69])
    gallery = np.arange(70)
    got = k_reciprocal_distances(feat, query, gallery, k1=k1, k2=k2, lambda_value=0.3)
    want = _dense_rerank(feat, query.tolist(), gallery.tolist(), k1, k2, 0.3)
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_matches_dense_reference_disjoint_query_and_gallery():
    rng = np.random.default_rng(7)
    feat = _clustered(rng, 50)
    query = np.arange(0, 50, 5)
    gallery = np.setdiff1d(np.arange(50), query)[::-1]  # any order
    got = k_reciprocal_distances(feat, query, gallery, k1=8, k2=4, lambda_value=0.5)
    want = _dense_rerank(feat, query.tolist(), gallery.tolist(), 8, 4, 0.5)
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_fewer_items_than_k1():
    rng = np.random.default_rng(2)
    feat = _clustered(rng, 9)
    query, gallery = np.array([0, 4]), np.arange(9)
    got = k_reciprocal_distances(feat, query, gallery)  # k1 = 20 > 8 other items
    want = _dense_rerank(feat, query.tolist(), gallery.tolist(), 20, 6, 0.3)
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_lambda_one_keeps_original_ranking():
    rng = np.random.default_rng(1)
    feat = _clustered(rng, 40)
    query, gallery = np.arange(5), np.arange(5, 40)
    got = k_reciprocal_distances(feat, query, gallery, k1=6, k2=3, lambda_value=1.0)
    d = ((feat[query, None] - feat[None, gallery]) ** 2).sum(-1)
    d_all = ((feat[:, None] - feat[None]) ** 2).sum(-1)
    np.testing.assert_allclose(got, d / d_all[query].max(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_evaluate_with_rerank_improves_clustered_case():
    rng = np.random.default_rng(5)
    n = 120
    pid = rng.integers(1, 9, n).astype(np.int32)
    cam = rng.integers(1, 4, n).astype(np.int32)
    centre = rng.standard_normal((9, 16))
    x = centre[pid] + 1.3 * rng.standard_normal((n, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    f = {"track_feat": x[:, None, :], "pid": pid, "cam": cam, "query": np.arange(20, dtype=np.int32),
         "gallery": np.arange(n, dtype=np.int32)}
    plain, rr = evaluate(f), evaluate(f, rerank=True)
    assert rr["paper"]["mAP"] > plain["paper"]["mAP"]
    assert rr["standard"]["mAP"] > plain["standard"]["mAP"]
