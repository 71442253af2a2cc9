"""load_pretrained: strict merge into params['backbone'], with one clear error for every misfit."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from upm_jax.models import PretrainedMismatchError, WeightsFileError, build_model, load_pretrained
from upm_jax.porting.weights_file import save_weights


@pytest.fixture(scope="module")
def setup():
    model = build_model("mobilenet_v1", "global", n_part=2, depth_multiplier=0.25)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 32, 3)), train=False)
    rng = np.random.default_rng(0)
    weights = {"backbone/" + k: rng.normal(size=v.shape).astype(np.float32) for k, v in
               traverse_util.flatten_dict(variables["params"]["backbone"], sep="/").items()}
    return model, variables, weights


@pytest.mark.slow
def test_loads_backbone_and_leaves_the_rest(setup, tmp_path):
    _, variables, weights = setup
    path = str(tmp_path / "w.npz")
    save_weights(path, weights, backbone="mobilenet_v1", source="test")
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["w.npz"]  # no temporary file left behind
    loaded = load_pretrained(variables, path)
    flat = traverse_util.flatten_dict(loaded["params"]["backbone"], sep="/")
    assert len(flat) == len(weights) == 81
    for k, v in flat.items():
        assert v.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(v), weights["backbone/" + k])
    jax.tree.map(np.testing.assert_array_equal, loaded["params"]["head"],
                 variables["params"]["head"])
    jax.tree.map(np.testing.assert_array_equal, loaded["batch_stats"], variables["batch_stats"])


def test_lists_every_missing_unexpected_and_misshaped_name(setup, tmp_path):
    _, variables, weights = setup
    bad = dict(weights)
    del bad["backbone/Conv2d_3_depthwise/depthwise_kernel"]
    del bad["backbone/Conv2d_0/BatchNorm/bias"]
    bad["backbone/Conv2d_14_pointwise/kernel"] = np.zeros((1, 1, 8, 8), np.float32)
    bad["backbone/Conv2d_5_pointwise/kernel"] = np.zeros((1, 1, 3, 3), np.float32)
    path = str(tmp_path / "bad.npz")
    save_weights(path, bad, backbone="mobilenet_v1", source="test")
    with pytest.raises(PretrainedMismatchError) as info:
        load_pretrained(variables, path)
    msg = str(info.value)
    assert "2 missing, 1 unexpected, 1 mis-shaped" in msg and path in msg
    for line in ["missing:     backbone/Conv2d_0/BatchNorm/bias (8,)",
                 "missing:     backbone/Conv2d_3_depthwise/depthwise_kernel (3, 3, 32, 1)",
                 "unexpected:  backbone/Conv2d_14_pointwise/kernel (1, 1, 8, 8)",
                 "mis-shaped:  backbone/Conv2d_5_pointwise/kernel file (1, 1, 3, 3) model "
                 "(1, 1, 64, 64)"]:
        assert line in msg


def test_other_backbone_is_rejected(setup, tmp_path):
    _, variables, _ = setup
    resnet = build_model("resnet_v1_50", "dal")
    shapes = jax.eval_shape(lambda: resnet.init(jax.random.key(0), jnp.zeros((1, 64, 32, 3))))
    weights = {"backbone/" + k: np.zeros(v.shape, np.float32) for k, v in
               traverse_util.flatten_dict(shapes["params"]["backbone"], sep="/").items()}
    path = str(tmp_path / "resnet.npz")
    save_weights(path, weights, backbone="resnet_v1_50", source="test")
    with pytest.raises(PretrainedMismatchError, match="backbone 'resnet_v1_50'.*81 missing, "
                                                      "159 unexpected"):
        load_pretrained(variables, path)


def test_missing_and_corrupt_files_are_named(setup, tmp_path):
    _, variables, _ = setup
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(WeightsFileError, match=f"not found: {missing}"):
        load_pretrained(variables, missing)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(WeightsFileError,
                       match=f"pretrained weights file {corrupt}: not a complete .npz archive"):
        load_pretrained(variables, str(corrupt))
    plain = tmp_path / "plain.npz"
    np.savez(plain, x=np.zeros(3))
    with pytest.raises(WeightsFileError, match="not a ported-weights file"):
        load_pretrained(variables, str(plain))


def test_needs_a_backbone_subtree(tmp_path):
    with pytest.raises(PretrainedMismatchError, match="params\\['backbone'\\]"):
        load_pretrained({"params": {"Dense_0": {}}}, str(tmp_path / "w.npz"))


@pytest.mark.parametrize("damage, message", [
    (lambda w: w.__setitem__("backbone/Conv2d_0/kernel", np.full_like(w["backbone/Conv2d_0/kernel"], np.nan)),
     r"1 weight\(s\) hold NaN or inf: backbone/Conv2d_0/kernel \(216 of 216\)"),
    (lambda w: w.__setitem__("backbone/Conv2d_1_pointwise/kernel",
                             w["backbone/Conv2d_1_pointwise/kernel"].astype(np.complex64)),
     r"1 weight\(s\) are not real floating point: backbone/Conv2d_1_pointwise/kernel \(complex64\)"),
    (lambda w: w.__setitem__("backbone/Conv2d_0/BatchNorm/bias", np.zeros(8, np.int32)),
     r"1 weight\(s\) are not real floating point: backbone/Conv2d_0/BatchNorm/bias \(int32\)"),
])
def test_damaged_weights_are_refused_at_load(setup, tmp_path, damage, message):
    _, variables, weights = setup
    bad = dict(weights)
    damage(bad)
    path = str(tmp_path / "damaged.npz")
    save_weights(path, bad, backbone="mobilenet_v1", source="test")
    with pytest.raises(WeightsFileError, match=f"{path}: " + message):
        load_pretrained(variables, path, backbone="mobilenet_v1")


def test_metadata_naming_another_backbone_is_refused(setup, tmp_path):
    _, variables, weights = setup
    path = str(tmp_path / "labelled_resnet.npz")
    save_weights(path, weights, backbone="resnet_v1_50", source="test")  # MobileNet names, shapes fit
    with pytest.raises(PretrainedMismatchError,
                       match="for backbone 'resnet_v1_50'.*model's backbone is 'mobilenet_v1'"):
        load_pretrained(variables, path, backbone="mobilenet_v1")


def _stats(variables, seed=1):
    rng = np.random.default_rng(seed)
    return {"backbone/" + k: rng.uniform(0.5, 2.0, v.shape).astype(np.float32) for k, v in
            traverse_util.flatten_dict(variables["batch_stats"]["backbone"], sep="/").items()}


def test_moving_statistics_are_a_separate_group_used_only_when_asked(setup, tmp_path):
    _, variables, weights = setup
    stats = _stats(variables)
    path = str(tmp_path / "w.npz")
    save_weights(path, weights, backbone="mobilenet_v1", source="test", stats=stats)
    training = load_pretrained(variables, path)   # the training graph starts from 0/1
    jax.tree.map(np.testing.assert_array_equal, training["batch_stats"], variables["batch_stats"])
    inference = load_pretrained(variables, path, moving_stats=True)
    got = traverse_util.flatten_dict(inference["batch_stats"]["backbone"], sep="/")
    assert len(got) == len(stats) == 54   # mean and var of MobileNet's 27 BatchNorms
    for k, v in got.items():
        np.testing.assert_array_equal(np.asarray(v), stats["backbone/" + k])
    jax.tree.map(np.testing.assert_array_equal, inference["params"], training["params"])

    old = str(tmp_path / "old.npz")   # ported before the statistics were kept
    save_weights(old, weights, backbone="mobilenet_v1", source="test")
    load_pretrained(variables, old)   # still fine for training
    with pytest.raises(WeightsFileError, match=r"old.npz holds no BatchNorm moving statistics"
                                               r".*port the checkpoint again"):
        load_pretrained(variables, old, moving_stats=True)
    partial = dict(stats)
    del partial["backbone/Conv2d_3_pointwise/BatchNorm/var"]
    save_weights(path, weights, backbone="mobilenet_v1", source="test", stats=partial)
    with pytest.raises(PretrainedMismatchError,
                       match=r"moving statistics .* 1 missing(.|\n)*missing: +batch_stats/backbone/"
                             r"Conv2d_3_pointwise/BatchNorm/var"):
        load_pretrained(variables, path, moving_stats=True)


def test_runs_needing_the_statistics_refuse_an_old_file_before_any_work(setup, tmp_path):
    from repo_configs import get_config
    from upm_jax.config import ConfigError, check_weights

    _, variables, weights = setup
    old = str(tmp_path / "old.npz")
    save_weights(old, weights, backbone="mobilenet_v1", source="test")
    config = get_config("prid")
    config.model.pretrained = old
    config.eval.initial = False
    check_weights(config, initial_features=True)   # training alone needs no statistics
    config.eval.initial = True
    check_weights(config, initial_features=False)   # --mode train extracts no initial features
    with pytest.raises(ConfigError, match=r"old.npz' holds no BatchNorm moving statistics.*"
                                          r"config.eval.initial need"):
        check_weights(config, initial_features=True)
    config.eval.initial = False
    config.train.anchor_init = "features"
    with pytest.raises(ConfigError, match="config.train.anchor_init='features' need"):
        check_weights(config, initial_features=False)
    save_weights(old, weights, backbone="mobilenet_v1", source="test", stats=_stats(variables))
    check_weights(config, initial_features=True)


def test_a_flipped_bit_in_the_weights_file_is_named(setup, tmp_path):
    _, variables, weights = setup
    path = tmp_path / "w.npz"
    save_weights(str(path), weights, backbone="mobilenet_v1", source="test",
                 stats=_stats(variables))
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match=rf"{path}: member '.+\.npy' is damaged \(its "
                                               r"CRC-32 check fails\); port the checkpoint"):
        load_pretrained(variables, str(path))
