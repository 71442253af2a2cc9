"""Backbone/head shapes, GAM frozen-relation semantics, stripe arithmetic, BN, dtype, registry."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from upm_jax.models import BatchNorm, DALHead, build_model, slim_avgpool, stripe_pool
from upm_jax.models import mobilenet_v1, resnet_v1


def _shapes(model, size, **kw):
    x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape)))
    return variables, jax.eval_shape(lambda v, i: model.apply(v, i, **kw), variables, x)


HEAD_CASES = [("dal", 1)] + [(h, p) for h in ("local", "global") for p in (1, 2, 4, 8)]


@pytest.mark.parametrize("backbone,channels", [("mobilenet_v1", 1024), ("resnet_v1_50", 2048)])
@pytest.mark.parametrize("head,n_part", HEAD_CASES)
def test_feature_shapes(backbone, channels, head, n_part):
    model = build_model(backbone, head, n_part=n_part)
    _, feats = _shapes(model, (256, 128))
    dim = 256 if head == "global" else channels
    parts = 1 if head == "dal" else n_part
    assert feats.shape == (2, parts, dim) and feats.dtype == jnp.float32
    assert (model.num_parts, model.feature_dim) == (parts, dim)


@pytest.mark.parametrize("backbone,last,shape", [
    ("mobilenet_v1", "Conv2d_13_pointwise", (2, 8, 4, 1024)),
    ("resnet_v1_50", "block4", (2, 8, 4, 2048)),
])
def test_endpoints(backbone, last, shape):
    _, (feats, endpoints) = _shapes(build_model(backbone, "dal"), (256, 128),
                                    return_endpoints=True)
    assert endpoints[last].shape == shape
    if backbone == "mobilenet_v1":
        assert len(endpoints) == 27 and endpoints["Conv2d_0"].shape == (2, 128, 64, 32)
        assert endpoints["Conv2d_1_depthwise"].shape == (2, 128, 64, 32)
    else:  # conv1, pool1, 16 units, 4 blocks; strides in the last unit of blocks 1-3
        assert len(endpoints) == 22 and endpoints["pool1"].shape == (2, 64, 32, 64)
        assert endpoints["block1/unit_2"].shape == (2, 64, 32, 256)
        assert endpoints["block1"].shape == (2, 32, 16, 256)
        assert endpoints["block3/unit_5"].shape == (2, 16, 8, 1024)


def test_backbone_parameter_counts():
    counts = {}
    for backbone in ("mobilenet_v1", "resnet_v1_50"):
        variables, _ = _shapes(build_model(backbone, "dal"), (224, 112))
        counts[backbone] = sum(x.size for x in jax.tree.leaves(variables["params"]["backbone"]))
    # Conv weights + BN gamma/beta (moving statistics and classifier excluded).
    assert counts == {"mobilenet_v1": 3_206_976, "resnet_v1_50": 23_508_032}


def test_depth_multiplier_and_min_depth():
    assert mobilenet_v1.scaled_depth(32, 0.25) == 8 and mobilenet_v1.scaled_depth(32, 0.2) == 8
    assert mobilenet_v1.scaled_depth(1024, 0.5) == 512
    variables, feats = _shapes(build_model("mobilenet_v1", "local", n_part=2,
                                           depth_multiplier=0.25), (64, 32))
    assert variables["params"]["backbone"]["Conv2d_0"]["kernel"].shape == (3, 3, 3, 8)
    assert feats.shape == (2, 2, 256)


def test_stripe_arithmetic_drops_remainder_rows():
    x = np.random.default_rng(0).normal(size=(2, 7, 3, 5)).astype(np.float32)
    got = np.asarray(stripe_pool(jnp.asarray(x), 2))  # 7 // 2 = 3 rows per stripe, row 6 dropped
    want = np.stack([x[:, 0:3].mean(axis=(1, 2)), x[:, 3:6].mean(axis=(1, 2))], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    got = np.asarray(stripe_pool(jnp.asarray(x), 3))  # 2 rows per stripe, row 6 dropped
    np.testing.assert_allclose(got[:, 2], x[:, 4:6].mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stripe_pool(jnp.asarray(x), 7)), x.mean(axis=2),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="height 7 into n_part=8"):
        stripe_pool(jnp.asarray(x), 8)


def test_dal_pooling():
    x = np.random.default_rng(1).normal(size=(2, 8, 4, 6)).astype(np.float32)
    # slim AvgPool_1a on an 8x4 map (256x128 input): one 7x4 window over the first 7 rows.
    np.testing.assert_allclose(np.asarray(slim_avgpool(jnp.asarray(x)))[:, 0],
                               x[:, :7].mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(slim_avgpool(jnp.asarray(x[:, :7])))[:, 0],
                               x[:, :7].mean(axis=(1, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="at most 8x8"):
        slim_avgpool(jnp.zeros((1, 9, 4, 6)))
    got = DALHead("mean").apply({}, jnp.asarray(x), False)
    np.testing.assert_allclose(np.asarray(got)[:, 0], x.mean(axis=(1, 2)), rtol=1e-6)


def _gam_reference(fmap, logits, stats, n_part, train, eps=1e-3):
    """The GAM as the original code builds it, in float64 NumPy, from the head's own parameters."""
    fmap = np.asarray(fmap, np.float64)
    b, h = fmap.shape[:2]
    rows = h // n_part
    parts = fmap[:, : rows * n_part].reshape(b, n_part, rows, *fmap.shape[2:]).mean(axis=(2, 3))
    whole = fmap.mean(axis=(1, 2))

    def conv(v, p):
        out = v @ np.asarray(p["kernel"], np.float64)[0, 0]
        return out + np.asarray(p["bias"], np.float64) if "bias" in p else out

    g = conv(whole, logits["global"])
    outs = []
    for i in range(n_part):
        z = conv(np.concatenate([conv(parts[:, i], logits[f"part_{i}"]), g], axis=-1),
                 logits[f"relation_{i}"])
        if train:
            mean, var = z.mean(axis=0), z.var(axis=0)
        else:
            mean = np.asarray(stats[f"relation_{i}"]["BatchNorm"]["mean"], np.float64)
            var = np.asarray(stats[f"relation_{i}"]["BatchNorm"]["var"], np.float64)
        bn = logits[f"relation_{i}"]["BatchNorm"]
        z = (z - mean) / np.sqrt(var + eps) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])
        outs.append(np.clip(z, 0, 6) + g)
    return np.stack(outs, axis=1)


@pytest.fixture(scope="module")
def gam_setup():
    model = build_model("mobilenet_v1", "global", n_part=3, depth_multiplier=0.25)
    images = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (4, 96, 48, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images, train=False)
    # Non-trivial gamma/beta in the relation BN so the reference really checks them.
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    rng = np.random.default_rng(3)
    for k in flat:
        if k.startswith("head/Logits/relation") and "BatchNorm" in k:
            flat[k] = jnp.asarray(rng.uniform(0.5, 1.5, flat[k].shape), jnp.float32)
    variables = {"params": traverse_util.unflatten_dict(flat, sep="/"),
                 "batch_stats": variables["batch_stats"]}
    return model, images, variables


@pytest.mark.slow
def test_gam_relation_frozen_by_default(gam_setup):
    model, images, variables = gam_setup
    assert model.frozen_scopes == (("head", "Logits"),)
    stats = variables["batch_stats"]["head"]["Logits"]
    assert set(stats) == {"relation_0", "relation_1", "relation_2"}
    for s in stats.values():  # never-updated moving statistics
        np.testing.assert_array_equal(s["BatchNorm"]["mean"], 0.0)
        np.testing.assert_array_equal(s["BatchNorm"]["var"], 1.0)
    logits = variables["params"]["head"]["Logits"]
    assert logits["part_0"]["kernel"].shape == (1, 1, 256, 256)
    assert logits["relation_0"]["kernel"].shape == (1, 1, 512, 256)
    np.testing.assert_array_equal(logits["global"]["bias"], 0.0)

    # Extraction (train=False): relation BN normalises with the moving 0/1 statistics.
    feats, endpoints = model.apply(variables, images, train=False, return_endpoints=True)
    want = _gam_reference(endpoints["Conv2d_13_pointwise"], logits, stats, 3, train=False)
    np.testing.assert_allclose(np.asarray(feats), want, rtol=1e-4, atol=1e-5)

    # Training: batch statistics, and the relation moving statistics are never written
    # (the backbone's are).
    (feats, endpoints), new = model.apply(variables, images, train=True, return_endpoints=True,
                                          mutable=["batch_stats"])
    want = _gam_reference(endpoints["Conv2d_13_pointwise"], logits, stats, 3, train=True)
    np.testing.assert_allclose(np.asarray(feats), want, rtol=1e-4, atol=1e-4)
    jax.tree.map(np.testing.assert_array_equal, new["batch_stats"]["head"], 
                 variables["batch_stats"]["head"])
    moved = new["batch_stats"]["backbone"]["Conv2d_5_pointwise"]["BatchNorm"]["mean"]
    assert np.abs(np.asarray(moved)).max() > 0


@pytest.mark.slow
def test_gam_train_relation_switch(gam_setup):
    _, images, variables = gam_setup
    model = build_model("mobilenet_v1", "global", n_part=3, depth_multiplier=0.25,
                        train_relation=True)
    assert model.frozen_scopes == ()
    _, new = model.apply(variables, images, train=True, mutable=["batch_stats"])
    moved = new["batch_stats"]["head"]["Logits"]["relation_1"]["BatchNorm"]
    assert np.abs(np.asarray(moved["mean"])).max() > 0
    assert np.abs(np.asarray(moved["var"]) - 1).max() > 0
    # Same parameters, same forward as the frozen model: only the statistics handling differs.
    frozen = build_model("mobilenet_v1", "global", n_part=3, depth_multiplier=0.25)
    np.testing.assert_array_equal(np.asarray(model.apply(variables, images)),
                                  np.asarray(frozen.apply(variables, images)))


def test_batchnorm_follows_tf_fused_semantics():
    x = np.random.default_rng(4).normal(2.0, 3.0, size=(2, 3, 2, 4)).astype(np.float32)
    bn = BatchNorm(decay=0.9, epsilon=1e-3)
    variables = bn.init(jax.random.key(0), jnp.asarray(x), train=False)
    y, new = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(y), (x - mean) / np.sqrt(var + 1e-3), rtol=1e-4,
                               atol=1e-5)
    n = 2 * 3 * 2  # the moving variance moves towards the unbiased batch variance
    np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_features():
    images = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 64, 32, 3)), jnp.float32)
    m32 = build_model("mobilenet_v1", "local", n_part=2, depth_multiplier=0.25)
    m16 = build_model("mobilenet_v1", "local", n_part=2, depth_multiplier=0.25,
                      dtype=jnp.bfloat16)
    variables = m16.init(jax.random.key(0), images)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    f16, f32 = m16.apply(variables, images), m32.apply(variables, images)
    assert f16.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(f16 - f32)) / jnp.max(jnp.abs(f32)))
    assert 0 < err < 0.05


def test_initialisers_follow_slim():
    w = mobilenet_v1.kernel_init()(jax.random.key(0), (1, 1, 512, 512))
    assert float(jnp.max(jnp.abs(w))) <= 2 * 0.09 + 1e-6  # truncated at 2 sd
    assert abs(float(jnp.std(w)) - 0.09 * 0.8796) < 0.002  # sd of a 2-sd truncated normal
    w = resnet_v1.kernel_init()(jax.random.key(0), (3, 3, 256, 256))
    assert abs(float(jnp.std(w)) - np.sqrt(2 / (9 * 256))) < 0.002


@pytest.mark.parametrize("kwargs,match", [
    (dict(backbone="vgg"), "unknown backbone 'vgg'"),
    (dict(head="attention"), "unknown head 'attention'"),
    (dict(n_part=0), "n_part must be a positive integer"),
    (dict(n_part=2.5), "n_part must be a positive integer"),
    (dict(depth_multiplier=0), "depth_multiplier must be > 0"),
    (dict(backbone="resnet_v1_50", depth_multiplier=0.5), "has no depth multiplier"),
    (dict(dtype=jnp.int32), "dtype must be float32 or bfloat16"),
    (dict(dtype=jnp.float16), "dtype must be float32 or bfloat16"),
])
def test_build_model_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


def test_rejects_non_rgb_images():
    model = build_model("mobilenet_v1", "dal", depth_multiplier=0.25)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\].*\(2, 64, 32, 1\)"):
        model.init(jax.random.key(0), jnp.zeros((2, 64, 32, 1)))


@pytest.mark.slow
def test_bn_decay_override_sets_the_moving_average_rate():
    """build_model(bn_decay=d): one training step moves the moving mean by (1 - d)."""
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 1.0, (4, 64, 32, 3)), jnp.float32)
    moved = {}
    for decay in (None, 0.5):
        model = build_model("mobilenet_v1", "dal", depth_multiplier=0.25, bn_decay=decay)
        variables = model.init(jax.random.PRNGKey(0), x)
        _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        moved[decay] = np.asarray(updates["batch_stats"]["backbone"]["Conv2d_0"]["BatchNorm"]["mean"])
    # Same batch mean in both runs (same weights), so the updates scale as (1 - decay).
    np.testing.assert_allclose(moved[0.5], moved[None] * (0.5 / (1 - 0.9997)), rtol=1e-4)
    with pytest.raises(ValueError, match="bn_decay"):
        build_model("mobilenet_v1", "dal", bn_decay=1.0)


@pytest.mark.parametrize("shape, stride, padding", [
    ((2, 17, 9, 8), 2, "SAME"), ((2, 16, 8, 8), 1, "SAME"), ((2, 16, 8, 8), 2, "SAME"),
    ((2, 15, 9, 8), 2, ((1, 1), (1, 1))), ((3, 8, 6, 4), 1, "SAME"),
])
def test_cpu_depthwise_taps_equal_grouped_convolution(shape, stride, padding):
    """The CPU depthwise path (shifted multiply-adds) matches XLA's grouped convolution,
    values and gradients, for TF's asymmetric SAME and slim's explicit padding."""
    from jax import lax
    from upm_jax.models.layers import _depthwise_by_taps
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 1, shape[-1])), jnp.float32)

    def grouped(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=shape[-1])

    def taps(x, w):
        return _depthwise_by_taps(x, w, stride, padding)

    np.testing.assert_allclose(taps(x, w), grouped(x, w), atol=1e-5)
    for argnum in (0, 1):
        g_taps = jax.grad(lambda *a: jnp.sum(taps(*a) ** 2), argnum)(x, w)
        g_ref = jax.grad(lambda *a: jnp.sum(grouped(*a) ** 2), argnum)(x, w)
        np.testing.assert_allclose(g_taps, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head", ["local", "global"])
def test_conv_impls_agree_on_cpu_and_compile_per_platform(head):
    """conv_impl='auto' (CPU: taps and matrix products, chosen at lowering) and 'xla'
    (XLA's convolution, what GPUs and TPUs run) give the same features and gradients, and
    the lowered CPU module holds the per-platform choice, not XLA's depthwise convolution."""
    kw = dict(n_part=2, depth_multiplier=0.25)
    auto = build_model("mobilenet_v1", head, **kw)
    xla = build_model("mobilenet_v1", head, conv_impl="xla", **kw)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 64, 32, 3)), jnp.float32)
    variables = auto.init(jax.random.PRNGKey(0), images, train=False)

    def loss(model, params):
        feats, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                               images, train=True, mutable=["batch_stats"])
        return jnp.sum(feats ** 2), feats

    def rel(a, b):   # the equivalence tests' metric: max|a - b| / max|b|
        return float(jnp.abs(a - b).max() / jnp.abs(b).max())

    (_, feats_a), grads_a = jax.value_and_grad(
        lambda p: loss(auto, p), has_aux=True)(variables["params"])
    (_, feats_x), grads_x = jax.value_and_grad(
        lambda p: loss(xla, p), has_aux=True)(variables["params"])

    def flat(tree):
        return jnp.concatenate([g.ravel() for g in jax.tree.leaves(tree)])

    # measured 2.1e-5 / 2.2e-5 (features) and 2.0e-5 / 1.9e-5 (gradients) for LAM / GAM
    assert rel(feats_a, feats_x) < 1e-4
    assert rel(flat(grads_a), flat(grads_x)) < 1e-4

    def grouped_convolutions(model):   # depthwise convolutions in the module lowered for CPU
        text = jax.jit(lambda p: loss(model, p)[0]).lower(variables["params"]).as_text()
        return sum(int(g) > 1 for g in re.findall(r"feature_group_count = (\d+)", text))

    assert grouped_convolutions(auto) == 0
    assert grouped_convolutions(xla) == 13   # MobileNet v1's depthwise layers
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        build_model("mobilenet_v1", head, conv_impl="taps")
