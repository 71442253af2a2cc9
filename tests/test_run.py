"""The run library in-process on 8 fake devices: uPMnet's two models and their fused
features, several splits with their mean, MATLAB exports, pooled feature files."""
import json
import os
import re

import numpy as np
import pytest
import scipy.io

from configs import demo
from upm_jax import evaluation
from upm_jax import run


def tiny_config(**overrides):
    config = demo.get_config()
    config.data.synthetic_ids = 8
    config.train.batch_size = 16
    config.train.steps = 2
    config.train.checkpoint_every = 2
    config.train.log_every = 1
    config.eval.batch_size = 64
    config.eval.initial = False
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


@pytest.fixture(scope="module")
def upm_two_splits(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("upm"))
    config = tiny_config(data__splits="1,2", eval__save_mat=True)
    config.method = "upm"
    return workdir, run.run(config, workdir)


def test_upm_trains_lam_and_gam_and_fuses_per_part(upm_two_splits):
    workdir, _ = upm_two_splits
    lam = np.load(os.path.join(workdir, "split_1", "lam", "features.npz"))["frame_feat"]
    gam = np.load(os.path.join(workdir, "split_1", "gam", "features.npz"))["frame_feat"]
    fused = np.load(os.path.join(workdir, "split_1", "features.npz"))["frame_feat"]
    assert lam.shape[1:] == (2, 256) and gam.shape[1:] == (2, 256)
    np.testing.assert_array_equal(fused, np.concatenate([lam, gam], axis=-1))


def test_splits_are_reported_with_their_mean(upm_two_splits):
    workdir, results = upm_two_splits
    assert set(results) == {"split_1", "split_2", "mean"}
    on_disk = json.load(open(os.path.join(workdir, "results.json")))
    assert on_disk == json.loads(json.dumps(results))
    for mode in ("paper", "standard"):
        expected = np.mean([results["split_1"][mode]["rank1"], results["split_2"][mode]["rank1"]])
        assert results["mean"][mode]["rank1"] == pytest.approx(expected)
    # The split results are exactly what the stand-alone evaluator computes from the files.
    again = evaluation.evaluate(evaluation.load_features(
        os.path.join(workdir, "split_2", "features.npz")))
    assert again["paper"]["mAP"] == pytest.approx(results["split_2"]["paper"]["mAP"])


def test_mat_export_matches_the_features_file(upm_two_splits):
    workdir, _ = upm_two_splits
    model_dir = os.path.join(workdir, "split_1", "lam")
    frame_feat = np.load(os.path.join(model_dir, "features.npz"))["frame_feat"]
    mat = scipy.io.loadmat(os.path.join(model_dir, "mat", "test.mat"))["test"]
    assert mat.shape == (frame_feat.shape[1] * frame_feat.shape[2], frame_feat.shape[0])
    np.testing.assert_array_equal(mat, frame_feat.reshape(len(frame_feat), -1).T)
    ids = scipy.io.loadmat(os.path.join(model_dir, "mat", "testID.mat"))["testID"]
    cams = scipy.io.loadmat(os.path.join(model_dir, "mat", "testCAM.mat"))["testCAM"]
    assert ids.shape == cams.shape == (frame_feat.shape[0], 1)
    assert set(np.unique(cams)) == {1.0, 2.0}


def test_pooled_feature_files_evaluate_like_frame_files(tmp_path):
    config = tiny_config(eval__frame_features=False)
    results = run.run(config, str(tmp_path))
    pooled = evaluation.load_features(str(tmp_path / "split_1" / "features.npz"))
    assert "track_feat" in pooled and "frame_feat" not in pooled
    frame_level = evaluation.evaluate(evaluation.load_features(
        str(tmp_path / "split_1" / "lam" / "features.npz")))
    for mode in ("paper", "standard"):
        assert results["mean"][mode]["rank1"] == pytest.approx(frame_level[mode]["rank1"])
        assert results["mean"][mode]["mAP"] == pytest.approx(frame_level[mode]["mAP"], abs=1e-4)


def test_diverging_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path):
    """A learning rate of 1e30 blows the weights up after the first update: the run must
    stop naming the first non-finite step, having saved nothing at or after it."""
    config = tiny_config(train__steps=6, train__checkpoint_every=1, train__learning_rate=1e30)
    with pytest.raises(run.TrainingDiverged, match=r"at step (\d+)") as info:
        run.run(config, str(tmp_path), mode="train")
    bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert bad_step >= 2
    saved = sorted(int(s) for s in os.listdir(tmp_path / "split_1" / "lam" / "checkpoints")
                   if s.isdigit())
    assert saved == list(range(1, bad_step))
