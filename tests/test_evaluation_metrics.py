"""Hand-computed cases for the ranking rules, CMC, paper/standard AP and mINP."""
import numpy as np
import pytest

from upm_jax.evaluation import evaluate, pairwise_distances


def _circle(angles):
    """Unit features [n, 1, 2] on the circle: distance to angle 0 grows with the angle."""
    a = np.asarray(angles, dtype=np.float64)
    return np.stack([np.cos(a), np.sin(a)], axis=1)[:, None, :].astype(np.float32)


def _features(angles, pid, cam, query, gallery):
    return {"track_feat": _circle(angles), "pid": np.asarray(pid, np.int32),
            "cam": np.asarray(cam, np.int32), "query": np.asarray(query, np.int32),
            "gallery": np.asarray(gallery, np.int32)}


def test_junk_is_skipped_in_cmc_and_trapezoid_vs_standard_ap():
    # query 0 (pid 1, cam 1) is in the gallery (same pid, same cam -> junk), then pid -1
    # junk, a distractor (pid 0), the true match (pid 1, cam 2), another person.
    f = _features([0.0, 0.1, 0.2, 0.3, 0.4], pid=[1, -1, 0, 1, 2], cam=[1, 2, 2, 2, 1],
                  query=[0], gallery=[0, 1, 2, 3, 4])
    r = evaluate(f)
    paper, std = r["paper"], r["standard"]
    assert paper["rank1"] == 0.0 and paper["rank5"] == 100.0
    assert paper["cmc"] == [0.0, 100.0, 100.0, 100.0, 100.0]
    assert paper["mAP"] == pytest.approx(25.0)  # one match at rank 2: (0 + 1/2) / 2
    # standard: the query column leaves the gallery; same ranking otherwise
    assert std["cmc"] == [0.0, 100.0, 100.0, 100.0]
    assert std["mAP"] == pytest.approx(50.0)  # precision 1/2 at the hit
    assert std["mINP"] == pytest.approx(50.0)
    assert (paper["gallery_size"], std["gallery_size"]) == (5, 4)


def test_two_matches_trapezoid_and_standard():
    # non-junk ranking: good, other, good
    f = _features([0.0, 0.1, 0.2, 0.3], pid=[1, 1, 2, 1], cam=[1, 2, 2, 3],
                  query=[0], gallery=[1, 2, 3])
    r = evaluate(f)
    trapezoid = 0.5 * (1 + 1) / 2 + 0.5 * (1 / 2 + 2 / 3) / 2
    assert r["paper"]["mAP"] == pytest.approx(100 * trapezoid)
    assert r["standard"]["mAP"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert r["standard"]["mINP"] == pytest.approx(100 * 2 / 3)
    assert r["paper"]["rank1"] == 100.0


def test_query_whose_matches_are_all_junk():
    # query 0 (pid 1) and query 3 (pid 5): pid 5 is only seen in its own camera -> all junk.
    f = _features([0.0, 0.2, 0.1, 3.0, 3.1], pid=[1, 1, 2, 5, 5], cam=[1, 2, 1, 1, 1],
                  query=[0, 3], gallery=[0, 1, 2, 3, 4])
    r = evaluate(f)
    # paper: both counted; query 0 has its match at rank 2 (rank 1 is pid 2), AP 0.25;
    # query 3 has AP 0 and never hits.
    assert r["paper"]["num_queries"] == 2
    assert r["paper"]["mAP"] == pytest.approx(100 * (0.25 + 0.0) / 2)
    assert r["paper"]["rank1"] == 0.0
    assert r["paper"]["rank5"] == 50.0
    assert r["paper"]["cmc"][-1] == 50.0
    # standard: the second query is skipped
    assert r["standard"]["num_queries"] == 1
    assert r["standard"]["mAP"] == pytest.approx(50.0)
    assert r["standard"]["rank5"] == 100.0


def test_junk_query_has_no_match():
    # a query with pid -1: its pid -1 gallery entries are junk, not matches
    f = _features([0.0, 0.1, 0.2], pid=[-1, -1, 2], cam=[1, 2, 2], query=[0], gallery=[1, 2])
    r = evaluate(f, ap="paper")
    assert (r["paper"]["mAP"], r["paper"]["cmc"], r["paper"]["num_queries"]) == (0.0, [0.0, 0.0], 1)
    with pytest.raises(ValueError, match="standard mode: no query has a valid match"):
        evaluate(f, ap="standard")


def test_distractors_are_ordinary_non_matches():
    f = _features([0.0, 0.1, 0.2], pid=[1, 0, 1], cam=[1, 2, 2], query=[0], gallery=[1, 2])
    r = evaluate(f)
    assert r["paper"]["rank1"] == 0.0 and r["paper"]["rank5"] == 100.0
    assert r["standard"]["mAP"] == pytest.approx(50.0)
    # a distractor query matches other distractors of other cameras, like any pid
    f = _features([0.0, 0.1, 0.2], pid=[0, 0, 1], cam=[1, 2, 2], query=[0], gallery=[1, 2])
    assert evaluate(f)["paper"]["rank1"] == 100.0


@pytest.mark.parametrize("gallery, rank1", [([1, 2], 0.0), ([2, 1], 100.0)])
def test_ties_keep_gallery_order(gallery, rank1):
    # tracklets 1 (other person) and 2 (the match) have identical features
    f = _features([0.0, 0.5, 0.5], pid=[1, 2, 1], cam=[1, 2, 2], query=[0], gallery=gallery)
    r = evaluate(f)
    assert r["paper"]["rank1"] == rank1
    assert r["standard"]["rank1"] == rank1


def test_prid_style_one_match_per_query():
    # 3 persons, probe cam 1, gallery cam 2, gallery in another order
    angles = [0.0, 1.0, 2.0, 1.1, 0.05, 2.2]
    f = _features(angles, pid=[1, 2, 3, 2, 1, 3], cam=[1, 1, 1, 2, 2, 2],
                  query=[0, 1, 2], gallery=[3, 4, 5])
    r = evaluate(f)
    for mode in ("paper", "standard"):
        assert r[mode]["rank1"] == pytest.approx(100.0)
        assert r[mode]["mAP"] == pytest.approx(100.0)
        assert r[mode]["num_queries"] == 3
    # swap two gallery features -> query 0 finds pid 2 first, its match at rank 2
    angles = [0.0, 1.0, 2.0, 0.05, 1.1, 2.2]
    r = evaluate(_features(angles, pid=[1, 2, 3, 2, 1, 3], cam=[1, 1, 1, 2, 2, 2],
                           query=[0, 1, 2], gallery=[3, 4, 5]))
    assert r["paper"]["rank1"] == pytest.approx(100 / 3)
    assert r["paper"]["mAP"] == pytest.approx(100 * (0.25 + 0.25 + 1.0) / 3)
    assert r["standard"]["mAP"] == pytest.approx(100 * (0.5 + 0.5 + 1.0) / 3)


def test_cosine_and_euclidean_rank_differently_on_unnormalised_features():
    feat = np.array([[[1.0, 0.0]], [[10.0, 1.0]], [[0.5, 0.5]]], np.float32)
    d_e = pairwise_distances(feat[:1, 0], feat[1:, 0])
    d_c = pairwise_distances(feat[:1, 0], feat[1:, 0], distance="cosine")
    np.testing.assert_allclose(d_e, [[np.sqrt(82.0), np.sqrt(0.5)]], rtol=1e-5)
    np.testing.assert_allclose(d_c, [[1 - 10 / np.sqrt(101), 1 - np.sqrt(0.5)]], rtol=1e-4)
    f = {"track_feat": feat, "pid": np.array([1, 1, 2], np.int32), "cam": np.array([1, 2, 2], np.int32),
         "query": np.array([0], np.int32), "gallery": np.array([1, 2], np.int32)}
    assert evaluate(f, distance="euclidean")["paper"]["rank1"] == 0.0
    assert evaluate(f, distance="cosine")["paper"]["rank1"] == 100.0


def test_ap_selection_and_bad_options():
    f = _features([0.0, 0.1], pid=[1, 1], cam=[1, 2], query=[0], gallery=[1])
    assert set(evaluate(f, ap="paper")) == {"paper"}
    assert set(evaluate(f, ap="standard")) == {"standard"}
    with pytest.raises(ValueError, match="ap must be"):
        evaluate(f, ap="matlab")
    with pytest.raises(ValueError, match="distance must be"):
        evaluate(f, distance="manhattan")


def _naive(feat, pid, cam, query, gallery, mode):
    """Per-query loops in the style of the MARS MATLAB evaluation (compute_AP)."""
    g = np.asarray(gallery)
    if mode == "standard":
        g = g[~np.isin(g, query)]
    aps, firsts = [], []
    for q in query:
        d = np.linalg.norm(feat[g].astype(np.float64) - feat[q], axis=1)
        order = g[np.argsort(d, kind="stable")]
        ngood = sum(1 for t in order if pid[t] == pid[q] and cam[t] != cam[q] and pid[t] != -1)
        if mode == "standard" and ngood == 0:
            continue
        old_recall, old_prec, ap, hits, j, first = 0.0, 1.0, 0.0, 0, 0, None
        for t in order:
            if pid[t] == -1 or (pid[t] == pid[q] and cam[t] == cam[q]):
                continue
            j += 1
            if pid[t] == pid[q]:
                hits += 1
                first = first or j
                if mode == "standard":
                    ap += hits / j / ngood
            if mode == "paper" and ngood:
                recall, prec = hits / ngood, hits / j
                ap += (recall - old_recall) * (old_prec + prec) / 2
                old_recall, old_prec = recall, prec
        aps.append(ap)
        firsts.append(first or len(order) + 1)
    return 100 * np.mean(aps), 100 * np.mean(np.asarray(firsts) <= 1), 100 * np.mean(np.asarray(firsts) <= 5)


def test_vectorised_metrics_match_naive_loops():
    rng = np.random.default_rng(3)
    t = 300
    pid = rng.integers(-1, 25, t).astype(np.int32)
    cam = rng.integers(1, 4, t).astype(np.int32)
    feat = rng.standard_normal((t, 1, 8)).astype(np.float32)
    feat[pid > 0, 0, :3] += 2.0 * np.eye(25, 3, dtype=np.float32)[pid[pid > 0] % 25]
    query = rng.choice(np.flatnonzero(pid > 0), 60, replace=False).astype(np.int32)
    gallery = np.arange(t, dtype=np.int32)
    r = evaluate({"track_feat": feat, "pid": pid, "cam": cam, "query": query, "gallery": gallery})
    for mode in ("paper", "standard"):
        m_ap, r1, r5 = _naive(feat[:, 0], pid, cam, query, gallery, mode)
        assert r[mode]["mAP"] == pytest.approx(m_ap, abs=1e-9)
        assert r[mode]["rank1"] == pytest.approx(r1)
        assert r[mode]["rank5"] == pytest.approx(r5)
