"""k-reciprocal re-ranking against a dense, set-based reference written from the paper."""
import numpy as np
import pytest

from upm_jax.evaluation import evaluate, k_reciprocal_distances


def _dense_rerank(feat, query, gallery, k1, k2, lam, strict=True):
    """An independent implementation of the reference rules (Zhong et al.'s, which torchreid
    and fast-reid follow), written as their code is structured: a float64 distance matrix
    over the set S = query ∪ gallery, a full rank matrix, per-row loops; the expansion
    takes R(q, k1/2) when it shares STRICTLY more than 2/3 of its entries with R(p, k1)."""
    items = sorted(set(query) | set(gallery))
    x = feat[items].astype(np.float64)
    s = len(items)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    dist = dist / dist.max(axis=1, keepdims=True)
    order = dist + np.diag(np.full(s, -1.0))     # p first in its own list
    rank = np.argsort(order, axis=1, kind="stable")   # [S, S]

    def reciprocal(i, k):
        forward = rank[i, :k + 1]
        backward = rank[forward, :k + 1]
        return forward[np.any(backward == i, axis=1)]

    v = np.zeros((s, s))
    for i in range(s):
        base = reciprocal(i, k1)
        expansion = base
        for candidate in base:
            cand = reciprocal(candidate, int(np.around(k1 / 2)))
            shared = len(np.intersect1d(cand, base))
            if shared > 2 / 3 * len(cand) or (not strict and shared >= 2 / 3 * len(cand)):
                expansion = np.append(expansion, cand)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        v[i, expansion] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(s)])
    pos = {t: i for i, t in enumerate(items)}
    qi, gi = [pos[t] for t in query], [pos[t] for t in gallery]
    out = np.zeros((len(query), len(gallery)))
    for a, p in enumerate(qi):
        for b, g in enumerate(gi):
            jaccard = 1 - np.minimum(v[p], v[g]).sum() / np.maximum(v[p], v[g]).sum()
            out[a, b] = (1 - lam) * jaccard + lam * dist[p, g]
    return out


def _assert_same(got, want):
    """Distances within 1e-5 and every query's gallery ranking identical."""
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.argsort(got, axis=1, kind="stable"),
                                  np.argsort(want, axis=1, kind="stable"))


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
    _assert_same(got, want)


def test_matches_dense_reference_disjoint_query_and_gallery():
    rng = np.random.default_rng(7)
    feat = _clustered(rng, 50)
    query = np.arange(0, 50, 5)
    gallery = np.setdiff1d(np.arange(50), query)[::-1]  # any order
    got = k_reciprocal_distances(feat, query, gallery, k1=8, k2=4, lambda_value=0.5)
    want = _dense_rerank(feat, query.tolist(), gallery.tolist(), 8, 4, 0.5)
    _assert_same(got, want)


def test_fewer_items_than_k1():
    rng = np.random.default_rng(2)
    feat = _clustered(rng, 9)
    query, gallery = np.array([0, 4]), np.arange(9)
    got = k_reciprocal_distances(feat, query, gallery)  # k1 = 20 > 8 other items
    want = _dense_rerank(feat, query.tolist(), gallery.tolist(), 20, 6, 0.3)
    _assert_same(got, want)


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_reference_rules_on_random_sets(seed):
    """Random sizes, dimensions, k1/k2 and query/gallery overlaps (the default k1 = 20,
    k2 = 6 among them); the expansion's strict `>` decides sets where `>=` would not
    (e.g. |R(q, 10)| = 3 sharing 2)."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(60, 160))
    feat = _clustered(rng, n, dim=int(rng.integers(4, 24)), groups=int(rng.integers(4, 12)))
    query = np.sort(rng.choice(n, int(rng.integers(5, 25)), replace=False))
    gallery = rng.permutation(n)[:int(rng.integers(n // 2, n + 1))]
    k1, k2 = ((20, 6) if seed < 2 else (int(rng.integers(3, 25)), int(rng.integers(1, 8))))
    got = k_reciprocal_distances(feat, query, gallery, k1=k1, k2=k2, lambda_value=0.3)
    want = _dense_rerank(feat, query.tolist(), gallery.tolist(), k1, k2, 0.3)
    _assert_same(got, want)


def test_the_expansion_rule_is_strict():
    """On this set the >= rule would expand differently (distances apart by far more than
    the tolerance); the result follows >."""
    rng = np.random.default_rng(3)
    feat = _clustered(rng, 80)
    query, gallery = np.arange(10), np.arange(80)
    got = k_reciprocal_distances(feat, query, gallery)
    args = (feat, query.tolist(), gallery.tolist(), 20, 6, 0.3)
    _assert_same(got, _dense_rerank(*args))
    assert np.abs(got - _dense_rerank(*args, strict=False)).max() > 1e-3


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
