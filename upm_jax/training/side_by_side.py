"""Splits of one benchmark trained side by side (config.train.parallel_splits > 1).

PRID2011's and iLIDS-VID's splits train the same model on training sets of the same
tracklet counts, so a group of them is one program: `step.make_split_train_step` advances
every split of the group in one jitted step over a leading split axis of the state, the
schedule, the batch positions and the split's frame table. The frames are resident once
for the whole group (`data.shared_frames`: the distinct frames of its training sets).
Each split keeps what a run of it alone has: the config's seed (its initial state and the
batch of each step, drawn from its own frames), its schedule (its frame count sets the
decay interval and the warm-up), and its checkpoints, metrics and progress messages in
its own `split_K/<model>/` folder, in the same formats. Extraction, evaluation, resume and
every tool read the workdir as usual; a split may resume alone or in another group.
"""
import collections
import os

import jax
import jax.numpy as jnp
import numpy as np

from upm_jax import checkpoints as checkpoints_lib
from upm_jax import config as config_lib
from upm_jax import data as data_lib
from upm_jax import parallel
from upm_jax.progress import say
from upm_jax.training import metrics as metrics_lib
from upm_jax.training import step as step_lib
from upm_jax.training import trainer as trainer_lib


def check_same_shapes(tables, numbers):
    """Raises ConfigError unless the training `tables` of splits `numbers` have the same
    tracklets per camera (the anchor memories the one step stacks)."""
    shapes = [tuple(t.tracklets_per_camera) for t in tables]
    if len(set(shapes)) > 1:
        listed = ", ".join(f"split {n}: {list(s)}" for n, s in zip(numbers, shapes))
        raise config_lib.ConfigError(
            f"config.train.parallel_splits: splits trained side by side need the same training "
            f"tracklets per camera, and these differ ({listed}); set "
            "config.train.parallel_splits=1 to train them one after another")


class SplitGroup:
    """The splits of a group as one training program: their states, schedules and frame
    tables stacked on a leading split axis over `parallel.split_mesh(mesh, G)`, the shared
    resident frames, and the step.

    `trainers`: one `trainer.Trainer` per split (same config and head; their states and
    schedules are stacked, in this order). With `abstract=True` they are abstract trainers
    (`make_trainer(abstract=True)`) and everything is jax.ShapeDtypeStructs, for an
    ahead-of-time compile.
    """

    def __init__(self, config, trainers, mesh, *, abstract=False):
        self.config = config
        self.size = len(trainers)
        self.mesh = parallel.split_mesh(mesh, self.size)
        self.num_frames = [t.num_frames for t in trainers]
        self.image_shape = trainers[0].image_shape
        self.splits = parallel.split_sharding(self.mesh)
        self.batch_sharding = parallel.split_batch_sharding(self.mesh)
        self.replicated = parallel.replicated(self.mesh)
        model = trainers[0].model
        self.step_fn = step_lib.make_split_train_step(
            model, config.train.optimizer, mesh=self.mesh, margin=config.train.margin,
            eta=config.train.eta, weight_decay=config.train.weight_decay,
            clip=config.train.clip, ema_decay=config.train.ema_decay,
            frozen_scopes=model.frozen_scopes)
        if abstract:
            self.state = self._abstract_stack(trainers[0].state)
            self.schedule = self._abstract_stack(trainers[0].schedule)
        else:
            self.state = self._stack([t.state for t in trainers])
            self.schedule = self._stack([t.schedule for t in trainers])
        self.tables = self.image = None
        self._take = jax.jit(lambda tree, k: jax.tree.map(lambda x: x[k], tree),
                             out_shardings=self.replicated)

    def _stack(self, trees):
        """The per-split trees (replicated) as one tree of [G, ...] leaves on the split axis."""
        trees = [jax.device_put(t, self.replicated) for t in trees]
        return jax.jit(lambda *ts: jax.tree.map(lambda *xs: jnp.stack(xs), *ts),
                       out_shardings=self.splits)(*trees)

    def _abstract_stack(self, tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((self.size, *x.shape), x.dtype,
                                                           sharding=self.splits), tree)

    def load_resident(self, tables, rows=None):
        """Reads the distinct frames of the splits' training `tables` onto the devices once
        (replicated) and places each split's table of rows, tracklets and cameras on the split
        axis, padded to `rows` positions when given (never sampled: positions are drawn below
        each split's own frame count)."""
        union, where = data_lib.shared_frames(tables)
        frames, loading = data_lib.input_from_config(self.config, union)
        image = data_lib.load_resident(union, frames, self.mesh, loading=loading)["image"]
        self.place_resident(image, where, [t.track for t in tables],
                            [t.camera for t in tables], rows=rows)
        return union.num_frames

    def place_resident(self, image, where, track, camera, rows=None):
        """Holds `image` (uint8 [R, H, W, 3], replicated on the group's mesh) as the shared
        frames and, per split k, `where[k]`, `track[k]`, `camera[k]` ([N_k]: each position's
        row of `image`, tracklet and camera) as its table on the split axis."""
        self.image = image
        length = max([rows or 0] + self.num_frames)

        def padded(columns):
            return np.stack([np.pad(np.asarray(c, np.int32), (0, length - len(c)))
                             for c in columns])   # [G, length]

        host = {"rows": padded(where), "track": padded(track), "camera": padded(camera)}
        self.tables = {k: jax.make_array_from_callback(v.shape, self.splits,
                                                       lambda idx, v=v: v[idx])
                       for k, v in host.items()}

    def input_shapes(self, shared_frames, rows=None):
        """(index, tables, image) of one step as jax.ShapeDtypeStructs with their shardings:
        `shared_frames` resident frames, each split's table `rows` positions long (default
        its largest frame count)."""
        batch = self.config.train.batch_size
        length = rows or max(self.num_frames)
        table = jax.ShapeDtypeStruct((self.size, length), jnp.int32, sharding=self.splits)
        return (jax.ShapeDtypeStruct((self.size, batch), jnp.int32, sharding=self.batch_sharding),
                {k: table for k in step_lib.SPLIT_TABLE_KEYS},
                jax.ShapeDtypeStruct((shared_frames, *self.image_shape, 3), jnp.uint8,
                                     sharding=self.replicated))

    def positions(self, step):
        """Each split's batch of `step`: int32 [G, B] positions in its own table, the rows a
        run of that split alone draws (`data.batch_indices` of the seed and the step)."""
        config = self.config
        host = np.stack([data_lib.batch_indices(config.seed, step, n, config.train.batch_size)
                         for n in self.num_frames]).astype(np.int32)
        return jax.make_array_from_callback(host.shape, self.batch_sharding,
                                            lambda idx: host[idx])

    def step(self, step):
        """Advances every split by its step `step`; returns the device metrics ([G] each)."""
        self.state, metrics = self.step_fn(self.state, self.schedule, self.positions(step),
                                           self.tables, self.image)
        return metrics

    def split_state(self, k):
        """Split k's TrainState, replicated: what a run of that split alone checkpoints."""
        return self._take(self.state, k)


def train_side_by_side(config, datasets, model_dirs, mesh, *, resident_rows=None):
    """Trains (or resumes) one model of each split side by side until config.train.steps:
    `model_dirs` (workdir.ModelDirs of one head) and `datasets` (their splits' ReidDatasets)
    in the same order. Finished models are skipped; the others resume from their own
    checkpoints, and splits that stopped at different steps train in one group per step
    (a group of one is the usual `trainer.train_model`). `resident_rows`: pad each split's
    table to this many positions (the run's largest training set: one compiled step)."""
    check_same_shapes([d.train for d in datasets], [m.split for m in model_dirs])
    starts = collections.defaultdict(list)
    for dataset, model_dir in zip(datasets, model_dirs):
        done = trainer_lib.finished_step(model_dir, config)
        if done is not None:
            say(f"{model_dir.label}: already trained ({done} steps in {model_dir.path}), "
                "skipping")
            continue
        starts[model_dir.latest_step() or 0].append((dataset, model_dir))
    for start, members in sorted(starts.items()):
        if len(members) == 1:
            (dataset, model_dir), = members
            trainer_lib.train_model(config, dataset, model_dir, mesh, resident_rows=resident_rows)
        else:
            _train_group(config, members, mesh, start, resident_rows)


def _train_group(config, members, mesh, start, resident_rows):
    datasets = [d for d, _ in members]
    model_dirs = [m for _, m in members]
    label = f"splits {','.join(str(m.split) for m in model_dirs)} {model_dirs[0].name}"
    for model_dir in model_dirs:
        os.makedirs(model_dir.path, exist_ok=True)
    checkpoints = [checkpoints_lib.Checkpoints(m.checkpoints, keep=config.train.keep_checkpoints)
                   for m in model_dirs]
    writers = []
    try:
        if start == 0:
            config_lib.check_weights(config, initial_features=False)
        trainers = [trainer_lib.start_trainer(config, dataset, model_dir, mesh, saved, start)
                    for dataset, model_dir, saved in zip(datasets, model_dirs, checkpoints)]
        group = SplitGroup(config, trainers, mesh)
        del trainers   # their states now live stacked in the group
        frames = group.load_resident([d.train for d in datasets], rows=resident_rows)
        say(f"{label}: {group.size} splits side by side in one step on "
            f"{dict(group.mesh.shape)} devices, {frames} distinct training frames resident")
        # rows logged after the checkpoint resumed from are dropped: they are logged again
        writers = [metrics_lib.MetricsWriter(m.metrics, m.tensorboard, resume_step=start)
                   for m in model_dirs]
        trainer_lib.train_loop(
            config, group.step, lambda: [group.split_state(k) for k in range(group.size)],
            checkpoints, writers, start, label,
            members=lambda m: [{name: v[k] for name, v in m.items()} for k in range(group.size)])
    finally:
        for writer in writers:
            writer.close()
        for saved in checkpoints:
            saved.close()
    for model_dir, saved in zip(model_dirs, checkpoints):
        say(f"{model_dir.label}: trained; checkpoints in {saved.directory}, scalars in "
            f"{model_dir.metrics}")
