"""ResNet-50 v1 equivalence with tf_slim's resnet_v1_50 on a synthetic V1 checkpoint.

The checkpoint has exactly the real file's names, shapes and format (TF legacy ``Save``,
V1 TensorSlice). Our side: TF-free reader -> python -m upm_jax.porting -> load_pretrained with
the file's weights and BatchNorm moving statistics. Reference side: tf_slim's
``resnet_v1_50`` (graph mode, is_training=False, global_pool=True) restored from the same file
by TF's own Saver. Metric: relative error max|ours - ref| / max|ref| per endpoint.

Two shims make tf-slim 1.1.0 build under TF 2.21 without tf_keras (numerics unchanged):
``ops.Tensor`` (removed from TF, still referenced by tf_slim.layers.utils) is aliased to
``tf.Tensor``, and ``zero_debias_moving_mean=True`` routes slim.batch_norm to its fused
implementation (``tf.nn.fused_batch_norm``) instead of the tf_keras-based layer; that option
only changes training-time moving-average updates, which inference never runs.
"""

import numpy as np
import pytest

import slim_synthetic as syn
from upm_jax.porting.weights_file import load_weights

# the networks' input, and an odd size (SAME padding's asymmetric case)
SIZES = [(256, 128), (225, 161)]
TOL = 1e-5
# tf_slim builds its layers through TF's deprecated v1 layer API.
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`layer.apply` is deprecated:UserWarning")]


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    """(values, checkpoint path, ported .npz path) of a synthetic ResNet-50 V1 checkpoint."""
    d = tmp_path_factory.mktemp("resnet")
    values = syn.synthetic_values("resnet_v1_50", seed=1)
    ckpt = str(d / "resnet_v1_50.ckpt")
    syn.write_v1(ckpt, values)
    out = str(d / "resnet_v1_50.npz")
    assert syn.port_weights_cli(["--from", "slim", ckpt, "--out", out]) == 0
    return values, ckpt, out


def _slim_reference(ckpt, images):
    """Endpoints of tf_slim resnet_v1_50 restored from ``ckpt`` -> dict name -> array."""
    import tensorflow as tf
    from tensorflow.python.framework import ops

    if not hasattr(ops, "Tensor"):
        ops.Tensor = tf.Tensor
    import tf_slim as slim
    from tf_slim.nets import resnet_v1

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, images.shape)
        with slim.arg_scope(resnet_v1.resnet_arg_scope()):
            with slim.arg_scope([slim.batch_norm], zero_debias_moving_mean=True):
                net, endpoints = resnet_v1.resnet_v1_50(x, num_classes=None, is_training=False,
                                                        global_pool=True)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            saver.restore(sess, ckpt)
            fetch = {k: v for k, v in endpoints.items() if k.count("/") <= 3}
            fetch["pool5"] = net
            return sess.run(fetch, {x: images})


def test_ported_file_holds_weights_gamma_beta_and_moving_statistics(ported):
    values, _, out = ported
    params, stats, meta = load_weights(out)
    assert meta["backbone"] == "resnet_v1_50"
    assert len(params) == 159
    np.testing.assert_array_equal(params["backbone/block2/unit_4/conv2/kernel"],
                                  values["resnet_v1_50/block2/unit_4/bottleneck_v1/conv2/weights"])
    np.testing.assert_array_equal(
        params["backbone/block1/unit_1/shortcut/BatchNorm/scale"],
        values["resnet_v1_50/block1/unit_1/bottleneck_v1/shortcut/BatchNorm/gamma"])
    assert not any("mean" in k or "var" in k or "logits" in k for k in params)
    # the moving statistics, as a separate group, are the checkpoint's (an independent map)
    want = syn.moving_stats(values, "resnet_v1_50")
    assert sorted(stats) == sorted(want)
    for path, value in want.items():
        np.testing.assert_array_equal(stats[path], value, err_msg=path)


@pytest.fixture(scope="module")
def references(ported):
    """size -> (images, tf_slim's endpoints), computed once for both convolution formulations."""
    _, ckpt, _ = ported
    cache = {}

    def get(size):
        if size not in cache:
            images = np.random.default_rng(size[0] + size[1]).uniform(-1, 1, (2, *size, 3))
            images = images.astype(np.float32)
            cache[size] = images, _slim_reference(ckpt, images)
        return cache[size]

    return get


@pytest.mark.parametrize("conv_impl", ["auto", "xla"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_resnet_matches_tf_slim(ported, references, size, conv_impl):
    """Both formulations of the convolutions: 'auto' (this CPU's) and 'xla' (GPU/TPU's)."""
    _, _, out = ported
    images, ref = references(size)
    feats, endpoints = syn.run_ported("resnet_v1_50", out, images, conv_impl=conv_impl)
    errors = {}
    for name, want in ref.items():
        if name == "pool5":
            ours = np.asarray(feats)[:, :, None, :]  # [B, 1, 1, 2048]
        else:
            key = name[len("resnet_v1_50/"):].replace("/bottleneck_v1", "")
            ours = np.asarray(endpoints[key])
        errors[name] = syn.rel_err(ours, want)
    assert len(errors) == 1 + 16 + 4 + 1  # conv1, 16 units, 4 blocks, pool5
    print(f"\nresnet_v1_50 {size} {conv_impl}: max rel err {max(errors.values()):.2e}; " +
          ", ".join(f"{k.split('/', 1)[-1]}={v:.1e}" for k, v in errors.items()
                    if "unit" not in k))
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, bad
