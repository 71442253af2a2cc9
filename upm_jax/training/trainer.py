"""Training of one model: skip when finished, resume, loop, checkpoints, divergence guard."""
import collections
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from upm_jax import checkpoint as checkpoint_lib
from upm_jax import experiment
from upm_jax import extract as extract_lib
from upm_jax import metrics_writer
from upm_jax import sharding
from upm_jax import train as train_lib
from upm_jax import trainer as trainer_lib
from upm_jax.association import AnchorMemory
from upm_jax.progress import say

# Losses the divergence guard's running median looks back over.
MEDIAN_WINDOW = 100


class TrainingDiverged(RuntimeError):
    """The loss or the weights ran away; nothing was saved from that step on."""


def finished_step(model_run, config):
    """The model's newest checkpoint step when it has reached config.train.steps, else None
    (cheap: reads only the checkpoint folder's names, the same on every process)."""
    step = checkpoint_lib.latest_saved_step(model_run.directory)
    return step if step is not None and step >= config.train.steps else None


def train_model(config, dataset, model_run, mesh):
    """Trains (or resumes) one model until `config.train.steps`, checkpointing as it goes.
    A finished model is skipped before anything is built or decoded."""
    where = f"split {model_run.split} {model_run.name}"
    done = finished_step(model_run, config)
    if done is not None:
        say(f"{where}: already trained ({done} steps in {model_run.directory}), skipping")
        return
    os.makedirs(model_run.directory, exist_ok=True)
    checkpoints = checkpoint_lib.Checkpoints(model_run.directory,
                                             keep=config.train.keep_checkpoints)
    try:
        start = checkpoints.latest_step()
        if start is None:
            experiment.check_weights(config)
        trainer = trainer_lib.make_trainer(config, model_run.head, dataset.train, mesh,
                                           load_weights=start is None)
        if start is not None:
            trainer.state = checkpoints.restore(checkpoint_lib.abstract_like(trainer.state))
            say(f"{where}: resuming from the checkpoint of step {start} in "
                f"{checkpoints.directory}")
        else:
            start = 0
            say(f"{where}: training {config.train.steps} steps into {model_run.directory}")
            if config.train.anchor_init == "features":
                trainer.state = _init_anchors_from_features(config, dataset, trainer, mesh)
        if config.data.resident:
            trainer.load_resident()
        writer = metrics_writer.MetricsWriter(model_run.directory)
        try:
            _train_loop(config, trainer, checkpoints, writer, start, where)
        finally:
            writer.close()
    finally:
        checkpoints.close()
    say(f"{where}: trained; checkpoints in {checkpoints.directory}, scalars in "
        f"{os.path.join(model_run.directory, 'metrics.jsonl')}")


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


def _train_loop(config, trainer, checkpoints, writer, start, where):
    total = config.train.steps
    guard = DivergenceGuard(config.train.divergence_factor, checkpoints)
    pending = []   # (step, device metrics) not yet checked on the host
    bar = tqdm.tqdm(total=total, initial=start, desc=where, unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), start
    for step, batch in zip(range(start, total), trainer.batches(start)):
        pending.append((step, trainer.step(batch)))
        done = step + 1
        save = done % config.train.checkpoint_every == 0 or done == total
        if done % config.train.log_every == 0 or save:
            host = jax.device_get(pending)
            pending = []
            guard.check_losses(host)
            now = time.perf_counter()
            rate = (done - last_step) / max(now - last_time, 1e-9)
            last_time, last_step = now, done
            scalars = dict(host[-1][1], steps_per_sec=rate,
                           frames_per_sec=rate * config.train.batch_size)
            writer.write(done, scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", steps_s=f"{rate:.2f}",
                            frames_s=f"{rate * config.train.batch_size:.0f}")
            bar.update(done - bar.n)
        if save:
            guard.check_params(trainer.state, done)
            checkpoints.save(done, trainer.state)
    bar.close()


def _init_anchors_from_features(config, dataset, trainer, mesh):
    """Anchors initialised from a first pass of the initial network over the train frames."""
    variables = {"params": train_lib.merge_params(trainer.state.params,
                                                  trainer.state.frozen_params),
                 "batch_stats": trainer.state.batch_stats}
    feats = extract_lib.extract_frame_features(
        trainer.model, variables, dataset.train, mesh=mesh, batch_size=experiment.extraction_batch(config, mesh),
        image_size=config.data.image_size)
    memory = AnchorMemory.from_features(
        trainer.state.memory, feats, dataset.train.track, dataset.train.camera)
    return trainer.state.replace(memory=jax.device_put(memory, sharding.replicated(mesh)))
