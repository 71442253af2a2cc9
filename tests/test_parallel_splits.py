"""Splits trained side by side (config.train.parallel_splits): each split's state equals its
own one-split run to that run's rounding noise, at the step and through the whole run."""
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train import SIZES, TinyModel, _assert_within_noise, _gap, _host
from upm_jax import parallel
from upm_jax.data import pipeline
from upm_jax.training import optim
from upm_jax.training import state as state_lib
from upm_jax.training import step as step_lib
from upm_jax.training.association import AnchorMemory

IMAGE = (16, 8)
BATCH = 16
STEPS = 4
POOL = 60    # distinct frames the splits draw their training sets from
SEED = 3


def _split_sets(num_splits):
    """Per split: (rows into the shared pool, track, camera), of different sizes."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(num_splits):
        n = 30 + 3 * k
        rows = np.sort(rng.choice(POOL, n, replace=False)).astype(np.int32)
        camera = rng.integers(0, len(SIZES), n).astype(np.int32)
        track = np.array([rng.integers(0, SIZES[c]) for c in camera], np.int32)
        out.append((rows, track, camera))
    return out


def _schedule(num_frames):
    """Each split's own schedule: its frame count sets the decay interval and the warm-up."""
    return optim.make_schedule("rmsprop", learning_rate=0.045, steps_per_epoch=num_frames / 20,
                               total_steps=STEPS, cross_start=num_frames // 30)


_INITIAL = {}


def _initial_state(model, mesh):
    """The initial state (the same for every split: one seed), created once per mesh."""
    if mesh not in _INITIAL:
        _INITIAL[mesh] = _host(_create_state(model, mesh))
    return parallel.replicate(_INITIAL[mesh], mesh)


def _create_state(model, mesh):
    dims = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE, 3))))
    feat = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, *IMAGE, 3))), dims)
    memory = AnchorMemory.zeros(SIZES, feat.shape[1], feat.shape[2])
    return state_lib.create_train_state(model, jax.random.PRNGKey(1), image_shape=IMAGE,
                                        tx=optim.make_optimizer("rmsprop"), memory=memory,
                                        mesh=mesh)


def _positions(num_frames, step, reverse=False):
    index = pipeline.batch_indices(SEED, step, num_frames, BATCH).astype(np.int32)
    return index[::-1].copy() if reverse else index


def _one_split_run(model, pool, split, mesh, reverse=False):
    """The split trained alone (resident form, its own frames), as a run of one split does."""
    rows, track, camera = split
    step_fn = step_lib.make_train_step(model, "rmsprop", mesh=mesh,
                                       frozen_scopes=model.frozen_scopes)
    pad = POOL - len(rows)   # every split's frames padded alike, as a run pads them: one compile
    dataset = parallel.replicate({"image": np.pad(pool[rows], [(0, pad)] + [(0, 0)] * 3),
                                  "track": np.pad(track, (0, pad)),
                                  "camera": np.pad(camera, (0, pad))}, mesh)
    schedule = parallel.replicate(_schedule(len(rows)), mesh)
    state = _initial_state(model, mesh)
    for step in range(STEPS):
        index = jax.device_put(_positions(len(rows), step, reverse),
                               parallel.batch_sharding(mesh))
        state, _ = step_fn(state, schedule, {"index": index}, dataset)
    return _host(state)


@pytest.fixture(scope="module")
def pool():
    return np.random.default_rng(1).integers(0, 256, (POOL, *IMAGE, 3), dtype=np.uint8)


class _Noise:
    """The larger gap, group by group, of two rounding-only variants of a run."""

    def __init__(self, want, *variants):
        self.want, self.variants = want, variants

    def __getattr__(self, group):
        return max((getattr(v, group) for v in self.variants),
                   key=lambda tree: _gap(tree, getattr(self.want, group)))


@pytest.fixture(scope="module")
def one_split_runs(pool):
    """Each split alone on 8 devices, and its own rounding noise: the larger gap of the same
    run with its batches reversed and of the same run on one device (the yardstick of
    test_train's 8-vs-1-device test)."""
    model, mesh, one = TinyModel(), parallel.make_mesh(), parallel.make_mesh(jax.devices()[:1])
    runs = []
    for split in _split_sets(8):
        want = _one_split_run(model, pool, split, mesh)
        runs.append((want, _Noise(want, _one_split_run(model, pool, split, mesh, True),
                                  _one_split_run(model, pool, split, one))))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("num_splits", [2, 8])
def test_splits_side_by_side_equal_their_one_split_runs(pool, one_split_runs, num_splits):
    """2 splits on 8 devices: each split's batch on 4 devices; 8 splits: one per device."""
    model = TinyModel()
    mesh = parallel.split_mesh(parallel.make_mesh(), num_splits)
    assert mesh.shape == {"split": 2, "data": 4} if num_splits == 2 else {"split": 8, "data": 1}
    sets = _split_sets(num_splits)
    longest = max(len(rows) for rows, _, _ in sets)

    def padded(k):
        return np.stack([np.pad(s[k], (0, longest - len(s[k]))) for s in sets])  # [G, N]

    splits = parallel.split_sharding(mesh)
    tables = jax.device_put({"rows": padded(0), "track": padded(1), "camera": padded(2)}, splits)
    one = _initial_state(model, mesh)
    state = jax.device_put(jax.tree.map(lambda x: np.stack([x] * num_splits), _host(one)),
                           splits)
    schedule = jax.device_put(jax.tree.map(lambda *v: np.stack(v),
                                           *[_schedule(len(s[0])) for s in sets]), splits)
    image = parallel.replicate(pool, mesh)
    step_fn = step_lib.make_split_train_step(model, "rmsprop", mesh=mesh,
                                             frozen_scopes=model.frozen_scopes)
    for step in range(STEPS):
        index = np.stack([_positions(len(s[0]), step) for s in sets])
        index = jax.device_put(index, parallel.split_batch_sharding(mesh))
        state, metrics = step_fn(state, schedule, index, tables, image)
    assert metrics["loss"].shape == (num_splits,)
    assert state.params["backbone"]["Conv2d_0"]["kernel"].sharding.spec[0] == "split"
    state = _host(state)
    for k in range(num_splits):
        got = jax.tree.map(lambda x: x[k], state)
        want, noise = one_split_runs[k]
        assert int(got.step) == STEPS
        _assert_within_noise(got, want, noise)
    # the splits really differ (their own frames and schedules), so the check can fail
    first, second = (jax.tree.map(lambda x: x[k], state.params) for k in (0, 1))
    assert not np.allclose(first["backbone"]["Conv2d_0"]["kernel"],
                           second["backbone"]["Conv2d_0"]["kernel"])


def _restore(model_dir, step=None):
    """(the arrays of the checkpoint of `step` (default the newest) as numpy, its step)."""
    import os   # noqa: PLC0415

    import orbax.checkpoint as ocp   # noqa: PLC0415
    if step is None:
        step = max(int(n) for n in os.listdir(model_dir.checkpoints) if n.isdigit())
    path = os.path.join(model_dir.checkpoints, str(step), "default")
    return jax.tree.map(np.asarray, ocp.PyTreeCheckpointer().restore(path)), step


def _files(workdir):
    """The workdir's files (a checkpoint as its step folder: orbax names its own files)."""
    import os  # noqa: PLC0415
    names = set()
    for folder, _, files in os.walk(workdir):
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), workdir).split(os.sep)
            if "checkpoints" in path:
                path = path[:path.index("checkpoints") + 2]
            if "tensorboard" not in path and name != ".lock":
                names.add("/".join(path))
    return sorted(names)


@pytest.mark.slow
def test_a_run_side_by_side_equals_one_after_another(tmp_path, monkeypatch):
    """Two splits of different frame counts trained side by side on 8 devices (stopped by
    SIGTERM after the first step, which saves every split's checkpoint and names them, then
    resumed by a second invocation) leave the workdir that one after
    another leaves: the same files, each split's state within its run's own rounding noise
    (the same run on one device, as test_train's 8-vs-1 yardstick), the same losses at
    every step and the same results.

    The states are compared after the first step: this small from-scratch model's second
    update (gradient norm ~130, clipped) amplifies rounding chaotically (its own one-device
    run then differs by 3% of the largest weight); the second step's loss, computed by the
    resumed group from the first step's state, is compared instead. The step itself is held
    to the noise yardstick over 4 steps in test_splits_side_by_side_equal_their_one_split_runs.
    """
    from test_interrupts import _signal_at_call
    from test_run import tiny_config
    from upm_jax import interrupts
    from upm_jax import run
    from upm_jax.data import synthetic
    from upm_jax.training import side_by_side

    root = str(tmp_path / "prid")
    synthetic.generate("prid2011", root, ids=8, seed=3, num_splits=2)

    def config(**overrides):
        fields = dict(data__root=root, data__split_file=synthetic.split_file(root),
                      data__synthetic_ids=0, data__splits="all", train__steps=2,
                      train__checkpoint_every=1)
        return tiny_config(**dict(fields, **overrides))

    alone, together, one_device = (str(tmp_path / n) for n in ("alone", "together", "one"))
    want = run.run(config(), alone)
    with monkeypatch.context() as m:
        _signal_at_call(m, side_by_side.SplitGroup, "step", 1, signal.SIGTERM)
        with interrupts.installed(), pytest.raises(interrupts.Interrupted) as stopped:
            run.run(config(train__parallel_splits=2), together, mode="train")
    assert stopped.value.status == 143 and str(stopped.value) == (
        f"stopped by SIGTERM: splits 1,2 lam: saved the checkpoints of step 1 in "
        f"{together}/split_1/lam/checkpoints, {together}/split_2/lam/checkpoints; run the same "
        "command again to resume from them")
    got = run.run(config(train__parallel_splits=2), together, overwrite=True)
    make_mesh = run.parallel.make_mesh
    monkeypatch.setattr(run.parallel, "make_mesh", lambda: make_mesh(jax.devices()[:1]))
    run.run(config(), one_device, mode="train")
    _check_equal_workdirs(alone, together, one_device, got, want)


def _check_equal_workdirs(alone, together, one_device, got, want):
    import json  # noqa: PLC0415
    from types import SimpleNamespace  # noqa: PLC0415

    from upm_jax.workdir import Workdir

    assert _files(together) == _files(alone)
    for number in (1, 2):
        one, two, noise = (Workdir(w).split(number).models("upm_local")[0]
                           for w in (alone, together, one_device))
        assert _restore(one)[1] == _restore(two)[1] == 2
        (want_state, _), (got_state, _) = _restore(one, 1), _restore(two, 1)
        _assert_within_noise(SimpleNamespace(**got_state), SimpleNamespace(**want_state),
                             SimpleNamespace(**_restore(noise, 1)[0]))
        for line_alone, line_together in zip(open(one.metrics), open(two.metrics)):
            a, b = json.loads(line_alone), json.loads(line_together)
            assert a["step"] == b["step"]
            np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
            np.testing.assert_allclose(b["lr"], a["lr"], rtol=1e-7)
    results = [json.load(open(Workdir(w).results)) for w in (together, alone)]
    assert results[0].keys() == results[1].keys() == got.keys() == want.keys()
    numbers = [[], []]
    for k, tree in enumerate(results):
        jax.tree.map(lambda v, k=k: numbers[k].append(v) if isinstance(v, (int, float)) else None,
                     tree)
    np.testing.assert_allclose(numbers[0], numbers[1], rtol=1e-5, atol=1e-6)


def test_parallel_splits_is_checked():
    from test_run import tiny_config
    from upm_jax import config as config_lib

    for value in (0, -2):
        with pytest.raises(config_lib.ConfigError, match="expected the number of splits"):
            config_lib.check_config(tiny_config(train__parallel_splits=value), num_devices=8)
    with pytest.raises(config_lib.ConfigError, match="config.data.resident=True"):
        config_lib.check_config(tiny_config(train__parallel_splits=2, data__resident=False),
                                num_devices=8)
