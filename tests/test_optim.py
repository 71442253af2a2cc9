"""Optimisers, schedules, weight decay and EMA against numbers derived from the TF1 update rules."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from upm_jax.training import optim
from upm_jax.models import build_model

GRADS = [np.array([0.5, -1.0, 3.0]), np.array([0.2, 0.3, -4.0]), np.array([-0.7, 0.0, 1.0])]
W0 = np.array([1.0, -2.0, 0.5])


def _constant(name, lr):
    """A schedule of `name` that keeps `lr` for the few steps run here."""
    return optim.make_schedule(name, learning_rate=lr, learning_rate_2=lr, steps_per_epoch=1.0,
                               decay_rate=1.0, total_steps=100)


def _run(tx, schedule, grads=GRADS, w0=W0):
    params = {"w": jnp.asarray(w0, jnp.float32)}
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params,
                                   schedule=schedule)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(params["w"]))
    return out


def _tf1_rmsprop_by_hand(lrs, grads=GRADS, w0=W0):
    """ms starts at 1; ms = .9 ms + .1 g^2; mom = .9 mom + lr g / sqrt(ms + 1); w -= mom."""
    w, ms, mom, out = w0.copy(), np.ones(3), np.zeros(3), []
    for lr, g in zip(lrs, grads):
        ms = 0.9 * ms + 0.1 * g * g
        mom = 0.9 * mom + lr * g / np.sqrt(ms + 1.0)
        w = w - mom
        out.append(w.copy())
    return out


def test_tf1_rmsprop_first_step_written_out():
    # step 1, coordinate 0: ms = .9 + .1 * .25 = .925; mom = .1 * .5 / sqrt(1.925); w = 1 - mom
    got = _run(optim.make_optimizer("rmsprop"), _constant("rmsprop", 0.1))[0]
    np.testing.assert_allclose(got[0], 1 - 0.05 / math.sqrt(1.925), rtol=1e-6)
    # coordinate 2: ms = .9 + .9 = 1.8; mom = .3 / sqrt(2.8)
    np.testing.assert_allclose(got[2], 0.5 - 0.3 / math.sqrt(2.8), rtol=1e-6)


def test_tf1_rmsprop_matches_update_equations_with_decaying_lr():
    # decay every step: lr_t = .1 * .5^t, applied inside the momentum accumulator
    schedule = optim.make_schedule("rmsprop", learning_rate=0.1, steps_per_epoch=0.5,
                                   decay_epochs=2.0, decay_rate=0.5, total_steps=3)
    got = _run(optim.make_optimizer("rmsprop"), schedule)
    expected = _tf1_rmsprop_by_hand([0.1, 0.05, 0.025])
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)


def test_tf1_rmsprop_matches_tensorflow():
    import tensorflow as tf

    var = tf.Variable(W0.astype(np.float32))
    opt = tf.compat.v1.train.RMSPropOptimizer(0.1, decay=0.9, momentum=0.9, epsilon=1.0)
    got = _run(optim.make_optimizer("rmsprop"), _constant("rmsprop", 0.1))
    for g, mine in zip(GRADS, got):
        opt.apply_gradients([(tf.constant(g.astype(np.float32)), var)])
        np.testing.assert_allclose(mine, var.numpy(), rtol=1e-6, atol=1e-7)


def test_sgd_nesterov_two_piece_matches_tensorflow_and_hand_rule():
    import tensorflow as tf

    tx = optim.make_optimizer("sgd")
    schedule = optim.make_schedule("sgd", learning_rate=0.1, learning_rate_2=0.01,
                                   steps_per_epoch=5.0, total_steps=4)
    # boundary 4 // 2 = 2: steps 0, 1, 2 use .1, step 3 uses .01 (tf.train.piecewise_constant)
    assert [float(optim.learning_rate_at(schedule, s)) for s in range(4)] == pytest.approx(
        [0.1, 0.1, 0.1, 0.01])
    grads = GRADS + [np.array([1.0, 1.0, -1.0])]
    got = _run(tx, schedule, grads)
    w, acc = W0.copy(), np.zeros(3)
    var = tf.Variable(W0.astype(np.float32))
    lr_var = tf.Variable(0.1)
    opt = tf.compat.v1.train.MomentumOptimizer(lr_var, momentum=0.9, use_nesterov=True)
    for step, g in enumerate(grads):
        lr = 0.1 if step <= 2 else 0.01
        acc = 0.9 * acc + g
        w = w - lr * (g + 0.9 * acc)
        np.testing.assert_allclose(got[step], w, rtol=1e-6, atol=1e-7)
        lr_var.assign(lr)
        opt.apply_gradients([(tf.constant(g.astype(np.float32)), var)])
        np.testing.assert_allclose(got[step], var.numpy(), rtol=1e-6, atol=1e-7)


def test_rmsprop_staircase_schedule_lengths():
    # 1050 frames / batch 100 = 10.5 steps per epoch; decay every int(10.5 * 2) = 21 steps
    schedule = optim.make_schedule("rmsprop", learning_rate=0.045, steps_per_epoch=10.5,
                                   total_steps=100)
    assert int(schedule.decay_steps) == 21
    values = [float(optim.learning_rate_at(schedule, s)) for s in (0, 20, 21, 41, 42)]
    np.testing.assert_allclose(values, [0.045, 0.045, 0.045 * 0.94, 0.045 * 0.94, 0.045 * 0.94 ** 2],
                               rtol=1e-6)
    # the same values, to the bit, as optax's staircase schedule the step used to compile in
    reference = optax.exponential_decay(0.045, transition_steps=21, decay_rate=0.94, staircase=True)
    steps = jnp.arange(200, dtype=jnp.int32)
    np.testing.assert_array_equal(jax.jit(jax.vmap(lambda t: optim.learning_rate_at(schedule, t)))(steps),
                                  jax.jit(jax.vmap(reference))(steps))


def test_make_optimizer_and_schedule_reject_bad_settings():
    with pytest.raises(ValueError, match="'adam' is not one of"):
        optim.make_optimizer("adam")
    with pytest.raises(ValueError, match="'adam' is not one of"):
        optim.make_schedule("adam", learning_rate=0.1, steps_per_epoch=1.0, total_steps=10)
    with pytest.raises(ValueError, match="decay interval"):
        optim.make_schedule("rmsprop", learning_rate=0.1, steps_per_epoch=0.2, total_steps=10)
    with pytest.raises(ValueError, match="learning_rate_2"):
        optim.make_schedule("sgd", learning_rate=0.1, steps_per_epoch=1.0, total_steps=10)


def test_ema_decay_schedule_and_update():
    assert float(optim.ema_decay_at(0, 0.9999)) == pytest.approx(0.1)
    assert float(optim.ema_decay_at(1, 0.9999)) == pytest.approx(2 / 11)
    assert float(optim.ema_decay_at(10**6, 0.9999)) == pytest.approx(0.9999)
    ema = {"a": jnp.array([1.0, 2.0])}
    new = optim.ema_update(ema, {"a": jnp.array([3.0, 0.0])}, 1, 0.9999)
    d = 2 / 11
    np.testing.assert_allclose(new["a"], [d * 1 + (1 - d) * 3, d * 2], rtol=1e-6)


def test_weight_decay_on_conv_kernels_only():
    params = {
        "Conv2d_0": {"kernel": jnp.full((1, 1, 2, 3), 2.0), "BatchNorm": {"scale": jnp.ones(3)}},
        "Conv2d_1_depthwise": {"depthwise_kernel": jnp.ones((3, 3, 3, 1))},
        "Conv2d_2_depthwise": {"kernel": jnp.ones((3, 3, 1, 3))},  # grouped conv named depthwise
        "dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
    }
    # only Conv2d_0/kernel: 4e-5 * (6 * 4) / 2
    np.testing.assert_allclose(float(optim.l2_weight_decay(params, 4e-5)), 4e-5 * 12, rtol=1e-6)
    grad = jax.grad(lambda p: optim.l2_weight_decay(p, 4e-5))(params)
    np.testing.assert_allclose(grad["Conv2d_0"]["kernel"], 4e-5 * 2.0)
    assert not np.any(grad["Conv2d_1_depthwise"]["depthwise_kernel"])
    assert not np.any(grad["Conv2d_2_depthwise"]["kernel"])


def test_weight_decay_mask_on_mobilenet_excludes_every_depthwise_kernel():
    model = build_model("mobilenet_v1", "local", depth_multiplier=0.25, n_part=2)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 32, 3))))["params"]
    flat = {"/".join(str(k.key) for k in path): (leaf, decayed) for (path, leaf), decayed in zip(
        jax.tree_util.tree_leaves_with_path(shapes), jax.tree_util.tree_leaves(optim.weight_decay_mask(shapes)))}
    decayed = sorted(k for k, (_, d) in flat.items() if d)
    depthwise = [k for k in flat if k.endswith("depthwise_kernel")]
    assert len(depthwise) == 13 and not any(flat[k][1] for k in depthwise)
    # the stem and the 13 pointwise convs, nothing else
    assert len(decayed) == 14 and all(k.endswith("/kernel") and flat[k][0].ndim == 4 for k in decayed)
