"""Evaluation protocols: PRID2011 one direction, iLIDS-VID the mean of both (hand-computed)."""
import numpy as np
import pytest

from upm_jax.evaluation import FeaturesError, evaluate, load_features, mean_results, save_features
from upm_jax.evaluation.__main__ import format_table


def _two_camera(directions=None):
    # persons 1, 2, 3; camera 1 tracklets 0-2 at angles 0, 90, 180 degrees, camera 2 tracklets
    # 3-5 at 100, 75, 170 (unit vectors, used as given).
    # cam1 -> cam2: t0 sees 75 (p2), 100 (p1): rank 2; t1 sees 100 (p1, 10 deg), 75 (p2, 15): rank 2;
    #               t2 sees 170 (p3): rank 1                       -> CMC 33.3, 100, 100
    # cam2 -> cam1: t3 (100) sees 90 (p2), 180 (p3), 0 (p1): rank 3; t4 (75) sees 90 (p2): rank 1;
    #               t5 (170) sees 180 (p3): rank 1                 -> CMC 66.7, 66.7, 100
    angles = np.deg2rad([0, 90, 180, 100, 75, 170])
    f = dict(track_feat=np.stack([np.cos(angles), np.sin(angles)], 1)[:, None, :],
             pid=np.array([1, 2, 3, 1, 2, 3]), cam=np.array([1, 1, 1, 2, 2, 2]),
             query=np.array([0, 1, 2]), gallery=np.array([3, 4, 5]))
    if directions:
        f["directions"] = directions
    return f


def test_prid_style_scores_camera1_to_camera2_only():
    for f in (_two_camera(), _two_camera("one")):
        r = evaluate(f)
        np.testing.assert_allclose(r["paper"]["cmc"], [100 / 3, 100, 100])
        # paper AP of one match at rank r: (0 + 1/r) / 2 for r > 1, 1 at rank 1
        assert r["paper"]["mAP"] == pytest.approx(100 * (0.25 + 0.25 + 1) / 3)
        assert r["standard"]["mAP"] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)
        assert "directions" not in r["paper"] and r["paper"]["num_queries"] == 3


def test_ilids_style_is_the_mean_of_both_directions(tmp_path):
    save_features(tmp_path / "f.npz", **_two_camera("both"))
    loaded = load_features(tmp_path / "f.npz")
    assert loaded["directions"] == "both"
    r = evaluate(loaded)
    paper = r["paper"]
    np.testing.assert_allclose(paper["directions"]["cam1->cam2"]["cmc"], [100 / 3, 100, 100])
    np.testing.assert_allclose(paper["directions"]["cam2->cam1"]["cmc"], [200 / 3, 200 / 3, 100])
    np.testing.assert_allclose(paper["cmc"], [50, 250 / 3, 100])
    assert paper["rank1"] == pytest.approx(50.0) and paper["rank5"] == pytest.approx(100.0)
    ap_12, ap_21 = (0.25 + 0.25 + 1) / 3, (1 / 6 + 1 + 1) / 3
    assert paper["mAP"] == pytest.approx(100 * (ap_12 + ap_21) / 2)
    assert r["standard"]["mAP"] == pytest.approx(100 * ((0.5 + 0.5 + 1) / 3 + (1 / 3 + 2) / 3) / 2)
    assert paper["num_queries"] == 6 and paper["gallery_size"] == 3
    # the split mean keeps each direction's mean too
    m = mean_results([r, evaluate(_two_camera())])
    assert m["paper"]["rank1"] == pytest.approx((50 + 100 / 3) / 2)
    assert "directions" not in m["paper"]
    both = mean_results([r, r])
    assert both["paper"]["directions"]["cam2->cam1"]["rank1"] == pytest.approx(200 / 3)
    table = format_table({"files": ["f.npz"], "splits": [r], "mean": r}).splitlines()
    assert [ln.split()[0] for ln in table[2:5]] == ["f.npz", "cam1->cam2", "cam2->cam1"]
    assert float(table[3].split()[2]) == pytest.approx(33.33, abs=0.01)


def test_directions_are_validated():
    with pytest.raises(FeaturesError, match=r"array 'directions': expected a scalar string"):
        evaluate(_two_camera("sideways"))
    f = _two_camera("both")
    f["gallery"] = np.array([2, 3, 4, 5])
    with pytest.raises(FeaturesError, match=r"must not share tracklets"):
        evaluate(f)
