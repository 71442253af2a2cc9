"""Hostile input to the evaluator (issue 16): extreme magnitudes are evaluated exactly, every
nonzero vector is normalised, mismatched files and degenerate features are reported."""
import numpy as np
import pytest

from upm_jax.evaluation import (DegenerateFeaturesWarning, FeaturesError, evaluate, fuse_features,
                                load_features, montage_paths_file, pool_tracklets, save_features,
                                save_frame_features, save_montage_paths)
from upm_jax.evaluation.__main__ import main


def _frames(seed=0, t=12, per=3, p=2, d=5):
    """A small per-frame features dict: t tracklets of `per` frames, two cameras."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(1, t // 2 + 1), 2).astype(np.int32)
    centre = rng.standard_normal((t // 2 + 1, p, d))
    feat = centre[np.repeat(pid, per)] + 0.7 * rng.standard_normal((t * per, p, d))
    return {"frame_feat": feat.astype(np.float32), "frame_track": np.repeat(np.arange(t), per),
            "pid": pid, "cam": np.tile([1, 2], t // 2).astype(np.int32),
            "query": np.arange(0, t, 2), "gallery": np.arange(1, t, 2)}


def _scores(result):
    return {m: (r["rank1"], r["rank5"], r["mAP"]) for m, r in result.items()}


def _normc_pool(frame_feat, frame_track, t):
    """MATLAB's rule in float64: normc on every nonzero part vector, / sqrt(P), max, normc."""
    x = frame_feat.astype(np.float64)
    norms = np.linalg.norm(x, axis=2, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0) / np.sqrt(x.shape[1])
    out = np.stack([x[frame_track == i].max(axis=0).reshape(-1) for i in range(t)])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.parametrize("scale, dtype", [(1e37, np.float32), (1e300, np.float64),
                                          (1e-16, np.float32), (1e-300, np.float64)])
def test_extreme_magnitudes_evaluate_exactly_as_unit_ones(scale, dtype):
    f = _frames()
    reference = evaluate(f)
    scaled = dict(f, frame_feat=f["frame_feat"].astype(dtype) * dtype(scale))
    assert np.isfinite(scaled["frame_feat"]).all() and np.abs(scaled["frame_feat"]).max() > 0
    assert _scores(evaluate(scaled)) == _scores(reference)
    np.testing.assert_allclose(pool_tracklets(scaled["frame_feat"], f["frame_track"], 12),
                               _normc_pool(f["frame_feat"], f["frame_track"], 12), atol=2e-6)


def test_tiny_untrained_norms_follow_matlab_normc():
    # per-part norms ~1e-16 (an untrained network's) and one all-zero part that stays zero
    f = _frames(seed=3)
    feat = f["frame_feat"] * np.float32(1e-17)
    feat[4, 1] = 0.0
    feat[7, 0] = np.float32(1e-44)  # subnormal float32, still a nonzero vector
    got = pool_tracklets(feat, f["frame_track"], 12, pooling="max")
    np.testing.assert_allclose(got, _normc_pool(feat, f["frame_track"], 12), atol=2e-6)


@pytest.mark.parametrize("scale, dtype", [(1e30, np.float32), (1e300, np.float64),
                                          (1e-30, np.float32)])
def test_pooled_files_with_extreme_values_rank_as_scaled_ones(tmp_path, scale, dtype):
    f = _frames()
    pooled = pool_tracklets(f["frame_feat"], f["frame_track"], 12).reshape(12, 2, 5)
    base = {k: f[k] for k in ("pid", "cam", "query", "gallery")}
    reference = evaluate(dict(base, track_feat=pooled))
    path = tmp_path / "huge.npz"
    save_features(path, track_feat=pooled.astype(dtype) * dtype(scale), **base)
    for distance in ("euclidean", "cosine"):
        assert (_scores(evaluate(load_features(path), distance=distance))
                == _scores(evaluate(dict(base, track_feat=pooled), distance=distance)))
    assert _scores(evaluate(load_features(path))) == _scores(reference)


def test_cli_refuses_files_of_different_part_counts(tmp_path, capsys):
    two, three = _frames(p=2), _frames(p=3)
    save_features(tmp_path / "p2.npz", **two)
    save_features(tmp_path / "p3.npz", **three)
    assert main([str(tmp_path / "p2.npz"), str(tmp_path / "p3.npz")]) == 2
    err = capsys.readouterr().err
    assert "part counts differ" in err and "p2.npz has P=2" in err and "p3.npz has P=3" in err
    assert "Traceback" not in err


def test_errors_name_the_file_and_show_plain_strings(tmp_path, capsys):
    f = _frames()
    f["frame_track"] = f["frame_track"].copy()
    f["frame_track"][-1] = 40
    bad = tmp_path / "bad_track.npz"
    np.savez(bad, **f)
    assert main([str(bad)]) == 2
    assert f"{bad}: array 'frame_track': indices must lie in [0, 12)" in capsys.readouterr().err
    np.savez(tmp_path / "bytes.npz", **_frames(), pooling=np.array(b"max"))
    assert main([str(tmp_path / "bytes.npz")]) == 2
    err = capsys.readouterr().err
    assert "bytes.npz: array 'pooling'" in err and "got b'max'" in err
    assert "np.str_" not in err and "array(" not in err


def test_degenerate_features_warn_at_evaluation(tmp_path, capsys):
    f = _frames()
    f["frame_feat"] = np.broadcast_to(f["frame_feat"][:1], f["frame_feat"].shape).copy()
    f["frame_feat"] += np.float32(1e-6) * np.random.default_rng(0).standard_normal(
        f["frame_feat"].shape, dtype=np.float32)
    with pytest.warns(DegenerateFeaturesWarning, match="nearly identical across all 6 rows"):
        evaluate(f)
    save_features(tmp_path / "flat.npz", **f)
    assert main([str(tmp_path / "flat.npz")]) == 0
    assert "warning: " + str(tmp_path / "flat.npz") in capsys.readouterr().err
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(_frames())  # ordinary features: no warning


def test_streamed_file_equals_saved_file_and_failures_leave_nothing(tmp_path):
    f = _frames()
    meta = {k: v for k, v in f.items() if k != "frame_feat"}
    feat = f["frame_feat"]
    path = tmp_path / "streamed.npz"
    save_frame_features(path, (feat[i:i + 5] for i in range(0, len(feat), 5)), shape=feat.shape,
                        **meta)
    loaded = load_features(path)
    assert isinstance(loaded["frame_feat"], np.memmap)
    np.testing.assert_array_equal(loaded["frame_feat"], feat)
    assert _scores(evaluate(loaded)) == _scores(evaluate(f))
    nan = feat.copy()
    nan[20, 1, 3] = np.nan
    with pytest.raises(FeaturesError, match="'frame_feat'.*NaN or inf.*row 20"):
        save_frame_features(tmp_path / "nan.npz", iter([nan[:18], nan[18:]]), shape=feat.shape,
                            **meta)
    with pytest.raises(FeaturesError, match="NaN or inf as float16"):
        save_frame_features(tmp_path / "f16.npz", iter([feat * 1e5]), shape=feat.shape,
                            dtype=np.float16, **meta)
    with pytest.raises(FeaturesError, match="got 30 frames, expected 36"):
        save_frame_features(tmp_path / "short.npz", iter([feat[:30]]), shape=feat.shape, **meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.npz"]


@pytest.mark.parametrize("frame_level", [True, False])
def test_fusion_concatenates_parts_chunk_by_chunk(tmp_path, frame_level):
    lam, gam = _frames(seed=1, d=6), _frames(seed=2, d=3)
    gam = dict(lam, frame_feat=gam["frame_feat"])
    save_features(tmp_path / "lam.npz", **lam)
    save_features(tmp_path / "gam.npz", **gam)
    save_montage_paths(tmp_path / "lam.npz", [f"/data/t{i}.jpg" for i in range(12)])
    out = tmp_path / "fused.npz"
    fuse_features([tmp_path / "lam.npz", tmp_path / "gam.npz"], out, frame_level=frame_level,
                  num_parts=2, chunk_bytes=7 * 2 * 9 * 4)  # 7-frame chunks
    concat = np.concatenate([lam["frame_feat"], gam["frame_feat"]], axis=2)  # [N, 2, 9]
    fused = load_features(out)
    if frame_level:
        np.testing.assert_array_equal(fused["frame_feat"], concat)
    else:
        np.testing.assert_allclose(fused["track_feat"].reshape(12, -1),
                                   pool_tracklets(concat, lam["frame_track"], 12), atol=1e-7)
    assert _scores(evaluate(fused)) == _scores(evaluate(dict(lam, frame_feat=concat)))
    with open(montage_paths_file(out)) as fh:
        assert fh.read().splitlines()[11] == "/data/t11.jpg"


def test_fusion_refuses_other_part_counts_and_other_test_sets(tmp_path):
    save_features(tmp_path / "p3.npz", **_frames(p=3))
    save_features(tmp_path / "p2.npz", **_frames(p=2))
    other = _frames(p=2)
    other["pid"] = other["pid"][::-1].copy()
    save_features(tmp_path / "other.npz", **other)
    with pytest.raises(FeaturesError, match="p3.npz: array 'frame_feat' has P=3 parts.*have 2"):
        fuse_features([tmp_path / "p3.npz"], tmp_path / "out.npz", num_parts=2)
    with pytest.raises(FeaturesError, match="other.npz: array 'pid' differs from .*p2.npz"):
        fuse_features([tmp_path / "p2.npz", tmp_path / "other.npz"], tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()
