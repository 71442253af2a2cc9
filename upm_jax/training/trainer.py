"""Where a model's trainer is built (model, optimizer, state, step) from a config, and where
it is trained: resume, the loop, checkpoints, the divergence guard.

`make_trainer` is the one factory: the run's training stage, `upm_jax.benchmark` and the
tests all train with exactly the config's hyper-parameters through it.
"""
import collections
import functools
import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from upm_jax import checkpoints as checkpoints_lib
from upm_jax import config as config_lib
from upm_jax import data as data_lib
from upm_jax import extract
from upm_jax import interrupts
from upm_jax import methods
from upm_jax import models
from upm_jax import parallel
from upm_jax import progress
from upm_jax.progress import say
from upm_jax.training import metrics as metrics_lib
from upm_jax.training import optim
from upm_jax.training import state as state_lib
from upm_jax.training import step as step_lib
from upm_jax.training.association import AnchorMemory

# Losses the divergence guard's running median looks back over.
MEDIAN_WINDOW = 100


class TrainingDiverged(RuntimeError):
    """The loss or the weights ran away; nothing was saved from that step on."""


def schedule_lengths(config, num_frames):
    """Steps per epoch and the cross-association start step, as the originals."""
    per_epoch = num_frames / config.train.batch_size
    cross_start = math.floor(num_frames / config.train.batch_size) * config.train.warm_up_epochs
    return per_epoch, int(cross_start)


def train_schedule(config, num_frames):
    """The run's ``optim.Schedule`` (host scalars): the config's rates, and the decay
    interval, boundary and cross-association start that follow from its training set size."""
    steps_per_epoch, cross_start = schedule_lengths(config, num_frames)
    return optim.make_schedule(
        config.train.optimizer, learning_rate=config.train.learning_rate,
        learning_rate_2=config.train.learning_rate_2, steps_per_epoch=steps_per_epoch,
        total_steps=config.train.steps, decay_rate=config.train.lr_decay_rate,
        decay_epochs=config.train.lr_decay_epochs, cross_start=cross_start)


class TrainSetShape(NamedTuple):
    """What a trainer's shapes and schedule take from a training table (a FrameTable has
    both): enough to build a trainer for an ahead-of-time compile without the frames."""

    num_frames: int
    tracklets_per_camera: tuple


class Trainer:
    """Everything one model's training needs: model, optimizer, schedule, state and step.

    `table` is the training FrameTable (its size sets the schedule, its tracklets the anchor
    memory); nothing is decoded until `load_resident` (resident configs) or `batches`.
    With `abstract=True` (any `table` with num_frames and tracklets_per_camera, such as a
    TrainSetShape) nothing is computed or allocated: the state and schedule are
    jax.ShapeDtypeStructs with their shardings on `mesh`, for `step_fn.lower`.
    """

    def __init__(self, config, head, table, mesh, *, pretrained=None, abstract=False):
        self.config = config
        self.mesh = mesh
        self.table = table
        self.model = methods.build_model(config, head)
        self.num_frames = table.num_frames
        _, self.cross_start = schedule_lengths(config, self.num_frames)
        self.tx = optim.make_optimizer(config.train.optimizer)
        replicated = parallel.replicated(mesh)
        schedule = train_schedule(config, self.num_frames)
        self.image_shape = methods.image_shape(config)
        feature = jax.eval_shape(
            lambda: self.model.init_with_output(
                jax.random.PRNGKey(0), jnp.zeros((1, *self.image_shape, 3)), train=False)[0])
        _, num_parts, dim = feature.shape  # [1, P, D]
        zeros = functools.partial(AnchorMemory.zeros, table.tracklets_per_camera, num_parts, dim)
        if abstract:
            self.schedule = jax.tree.map(
                lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated), schedule)
            self.state = state_lib.abstract_train_state(
                self.model, image_shape=self.image_shape, tx=self.tx,
                memory=jax.eval_shape(zeros), mesh=mesh)
        else:
            self.schedule = jax.device_put(schedule, replicated)
            self.state = state_lib.create_train_state(
                self.model, jax.random.PRNGKey(config.seed), image_shape=self.image_shape,
                tx=self.tx, memory=zeros(), mesh=mesh, pretrained=pretrained or None)
        self.step_fn = step_lib.make_train_step(
            self.model, config.train.optimizer, mesh=mesh, margin=config.train.margin,
            eta=config.train.eta, weight_decay=config.train.weight_decay,
            clip=config.train.clip, ema_decay=config.train.ema_decay,
            frozen_scopes=self.model.frozen_scopes)
        self.resident = None

    def load_resident(self, rows=None):
        """Reads the training frames onto the devices (config.data.resident), padded to
        `rows` frames when given (see `data.load_resident`)."""
        frames, loading = data_lib.input_from_config(self.config, self.table)
        self.resident = data_lib.load_resident(self.table, frames, self.mesh, rows=rows,
                                               loading=loading)

    def input_shapes(self, resident_rows=None):
        """(batch, dataset or None) of one step as jax.ShapeDtypeStructs with their shardings:
        the resident form ({"index"} and the [N, H, W, 3] frames, N = `resident_rows` or the
        table's frames) for resident configs, else the host form."""
        batch_size = self.config.train.batch_size
        height, width = self.image_shape
        data = parallel.batch_sharding(self.mesh)
        replicated = parallel.replicated(self.mesh)
        if not self.config.data.resident:
            return {"image": jax.ShapeDtypeStruct((batch_size, height, width, 3), jnp.uint8,
                                                  sharding=data),
                    "track": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=data),
                    "camera": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=data)}, None
        rows = resident_rows or self.num_frames
        return ({"index": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=data)},
                {"image": jax.ShapeDtypeStruct((rows, height, width, 3), jnp.uint8,
                                               sharding=replicated),
                 "track": jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=replicated),
                 "camera": jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=replicated)})

    def batches(self, start_step):
        """Yields the batch of each step from `start_step` to config.train.steps (a function
        of seed and step: the checkpoint's step is the whole state of the input)."""
        config = self.config
        if self.resident is None:
            frames, loading = data_lib.input_from_config(config, self.table)
            yield from data_lib.train_batches(
                self.table, frames, global_batch=config.train.batch_size, seed=config.seed,
                mesh=self.mesh, start_step=start_step, end_step=config.train.steps,
                loading=loading)
            return
        yield from data_lib.resident_batches(
            self.num_frames, global_batch=config.train.batch_size, seed=config.seed,
            mesh=self.mesh, start_step=start_step)

    def step(self, batch):
        """One training step; returns its device metrics."""
        if self.resident is None:
            self.state, metrics = self.step_fn(self.state, self.schedule, batch)
        else:
            self.state, metrics = self.step_fn(self.state, self.schedule, batch, self.resident)
        return metrics


def make_trainer(config, head, table, mesh, *, load_weights=True, abstract=False):
    """The trainer of one model; `load_weights=False` skips the ImageNet file (a resumed
    run restores every weight from its checkpoint; a benchmark times, never learns);
    `abstract=True`: shapes and shardings only, for compiling ahead of time (`Trainer`)."""
    pretrained = config.model.pretrained if load_weights and not abstract else None
    return Trainer(config, head, table, mesh, pretrained=pretrained, abstract=abstract)


def finished_step(model_dir, config):
    """The model's newest checkpoint step when it has reached config.train.steps, else None
    (cheap: reads only the checkpoint folder's names, the same on every process)."""
    step = model_dir.latest_step()
    return step if step is not None and step >= config.train.steps else None


def train_model(config, dataset, model_dir, mesh, *, resident_rows=None):
    """Trains (or resumes) the model of `model_dir` (a workdir.ModelDir) until
    `config.train.steps`, checkpointing as it goes. A finished model is skipped before
    anything is built or decoded. `resident_rows`: pad the resident frames to this many
    rows (the run's largest training set, so that its splits share one compiled step)."""
    where = model_dir.label
    done = finished_step(model_dir, config)
    if done is not None:
        say(f"{where}: already trained ({done} steps in {model_dir.path}), skipping")
        return
    os.makedirs(model_dir.path, exist_ok=True)
    checkpoints = checkpoints_lib.Checkpoints(model_dir.checkpoints,
                                              keep=config.train.keep_checkpoints)
    try:
        start = checkpoints.latest_step() or 0
        if not start:
            config_lib.check_weights(config, initial_features=False)
        trainer = start_trainer(config, dataset, model_dir, mesh, checkpoints, start)
        if config.data.resident:
            trainer.load_resident(max(resident_rows or 0, trainer.num_frames))
        # rows logged after the checkpoint resumed from are dropped: they are logged again
        writer = metrics_lib.MetricsWriter(model_dir.metrics, model_dir.tensorboard,
                                           resume_step=start)
        try:
            batches = trainer.batches(start)
            train_loop(config, lambda _: trainer.step(next(batches)), lambda: [trainer.state],
                       [checkpoints], [writer], start, where, members=lambda m: [m])
        finally:
            writer.close()
    finally:
        checkpoints.close()
    say(f"{where}: trained; checkpoints in {checkpoints.directory}, scalars in "
        f"{model_dir.metrics}")


def start_trainer(config, dataset, model_dir, mesh, checkpoints, start):
    """The trainer of `model_dir`'s model at step `start`: restored from `checkpoints`
    (start > 0), else initial (ImageNet weights; anchors as config.train.anchor_init)."""
    trainer = make_trainer(config, model_dir.head, dataset.train, mesh, load_weights=not start)
    if start:
        trainer.state = checkpoints.restore(checkpoints_lib.abstract_like(trainer.state))
        say(f"{model_dir.label}: resuming from the checkpoint of step {start} in "
            f"{checkpoints.directory}")
    else:
        say(f"{model_dir.label}: training {config.train.steps} steps into {model_dir.path}")
        if config.train.anchor_init == "features":
            trainer.state = _init_anchors_from_features(config, dataset, trainer, mesh)
    return trainer


class DivergenceGuard:
    """Stops a run whose loss is not finite or exceeds `factor` times the running median
    of the previous MEDIAN_WINDOW losses (factor 0: finite check only), or whose weights
    are not finite; checked before every checkpoint, so none is written from that step on."""

    def __init__(self, factor, checkpoints):
        self.factor = factor
        self.checkpoints = checkpoints
        self.losses = collections.deque(maxlen=MEDIAN_WINDOW)

    def check_losses(self, host_metrics):
        for step, metrics in host_metrics:
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                self._stop(f"the loss is {loss} at step {step + 1}")
            if self.factor and self.losses:
                median = float(np.median(self.losses))
                if median > 0 and loss > self.factor * median:
                    self._stop(f"the loss is {loss:.4g} at step {step + 1}, more than "
                               f"{self.factor:g} times its running median {median:.4g} "
                               "(config.train.divergence_factor)")
            self.losses.append(loss)

    def check_params(self, state, step):
        if not bool(_all_finite(state.params)):
            self._stop(f"the weights are not finite after step {step}")

    def _stop(self, what):
        latest = self.checkpoints.latest_step()
        kept = (f"the last checkpoint (step {latest}) is intact" if latest is not None
                else "no checkpoint was written before it")
        raise TrainingDiverged(f"{what}; stopping, {kept}. Lower config.train.learning_rate "
                               "or check the data")


@jax.jit
def _all_finite(tree):
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_loop(config, advance, states, checkpoints, writers, start, label, *, members):
    """Steps from `start` to config.train.steps for G models trained together: one model, or
    the splits of a group side by side (`side_by_side`). A stop signal saves the step in
    flight and raises interrupts.Interrupted (see upm_jax.interrupts).

    `advance(step)` runs one step and returns its device metrics; `members(metrics)` gives
    each model's metrics (G dicts) from the host copy; `states()` the G TrainStates;
    model k's losses are checked by its own divergence guard, its scalars written by
    `writers[k]` and its state saved by `checkpoints[k]`.
    """
    total = config.train.steps
    guards = [DivergenceGuard(config.train.divergence_factor, c) for c in checkpoints]
    pending = []   # (step, device metrics) not yet checked on the host
    bar = tqdm.tqdm(total=total, initial=start, desc=label, unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), start
    done, together = start, True
    with interrupts.deferred() as stop:
        for step in range(start, total):
            if step == start:   # the call that compiles the step; the rate counts from after it
                with progress.compiling(bar, "the training step"):
                    pending.append((step, advance(step)))
                last_time = time.perf_counter()
            else:
                pending.append((step, advance(step)))
            done = step + 1
            stopping = stop.requested(done)
            save = done % config.train.checkpoint_every == 0 or done == total or stopping
            if done % config.train.log_every == 0 or save:
                host = [(s, members(m)) for s, m in jax.device_get(pending)]
                pending = []
                now = time.perf_counter()
                rate = (done - last_step) / max(now - last_time, 1e-9)   # steps/s of each model
                last_time, last_step = now, done
                for k, (guard, writer) in enumerate(zip(guards, writers)):
                    guard.check_losses([(s, m[k]) for s, m in host])
                    writer.write(done, dict(host[-1][1][k], steps_per_sec=rate,
                                            frames_per_sec=rate * config.train.batch_size))
                loss = np.mean([m["loss"] for m in host[-1][1]])
                frames = rate * config.train.batch_size * len(writers)
                bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{rate:.2f}", frames_s=f"{frames:.0f}")
                bar.update(done - bar.n)
            if save:
                saving = states()
                for guard, state in zip(guards, saving):   # every model checked before any save
                    guard.check_params(state, done)
                for saved, state in zip(checkpoints, saving):
                    saved.save(done, state)   # asynchronous: waited for below
                del saving
            if stopping:
                break
        else:   # a signal during the last steps, too late for the other processes
            stopping, together = stop.requested_locally(), False
        bar.close()
        if stopping:
            for saved in checkpoints:   # the process ends only once they are committed
                saved.wait()
            what, them = ("checkpoint", "it") if len(checkpoints) == 1 else ("checkpoints", "them")
            raise interrupts.Interrupted(
                stop.signum, f"{label}: saved the {what} of step {done} in "
                f"{', '.join(str(c.directory) for c in checkpoints)}; run the same command "
                f"again to resume from {them}", together=together)


def _init_anchors_from_features(config, dataset, trainer, mesh):
    """Anchors initialised from a first pass of the initial network over the train frames
    (in inference mode: with ImageNet weights, their BatchNorm moving statistics; the
    training state keeps its own, 0/1)."""
    variables = {"params": state_lib.merge_params(trainer.state.params,
                                                  trainer.state.frozen_params),
                 "batch_stats": trainer.state.batch_stats}
    if config.model.pretrained:
        variables = parallel.replicate(models.load_pretrained(
            variables, config.model.pretrained, backbone=trainer.model.backbone_name,
            moving_stats=True), mesh)
    frames, loading = data_lib.input_from_config(config, dataset.train)
    feats = extract.extract_frame_features(
        trainer.model, variables, frames, mesh=mesh,
        batch_size=extract.extraction_batch(config, mesh), loading=loading)
    memory = AnchorMemory.from_features(
        trainer.state.memory, feats, dataset.train.track, dataset.train.camera)
    return trainer.state.replace(memory=jax.device_put(memory, parallel.replicated(mesh)))
