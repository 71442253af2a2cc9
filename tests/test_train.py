"""Train state and the jitted data-parallel step: device-count invariance, frozen scopes, EMA, forms."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from upm_jax import parallel
from upm_jax.training import optim
from upm_jax.training import state as state_lib
from upm_jax.training import step as step_lib
from upm_jax.training.association import AnchorMemory
from upm_jax.models import build_model

SIZES = (5, 4, 3)  # tracklets per camera
IMAGE = (16, 8)
BATCH = 16


class _Backbone(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(8, (3, 3), strides=2, use_bias=False, name="Conv2d_0")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="BatchNorm")(x))
        x = nn.Conv(8, (3, 3), feature_group_count=8, use_bias=False, name="Conv2d_1_depthwise")(x)
        x = nn.Conv(12, (1, 1), use_bias=False, name="Conv2d_1_pointwise")(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="BatchNorm_1")(x))


class _Logits(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(6, (1, 1), name="reduce")(x)
        # unlike the real GAM, this BN *would* move its statistics: the step must keep them
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="BatchNorm")(x)


class _Head(nn.Module):
    n_part: int

    @nn.compact
    def __call__(self, x, train):
        b, h, w, c = x.shape
        s = h // self.n_part
        parts = x[:, : s * self.n_part].reshape(b, self.n_part, s, w, c).mean(axis=(2, 3))  # [B, P, C]
        return _Logits(name="Logits")(parts[:, :, None, :], train)[:, :, 0, :]  # [B, P, 6]


class TinyModel(nn.Module):
    """Follows the model contract: backbone/head submodules, [B, P, D] float32, frozen Logits."""

    n_part: int = 2

    @property
    def frozen_scopes(self):
        return (("head", "Logits"),)

    @nn.compact
    def __call__(self, images, train=False):
        fmap = _Backbone(name="backbone")(images, train)
        return _Head(self.n_part, name="head")(fmap, train).astype(jnp.float32)


def _batches(num, seed=0, batch=BATCH, image=IMAGE):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        camera = rng.integers(0, len(SIZES), batch).astype(np.int32)
        track = np.array([rng.integers(0, SIZES[c]) for c in camera], np.int32)
        out.append({"image": rng.integers(0, 256, (batch, *image, 3), dtype=np.uint8),
                    "track": track, "camera": camera})
    return out


def _setup(mesh, model=None, image=IMAGE, optimizer="rmsprop", cross_start_step=1):
    """(initial state, step(state, batch[, dataset])) with the schedule bound."""
    model = model or TinyModel()
    tx = optim.make_optimizer(optimizer)
    schedule = optim.make_schedule(optimizer, learning_rate=0.045, learning_rate_2=0.0045,
                                   steps_per_epoch=1.0, total_steps=6, cross_start=cross_start_step)
    dims = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image, 3))))
    feat = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, *image, 3))), dims)
    memory = AnchorMemory.zeros(SIZES, feat.shape[1], feat.shape[2])
    state = state_lib.create_train_state(model, jax.random.PRNGKey(1), image_shape=image, tx=tx,
                                     memory=memory, mesh=mesh)
    step_fn = step_lib.make_train_step(model, optimizer, mesh=mesh, frozen_scopes=model.frozen_scopes)
    return state, lambda state, batch, dataset=None: step_fn(state, schedule, batch, dataset)


def _host(state):
    return jax.tree.map(np.asarray, state)


def _run_host(mesh, batches, **kw):
    state, step_fn = _setup(mesh, **kw)
    metrics = []
    for b in batches:
        state, m = step_fn(state, parallel.global_batch(b, mesh))
        metrics.append({k: float(v) for k, v in m.items()})
    return _host(state), metrics


def _assert_trees_close(a, b, rtol=2e-4, atol=2e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


# The equality tests run on the stand-in and on the real MobileNet v1 GAM (frozen relation
# layers under Logits) at a small size: (model factory, image shape, global batch, steps).
# Reduction order differs between 8 devices and 1, so two correct runs agree only to
# rounding, which training amplifies (the real model's gradients have norm ~170 before
# clipping; from its third step a nearest-anchor decision can flip). The yardstick is the
# run's own rounding noise: the same run with each batch's samples reversed, which changes
# nothing but the summation order. 8 devices vs 1 may differ by no more than twice that.
# The real model runs here in XLA's convolution (conv_impl='xla', what GPUs and TPUs run);
# this CPU's own formulation ('auto': taps and matrix products) is held to it, features
# and gradients, by test_models_heads, and trains below (LAM) and in every run.
MODELS = {
    "tiny": (TinyModel, IMAGE, BATCH, 4),
    "mobilenet_gam": (lambda: build_model("mobilenet_v1", "global", depth_multiplier=0.25,
                                          n_part=2, conv_impl="xla"), (64, 32), 8, 2),
}
GROUPS = ("params", "ema_params", "batch_stats", "memory", "opt_state")


@pytest.fixture(scope="module", params=[
    "tiny", pytest.param("mobilenet_gam", marks=pytest.mark.slow)])
def case(request):
    make, image, batch, steps = MODELS[request.param]
    return dict(name=request.param, model=make(), image=image, batch=batch, steps=steps)


def _case_batches(case, reverse=False):
    batches = _batches(case["steps"], batch=case["batch"], image=case["image"])
    if reverse:
        batches = [{k: v[::-1].copy() for k, v in b.items()} for b in batches]
    return batches


def _gap(a, b):
    """Largest difference of two trees, each leaf scaled by the larger of its magnitudes."""
    return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), np.max(np.abs(y)), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_within_noise(got, want, noise_run, *, floor=1e-6):
    """Every group of `got` is as close to `want` as `noise_run` is (x2), or within `floor`."""
    for group in GROUPS:
        noise = _gap(getattr(noise_run, group), getattr(want, group))
        gap = _gap(getattr(got, group), getattr(want, group))
        assert gap <= max(2 * noise, floor), f"{group}: gap {gap:.3g}, own noise {noise:.3g}"


@pytest.fixture(scope="module")
def eight_device_run(case):
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    return _run_host(mesh, _case_batches(case), model=case["model"], image=case["image"])


@pytest.fixture(scope="module")
def reversed_run(case):
    return _run_host(parallel.make_mesh(), _case_batches(case, reverse=True),
                     model=case["model"], image=case["image"])


def test_eight_devices_equal_one_device(case, eight_device_run, reversed_run):
    _check_eight_devices_equal_one(case, eight_device_run, reversed_run)


def _check_eight_devices_equal_one(case, eight_device_run, reversed_run):
    state8, metrics8 = eight_device_run
    state1, metrics1 = _run_host(parallel.make_mesh(jax.devices()[:1]), _case_batches(case),
                                 model=case["model"], image=case["image"])
    _assert_within_noise(state1, state8, reversed_run[0])
    for m8, m1, mr in zip(metrics8, metrics1, reversed_run[1]):
        assert m8.keys() == m1.keys()
        for k in m8:
            assert abs(m1[k] - m8[k]) <= max(2 * abs(mr[k] - m8[k]), 1e-5 * abs(m8[k]), 1e-7), k
    assert int(state8.step) == int(state1.step) == case["steps"]
    assert metrics8[0]["cross_consistent"] == 0.0  # step 0 < cross_start_step
    assert any(m["cross_consistent"] > 0 for m in metrics8[1:])
    if case["name"] == "tiny":   # small enough that rounding stays at float32 level
        _assert_trees_close(state8.params, state1.params)
        _assert_trees_close(state8.memory, state1.memory)


def test_resident_form_equals_host_form(case, reversed_run):
    """Frames gathered on device by index (reversed within each batch) give the host run on
    the reversed batches, to float32 rounding."""
    mesh = parallel.make_mesh()
    batches = _case_batches(case)
    batch = case["batch"]
    # a resident dataset holding the same frames: batch b is rows batch*b .. batch*(b+1)-1
    dataset = {k: jnp.asarray(np.concatenate([b[k] for b in batches])) for k in ("image", "track", "camera")}
    dataset = parallel.replicate(dataset, mesh)
    state, step_fn = _setup(mesh, model=case["model"], image=case["image"])
    for i in range(case["steps"]):
        index = np.arange(batch * i, batch * (i + 1), dtype=np.int32)[::-1].copy()
        state, _ = step_fn(state, parallel.global_batch({"index": index}, mesh), dataset)
    state = _host(state)
    for group in GROUPS:
        assert _gap(getattr(state, group), getattr(reversed_run[0], group)) <= 1e-6, group


def _flat(tree):
    return traverse_util.flatten_dict(dict(tree))


def test_frozen_params_and_their_batch_stats_never_change(case, eight_device_run):
    model = case["model"]
    mesh = parallel.make_mesh()
    initial, _ = _setup(mesh, model=model, image=case["image"])
    initial = _host(initial)
    final, _ = eight_device_run
    scopes = [tuple(s) for s in model.frozen_scopes]
    frozen = _flat(final.frozen_params)
    assert frozen and all(any(k[:len(s)] == s for s in scopes) for k in frozen)
    assert not any(any(k[:len(s)] == s for s in scopes) for k in _flat(final.params))
    _assert_trees_close(final.frozen_params, initial.frozen_params, rtol=0, atol=0)
    stats, stats0 = _flat(final.batch_stats), _flat(initial.batch_stats)
    frozen_stats = [k for k in stats if any(k[:len(s)] == s for s in scopes)]
    assert frozen_stats
    for k in frozen_stats:
        np.testing.assert_array_equal(stats[k], stats0[k], err_msg="/".join(k))
    moved = max(np.abs(stats[k] - stats0[k]).max() for k in stats if k[0] == "backbone")
    assert moved > 1e-4
    params, params0 = _flat(final.params), _flat(initial.params)
    changed = max(np.abs(params[k] - params0[k]).max() for k in params if k[0] == "backbone")
    assert changed > 1e-4


def test_ema_follows_tf_step_dependent_decay():
    mesh = parallel.make_mesh()
    state, step_fn = _setup(mesh)
    p0 = _host(state.params)
    state, _ = step_fn(state, parallel.global_batch(_batches(1)[0], mesh))
    p1, ema1 = _host(state.params), _host(state.ema_params)
    # the EMA reads the params before the step's update (as the original graph): the shadow
    # starts at p0 and moves towards p0, so it stays p0 after the first step
    _assert_trees_close(ema1, p0, rtol=1e-6, atol=0)
    state, _ = step_fn(state, parallel.global_batch(_batches(2)[1], mesh))
    ema2 = _host(state.ema_params)
    d = 2 / 11  # t = 1: decay = min(.9999, 2/11), towards p1 (the params before step 2)
    _assert_trees_close(ema2, jax.tree.map(lambda e, b: d * e + (1 - d) * b, ema1, p1), rtol=1e-5, atol=1e-7)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0)))
    assert moved > 1e-7  # step 1 did move the params, so "ema1 == p0" says something
    assert int(state.step) == 2


def test_metrics_report_lr_and_weight_decay():
    mesh = parallel.make_mesh()
    state, step_fn = _setup(mesh, optimizer="sgd")
    params = _host(state.params)
    expected_wd = 4e-5 / 2 * sum(float(np.sum(params["backbone"][n]["kernel"] ** 2))
                                 for n in ("Conv2d_0", "Conv2d_1_pointwise"))
    expected_wd += 4e-5 / 2 * float(np.sum(_host(state.frozen_params)["head"]["Logits"]["reduce"]["kernel"] ** 2))
    lrs = []
    for b in _batches(5):
        state, m = step_fn(state, parallel.global_batch(b, mesh))
        if not lrs:
            np.testing.assert_allclose(float(m["weight_decay"]), expected_wd, rtol=1e-5)
            np.testing.assert_allclose(float(m["loss"]), float(m["association_loss"] + m["weight_decay"]),
                                       rtol=1e-6)
        lrs.append(float(m["lr"]))
    # total_steps 6 -> boundary 3: steps 0..3 at .045, then .0045
    np.testing.assert_allclose(lrs, [0.045] * 4 + [0.0045], rtol=1e-6)


def test_state_is_donated_and_bad_batches_are_rejected():
    mesh = parallel.make_mesh()
    state, step_fn = _setup(mesh)
    batch = _batches(1)[0]
    old_leaf = state.params["backbone"]["Conv2d_0"]["kernel"]
    state, _ = step_fn(state, parallel.global_batch(batch, mesh))
    assert old_leaf.is_deleted()
    with pytest.raises(ValueError, match=r"batch lacks \['camera'\]"):
        step_fn(state, {"image": batch["image"], "track": batch["track"]})
    with pytest.raises(ValueError, match="must be uint8"):
        step_fn(state, dict(batch, image=batch["image"].astype(np.float32)))
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        step_fn(state, {k: v[:12] for k, v in batch.items()})
    schedule = optim.make_schedule("rmsprop", learning_rate=0.01, steps_per_epoch=1.0, total_steps=2)
    with pytest.raises(ValueError, match="frozen_scopes"):
        step_lib.make_train_step(TinyModel(), "rmsprop", mesh=mesh, frozen_scopes=())(
            state, schedule, parallel.global_batch(batch, mesh))
    with pytest.raises(TypeError, match="optim.Schedule"):   # the call of old, with no schedule
        step_lib.make_train_step(TinyModel(), "rmsprop", mesh=mesh, frozen_scopes=(("head", "Logits"),))(
            state, parallel.global_batch(batch, mesh), None)


@pytest.mark.slow
def test_real_mobilenet_lam_steps_with_the_cpu_convolutions():
    """LAM in this CPU's formulation (the GAM case above runs XLA's, and checks its frozen
    layers), cross-camera association on from the first step."""
    mesh = parallel.make_mesh()
    model = build_model("mobilenet_v1", "local", depth_multiplier=0.25, n_part=2)
    image = (64, 32)
    state, step_fn = _setup(mesh, model=model, image=image, cross_start_step=0)
    assert state.memory.intra.shape == (2, sum(SIZES), model.feature_dim)
    for b in _batches(2, batch=8, image=image):
        state, metrics = step_fn(state, parallel.global_batch(b, mesh))
        assert all(np.isfinite(float(v)) for v in metrics.values())
    final = _host(state)
    assert final.frozen_params == {}
    assert np.abs(final.memory.intra).max() > 0


@pytest.mark.slow
def test_create_train_state_loads_pretrained_backbone(tmp_path):
    from upm_jax.porting.weights_file import save_weights

    mesh = parallel.make_mesh()
    model = build_model("mobilenet_v1", "global", depth_multiplier=0.25, n_part=2)
    image = (64, 32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image, 3))))
    flat = {"/".join(str(k.key) for k in path): np.full(leaf.shape, 0.01 * (i + 1), np.float32)
            for i, (path, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(shapes["params"]["backbone"]))}
    stats = {"backbone/" + "/".join(str(k.key) for k in path): np.full(leaf.shape, 0.5 + 0.01 * i,
                                                                       np.float32)
             for i, (path, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(
                 shapes["batch_stats"]["backbone"]))}
    path = str(tmp_path / "weights.npz")
    save_weights(path, {"backbone/" + k: v for k, v in flat.items()}, backbone="mobilenet_v1",
                 source="test", stats=stats)
    tx = optim.make_optimizer("rmsprop")
    memory = AnchorMemory.zeros(SIZES, 2, model.feature_dim)
    state = state_lib.create_train_state(model, jax.random.PRNGKey(1), image_shape=image, tx=tx, memory=memory,
                                     mesh=mesh, pretrained=path)
    for tree in (state.params, state.ema_params):
        got = {"/".join(str(k.key) for k in p): np.asarray(v)
               for p, v in jax.tree_util.tree_leaves_with_path(tree["backbone"])}
        assert got.keys() == flat.keys()
        for k in flat:
            np.testing.assert_array_equal(got[k], flat[k], err_msg=k)
    # the training graph starts from BN moving statistics 0 / 1, as the originals did
    start = state.batch_stats["backbone"]["Conv2d_0"]["BatchNorm"]
    assert not np.any(np.asarray(start["mean"])) and np.all(np.asarray(start["var"]) == 1)
    assert set(state.frozen_params["head"]) == {"Logits"}
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    # the same variables for the untrained network's features: replicated, usable by a jit
    # over all 8 devices (this once failed with "incompatible devices")
    variables = state_lib.init_variables(model, jax.random.PRNGKey(1), image_shape=image, mesh=mesh,
                                     pretrained=path, inference=True)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(variables))
    # ... which run in inference mode, with the file's moving statistics
    got = {"backbone/" + "/".join(str(k.key) for k in p): np.asarray(v)
           for p, v in jax.tree_util.tree_leaves_with_path(variables["batch_stats"]["backbone"])}
    assert got.keys() == stats.keys()
    for k in stats:
        np.testing.assert_array_equal(got[k], stats[k], err_msg=k)
    from upm_jax import extract as extract_lib
    images = parallel.global_batch({"x": np.zeros((8, *image, 3), np.uint8)}, mesh)["x"]
    feats = extract_lib.make_feature_fn(model, mesh)(variables, images)
    assert feats.shape == (8, 2, model.feature_dim)


@pytest.mark.slow
def test_trainer_factory_uses_the_config_hyper_parameters():
    from repo_configs import get_config
    from upm_jax.training import trainer as trainer_lib
    from upm_jax.data import FrameTable

    config = get_config("demo")
    config.data.image_size = 64
    config.train.batch_size = 8
    config.train.learning_rate = 0.07
    config.train.warm_up_epochs = 3.0
    tracklet = np.repeat(np.arange(5), 8).astype(np.int32)   # 5 tracklets of 8 frames
    table = FrameTable(path=np.asarray([f"f{i}.png" for i in range(40)]), tracklet=tracklet,
                       frame=np.tile(np.arange(8), 5).astype(np.int32),
                       tracklet_camera=np.asarray([0, 0, 1, 1, 1], np.int32),
                       tracklet_pid=np.arange(1, 6, dtype=np.int32),
                       tracklet_index=np.asarray([0, 1, 0, 1, 2], np.int32), num_cameras=2)
    mesh = parallel.make_mesh()
    trainer = trainer_lib.make_trainer(config, "local", table, mesh, load_weights=False)
    assert trainer.cross_start == (40 // 8) * 3
    assert float(optim.learning_rate_at(trainer.schedule, 0)) == pytest.approx(0.07)
    assert int(trainer.schedule.cross_start) == trainer.cross_start
    assert trainer.state.memory.intra.shape == (2, 5, trainer.model.feature_dim)  # [P, T, D]
    assert trainer.image_shape == (64, 32) and trainer.resident is None


@pytest.mark.slow
def test_anchors_from_features_run_the_imagenet_network_with_its_moving_statistics(
        tmp_path, monkeypatch):
    """train.anchor_init='features' with ImageNet weights: the first pass runs in inference
    mode with the file's BatchNorm moving statistics; the training state keeps 0/1."""
    import types

    from repo_configs import get_config
    from upm_jax.data import FrameTable
    from upm_jax.porting.weights_file import save_weights
    from upm_jax.training import trainer as trainer_lib

    config = get_config("demo")
    config.data.image_size = 64
    config.train.batch_size = 8
    config.train.anchor_init = "features"
    model = trainer_lib.methods.build_model(config, "local")
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 32, 3))))
    flat = lambda tree: {"backbone/" + "/".join(str(k.key) for k in p): leaf
                         for p, leaf in jax.tree_util.tree_leaves_with_path(tree["backbone"])}
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in flat(shapes["params"]).items()}
    stats = {k: rng.uniform(0.5, 2, v.shape).astype(np.float32)
             for k, v in flat(shapes["batch_stats"]).items()}
    config.model.pretrained = str(tmp_path / "w.npz")
    save_weights(config.model.pretrained, params, backbone="mobilenet_v1", source="test",
                 stats=stats)
    tracklet = np.repeat(np.arange(4), 2).astype(np.int32)
    table = FrameTable(path=np.asarray([f"f{i}.png" for i in range(8)]), tracklet=tracklet,
                       frame=np.tile(np.arange(2), 4).astype(np.int32),
                       tracklet_camera=np.asarray([0, 0, 1, 1], np.int32),
                       tracklet_pid=np.arange(1, 5, dtype=np.int32),
                       tracklet_index=np.asarray([0, 1, 0, 1], np.int32), num_cameras=2)
    mesh = parallel.make_mesh()
    trainer = trainer_lib.make_trainer(config, "local", table, mesh)
    seen = {}

    def first_pass(model, variables, frames, **kwargs):
        seen.update(flat(jax.device_get(variables["batch_stats"])))
        return np.ones((table.num_frames, 2, model.feature_dim), np.float32)

    monkeypatch.setattr(trainer_lib.extract, "extract_frame_features", first_pass)
    trainer_lib._init_anchors_from_features(config, types.SimpleNamespace(train=table), trainer,
                                            mesh)
    assert seen.keys() == stats.keys()
    for k in stats:
        np.testing.assert_array_equal(seen[k], stats[k], err_msg=k)
    start = flat(jax.device_get(trainer.state.batch_stats))
    assert all(not v.any() for k, v in start.items() if k.endswith("mean"))
    assert all((v == 1).all() for k, v in start.items() if k.endswith("var"))


def test_metrics_rows_after_the_resumed_checkpoint_are_dropped(tmp_path):
    """A run killed after logging step 5 but checkpointed at 4 logs 5 again on resume; a
    line cut short by the kill goes too."""
    from upm_jax.training import metrics as metrics_lib

    path = tmp_path / "metrics.jsonl"
    writer = metrics_lib.MetricsWriter(str(path), str(tmp_path / "tb"))
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')
    writer = metrics_lib.MetricsWriter(str(path), str(tmp_path / "tb"), resume_step=4)
    writer.write(5, {"loss": 50.0})
    writer.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": s, "loss": float(s)} for s in range(1, 5)] + [{"step": 5,
                                                                           "loss": 50.0}]
