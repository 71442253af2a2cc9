"""MobileNet v1 equivalence with independent references on a synthetic V2 checkpoint.

The checkpoint has exactly the real file's names, shapes and format (TF ``SaveV2`` bundle,
EMA and RMSProp slots included). Our side: TF-free reader -> python -m upm_jax.porting ->
load_pretrained with the file's weights and BatchNorm moving statistics.

References, with the same values (moving statistics included, inference-mode BN):
- 256x128 (the networks' input; even sizes pad alike at any size):
  ``keras.applications.MobileNet(weights=None, include_top=False)``.
- 225x161: Keras pads its strided depthwise convs with ZeroPadding2D(((0, 1), (0, 1))) and then
  VALID, which equals TF SAME (slim's padding) only on even sizes; on odd sizes SAME pads one on
  each side and keeps ceil(n / 2) rows, Keras floor(n / 2) (at 225x161 Keras ends on a 7x5 map,
  slim on 8x6), so Keras is not a reference there. The odd size uses a small reference written
  here with raw TF ops (tf.nn.conv2d / tf.nn.depthwise_conv2d with padding='SAME',
  tf.nn.batch_normalization, tf.nn.relu6), i.e. slim's layer semantics spelled out.
Metric: relative error max|ours - ref| / max|ref| per endpoint; all 27 endpoints plus the DAL
feature (slim AvgPool_1a, computed on the reference with tf.nn.avg_pool2d).
"""
import numpy as np
import pytest

import slim_synthetic as syn
from upm_jax.models.mobilenet_v1 import SEPARABLE_LAYERS
from upm_jax.porting.weights_file import load_weights

pytestmark = pytest.mark.slow

TOL = 1e-5
LAYERS = ["Conv2d_0"] + [f"Conv2d_{i}_{kind}" for i in range(1, 14)
                         for kind in ("depthwise", "pointwise")]


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    """(values, ported .npz path) of a synthetic MobileNet v1 V2 bundle."""
    d = tmp_path_factory.mktemp("mobilenet")
    values = syn.synthetic_values("mobilenet_v1", seed=2)
    prefix = str(d / "mobilenet_v1_1.0_224.ckpt")
    syn.write_v2(prefix, values)
    out = str(d / "mobilenet_v1.npz")
    assert syn.port_weights_cli(["--from", "slim", prefix, "--out", out]) == 0
    return values, out


def _layer_values(values, layer):
    """(kernel, gamma, beta, moving_mean, moving_variance) of one slim layer."""
    scope = f"MobilenetV1/{layer}/"
    kernel = values[scope + ("depthwise_weights" if "depthwise" in layer else "weights")]
    bn = [values[scope + "BatchNorm/" + n] for n in ("gamma", "beta", "moving_mean",
                                                     "moving_variance")]
    return [kernel] + bn


def _keras_reference(values, images):
    import keras

    base = keras.applications.MobileNet(input_shape=images.shape[1:], weights=None,
                                        include_top=False)
    keras_names = {"Conv2d_0": "conv1"}
    for i in range(1, 14):
        keras_names[f"Conv2d_{i}_depthwise"] = f"conv_dw_{i}"
        keras_names[f"Conv2d_{i}_pointwise"] = f"conv_pw_{i}"
    for layer, kname in keras_names.items():
        kernel, gamma, beta, mean, var = _layer_values(values, layer)
        base.get_layer(kname).set_weights([kernel])
        base.get_layer(kname + "_bn").set_weights([gamma, beta, mean, var])
    outputs = [base.get_layer(keras_names[layer] + "_relu").output for layer in LAYERS]
    model = keras.Model(base.input, outputs)
    return dict(zip(LAYERS, [np.asarray(o) for o in model(images, training=False)]))


def _raw_tf_reference(values, images):
    """slim MobileNet v1 with raw TF ops: SAME padding everywhere, BN eps 1e-3, ReLU6."""
    import tensorflow as tf

    strides = [2] + [s if kind == "depthwise" else 1 for s, _ in SEPARABLE_LAYERS
                     for kind in ("depthwise", "pointwise")]
    x = tf.constant(images)
    out = {}
    for layer, stride in zip(LAYERS, strides):
        kernel, gamma, beta, mean, var = _layer_values(values, layer)
        if "depthwise" in layer:
            x = tf.nn.depthwise_conv2d(x, kernel, [1, stride, stride, 1], "SAME")
        else:
            x = tf.nn.conv2d(x, kernel, stride, "SAME")
        x = tf.nn.relu6(tf.nn.batch_normalization(x, mean, var, beta, gamma, 1e-3))
        out[layer] = x.numpy()
    return out


def test_ported_file_holds_weights_gamma_beta_and_moving_statistics(ported):
    values, out = ported
    params, stats, meta = load_weights(out)
    assert meta["backbone"] == "mobilenet_v1"
    assert len(params) == 81
    np.testing.assert_array_equal(params["backbone/Conv2d_5_depthwise/depthwise_kernel"],
                                  values["MobilenetV1/Conv2d_5_depthwise/depthwise_weights"])
    np.testing.assert_array_equal(params["backbone/Conv2d_0/BatchNorm/bias"],
                                  values["MobilenetV1/Conv2d_0/BatchNorm/beta"])
    assert not any("mean" in k or "var" in k or "Logits" in k for k in params)
    # the moving statistics, as a separate group, are the checkpoint's (an independent map)
    want = syn.moving_stats(values, "MobilenetV1")
    assert sorted(stats) == sorted(want)
    for path, value in want.items():
        np.testing.assert_array_equal(stats[path], value, err_msg=path)


@pytest.fixture(scope="module")
def references(ported):
    """size -> (images, reference endpoints, reference DAL feature), computed once for both
    convolution formulations."""
    import tensorflow as tf

    values, _ = ported
    cache = {}

    def get(size):
        if size not in cache:
            images = np.random.default_rng(size[0] * size[1]).uniform(-1, 1, (2, *size, 3))
            images = images.astype(np.float32)
            odd = size[0] % 2 or size[1] % 2
            ref = (_raw_tf_reference if odd else _keras_reference)(values, images)
            final = ref["Conv2d_13_pointwise"]
            h, w = final.shape[1:3]
            ref_dal = tf.nn.avg_pool2d(final, (min(h, 7), min(w, 7)), 2, "VALID").numpy()
            cache[size] = images, ref, ref_dal
        return cache[size]

    return get


@pytest.mark.parametrize("conv_impl", ["auto", "xla"])
@pytest.mark.parametrize("size", [(256, 128), (225, 161)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_mobilenet_matches_reference(ported, references, size, conv_impl):
    """Both formulations of the convolutions: 'auto' (this CPU's) and 'xla' (GPU/TPU's)."""
    _, out = ported
    images, ref, ref_dal = references(size)
    odd = size[0] % 2 or size[1] % 2
    feats, endpoints = syn.run_ported("mobilenet_v1", out, images, conv_impl=conv_impl)
    errors = {name: syn.rel_err(endpoints[name], want) for name, want in ref.items()}
    errors["AvgPool_1a"] = syn.rel_err(np.asarray(feats)[:, :, None, :], ref_dal)
    assert len(errors) == 28
    print(f"\nmobilenet_v1 {size} {conv_impl} ({'raw tf' if odd else 'keras'}): max rel err "
          f"{max(errors.values()):.2e}; " + ", ".join(
              f"{k}={v:.1e}" for k, v in errors.items() if "pointwise" in k or "_0" in k
              or "Avg" in k))
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, bad
