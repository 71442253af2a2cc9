"""Features file format, bad-input errors, and (streaming) tracklet pooling."""
import os
import stat

import numpy as np
import pytest

from upm_jax.evaluation import (FeaturesError, evaluate, evaluate_files, load_features,
                                pool_tracklets, save_features, tracklet_features)


def _frames_dict(rng, t=6, frames_per=3, p=2, d=4):
    track = np.repeat(np.arange(t, dtype=np.int32), frames_per)
    return {"frame_feat": rng.standard_normal((t * frames_per, p, d)).astype(np.float32),
            "frame_track": track, "pid": np.arange(1, t + 1, dtype=np.int32) // 2,
            "cam": np.tile(np.array([1, 2], np.int32), t // 2), "query": np.array([0, 2], np.int32),
            "gallery": np.arange(t, dtype=np.int32)}


def _reference_pool(frame_feat, frame_track, t, pooling):
    """Per-tracklet loops of the pooling rule."""
    n, p, d = frame_feat.shape
    out = np.zeros((t, p * d))
    for i in range(t):
        x = frame_feat[frame_track == i].astype(np.float64)
        x = x / np.linalg.norm(x, axis=2, keepdims=True) / np.sqrt(p)
        v = (x.max(axis=0) if pooling == "max" else x.mean(axis=0)).reshape(-1)
        out[i] = v / np.linalg.norm(v)
    return out


def test_pooling_p1_hand_computed():
    feat = np.array([[[3.0, 4.0]], [[0.0, 2.0]], [[1.0, 0.0]]], np.float32)  # [3, 1, 2]
    track = np.array([0, 0, 1])
    mx = pool_tracklets(feat, track, 2, pooling="max")
    np.testing.assert_allclose(mx[0], np.array([0.6, 1.0]) / np.sqrt(1.36), rtol=1e-6)
    np.testing.assert_allclose(mx[1], [1.0, 0.0])
    mean = pool_tracklets(feat, track, 2, pooling="mean")
    np.testing.assert_allclose(mean[0], np.array([0.3, 0.9]) / np.sqrt(0.9), rtol=1e-6)


def test_pooling_p2_hand_computed():
    # one frame, two parts: each part normalised and divided by sqrt(2); the whole is unit
    feat = np.array([[[2.0, 0.0], [0.0, -5.0]], [[0.0, 1.0], [0.0, -1.0]]], np.float32)
    mx = pool_tracklets(feat, np.array([0, 0]), 1, pooling="max")
    s = 1 / np.sqrt(2)
    v = np.array([s, s, 0.0, -s])  # max over frames of [s, 0, 0, -s] and [0, s, 0, -s]
    np.testing.assert_allclose(mx[0], v / np.linalg.norm(v), rtol=1e-6)


@pytest.mark.parametrize("pooling", ["max", "mean"])
@pytest.mark.parametrize("p", [1, 8])
def test_pooling_matches_reference_with_scattered_frames(pooling, p):
    rng = np.random.default_rng(p)
    t, n = 13, 200
    feat = rng.standard_normal((n, p, 5)).astype(np.float32)
    track = rng.integers(0, t, n)
    got = pool_tracklets(feat, track, t, pooling=pooling, chunk_bytes=7 * p * 5 * 4)
    np.testing.assert_allclose(got, _reference_pool(feat, track, t, pooling), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_streaming_from_file_equals_in_memory(tmp_path, dtype):
    rng = np.random.default_rng(0)
    f = _frames_dict(rng, t=10, frames_per=7, p=8, d=6)
    f["frame_feat"] = f["frame_feat"].astype(dtype)
    order = rng.permutation(f["frame_track"].shape[0])
    f["frame_feat"], f["frame_track"] = f["frame_feat"][order], f["frame_track"][order]
    path = tmp_path / "frames.npz"
    save_features(path, **f, pooling="mean")
    loaded = load_features(path)
    assert isinstance(loaded["frame_feat"], np.memmap)
    assert loaded["pooling"] == "mean"
    streamed = pool_tracklets(loaded["frame_feat"], loaded["frame_track"], 10, pooling="mean",
                              chunk_bytes=5 * 8 * 6 * 4)
    in_memory = pool_tracklets(np.array(f["frame_feat"]), f["frame_track"], 10, pooling="mean")
    np.testing.assert_allclose(streamed, in_memory, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(tracklet_features(loaded), in_memory, rtol=1e-6, atol=1e-7)
    assert not np.allclose(tracklet_features(loaded, pooling="max"), in_memory)


def test_round_trip_and_frame_file_evaluates_like_pooled_file(tmp_path):
    rng = np.random.default_rng(1)
    f = _frames_dict(rng)
    save_features(tmp_path / "frames.npz", **f)
    pooled = tracklet_features(f).reshape(6, 2, 4)
    g = {k: v for k, v in f.items() if not k.startswith("frame")}
    save_features(tmp_path / "tracks.npz", track_feat=pooled, **g)
    a = evaluate(load_features(tmp_path / "frames.npz"))
    b = evaluate(load_features(tmp_path / "tracks.npz"))
    assert a == b
    loaded = load_features(tmp_path / "tracks.npz")
    for k in g:
        np.testing.assert_array_equal(loaded[k], g[k])
    assert not list(tmp_path.glob(".tmp-*"))  # no temp files left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "tracks.npz").st_mode) == 0o666 & ~umask


def test_several_split_files_are_averaged(tmp_path):
    angles = {"good": [0.0, 0.1, 0.2], "bad": [0.0, 0.2, 0.1]}  # match at rank 1 / rank 2
    paths = []
    for name, a in angles.items():
        feat = np.stack([np.cos(a), np.sin(a)], 1)[:, None, :].astype(np.float32)
        paths.append(tmp_path / f"{name}.npz")
        save_features(paths[-1], track_feat=feat, pid=np.array([1, 1, 2], np.int32),
                      cam=np.array([1, 2, 2], np.int32), query=np.array([0], np.int32),
                      gallery=np.array([1, 2], np.int32))
    r = evaluate_files(paths)
    assert [s["paper"]["rank1"] for s in r["splits"]] == [100.0, 0.0]
    assert r["mean"]["paper"]["rank1"] == 50.0
    assert r["mean"]["paper"]["mAP"] == pytest.approx((100.0 + 25.0) / 2)
    assert r["mean"]["standard"]["mAP"] == pytest.approx((100.0 + 50.0) / 2)
    assert r["mean"]["paper"]["cmc"] == [50.0, 100.0]
    assert r["files"] == [str(p) for p in paths]


def _good():
    return {"track_feat": np.ones((4, 1, 3), np.float32) / np.sqrt(3), "pid": np.array([1, 1, 2, -1], np.int32),
            "cam": np.array([1, 2, 1, 2], np.int32), "query": np.array([0], np.int32),
            "gallery": np.array([1, 2, 3], np.int32)}


def _bad(**changes):
    f = _good()
    for k, v in changes.items():
        if v is None:
            del f[k]
        else:
            f[k] = v
    return f


NAN = np.ones((4, 1, 3), np.float32)
NAN[2, 0, 1] = np.nan
INF = np.ones((4, 1, 3), np.float32)
INF[0, 0, 0] = np.inf

BAD_CASES = [
    (_bad(cam=np.array([1, 2, 1], np.int32)), "'cam'.*length 3 does not match 'pid' length 4"),
    (_bad(track_feat=np.ones((3, 1, 3), np.float32)), "'track_feat'.*3 rows"),
    (_bad(query=np.array([4], np.int32)), "'query'.*\\[0, 4\\)"),
    (_bad(gallery=np.array([-1, 2], np.int32)), "'gallery'.*\\[0, 4\\)"),
    (_bad(track_feat=NAN), "'track_feat'.*NaN or inf.*row 2"),
    (_bad(track_feat=INF), "'track_feat'.*NaN or inf.*row 0"),
    (_bad(query=np.array([], np.int32)), "'query'.*empty"),
    (_bad(gallery=np.array([], np.int32)), "'gallery'.*empty"),
    (_bad(extra=np.ones(3)), "unknown key.*'extra'"),
    (_bad(pid=np.array([1.0, 1.0, 2.0, 0.0])), "'pid'.*integer dtype"),
    (_bad(track_feat=np.ones((4, 1, 3), np.int32)), "'track_feat'.*floating dtype"),
    (_bad(track_feat=np.ones((4, 3), np.float32)), "'track_feat'.*3 dimensions"),
    (_bad(query=np.array([[0]], np.int32)), "'query'.*1 dimension"),
    (_bad(pid=None), "'pid'.*missing"),
    (_bad(track_feat=None), "exactly one of"),
    (_bad(frame_feat=np.ones((2, 1, 3), np.float32), frame_track=np.zeros(2, np.int32)), "got both"),
    (_bad(query=np.array([0, 0], np.int32)), "'query'.*duplicate"),
    (_bad(cam=np.array([0, 1, 1, 1], np.int32)), "'cam'.*1-based"),
    (_bad(pid=np.array([1, 1, 2, -2], np.int32)), "'pid'.*>= -1"),
    (_bad(pooling=np.array("median")), "'pooling'"),
]


@pytest.mark.parametrize("arrays, message", BAD_CASES)
def test_bad_input_raises_clear_error_on_save_and_load(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    with pytest.raises(FeaturesError, match=message):
        save_features(path, **arrays)
    assert not path.exists() and not list(tmp_path.iterdir())
    np.savez(path, **arrays)
    with pytest.raises(FeaturesError, match=message):
        load_features(path)


def test_pooled_values_checked_when_evaluating_a_dict():
    with pytest.raises(FeaturesError, match="'track_feat'.*NaN or inf.*row 2"):
        evaluate(_bad(track_feat=NAN))


def test_frame_level_errors_are_caught_while_pooling(tmp_path):
    rng = np.random.default_rng(2)
    f = _frames_dict(rng)
    f["frame_track"] = f["frame_track"].copy()
    f["frame_track"][5] = 99
    with pytest.raises(FeaturesError, match="'frame_track'.*\\[0, 6\\)"):
        save_features(tmp_path / "x.npz", **f)
    np.savez(tmp_path / "x.npz", **f)
    with pytest.raises(FeaturesError, match="'frame_track'.*\\[0, 6\\)"):
        evaluate(load_features(tmp_path / "x.npz"))
    f = _frames_dict(rng)
    f["frame_feat"][7, 1, 2] = np.inf
    np.savez(tmp_path / "y.npz", **f)
    with pytest.raises(FeaturesError, match="'frame_feat'.*NaN or inf.*row 7"):
        evaluate(load_features(tmp_path / "y.npz"))
    f = _frames_dict(rng)
    f["frame_track"] = np.minimum(f["frame_track"], 4)  # tracklet 5 (in the gallery) loses its frames
    with pytest.raises(FeaturesError, match="tracklet\\(s\\) \\[5\\].*no frames"):
        evaluate(f)
    f = _frames_dict(rng)
    f["frame_track"] = f["frame_track"][:-1]
    with pytest.raises(FeaturesError, match="'frame_track'.*does not match 'frame_feat'"):
        evaluate(f)


def test_unreadable_and_pickled_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FeaturesError, match="junk.npz: not a complete .npz archive"):
        load_features(tmp_path / "junk.npz")
    f = _good()
    f["pid"] = np.array([1, 1, 2, -1], dtype=object)
    np.savez(tmp_path / "obj.npz", **f)
    with pytest.raises(FeaturesError, match="'pid'.*no pickle"):
        load_features(tmp_path / "obj.npz")
