"""The one factory of a model's trainer (model, optimizer, state, step) from a config.

Used by the run's training stage, `tools/benchmark.py` and the tests, so all of them train
with exactly the config's hyper-parameters.
"""
import jax
import jax.numpy as jnp

from upm_jax import data as data_lib
from upm_jax import experiment
from upm_jax import optim
from upm_jax import train as train_lib
from upm_jax.association import AnchorMemory


def make_optimizer(config, steps_per_epoch):
    """The config's optimizer and learning-rate schedule."""
    return optim.make_optimizer(
        config.train.optimizer, learning_rate=config.train.learning_rate,
        learning_rate_2=config.train.learning_rate_2, steps_per_epoch=steps_per_epoch,
        total_steps=config.train.steps, decay_rate=config.train.lr_decay_rate,
        decay_epochs=config.train.lr_decay_epochs)


class Trainer:
    """Everything one model's training needs: model, optimizer, state and step.

    `table` is the training FrameTable (its size sets the schedule, its tracklets the anchor
    memory); nothing is decoded until `load_resident` (resident configs) or `batches`.
    """

    def __init__(self, config, head, table, mesh, *, pretrained=None):
        self.config = config
        self.mesh = mesh
        self.table = table
        self.model = experiment.build_model(config, head)
        self.num_frames = table.num_frames
        steps_per_epoch, self.cross_start = experiment.schedule_lengths(config, self.num_frames)
        self.tx, self.schedule = make_optimizer(config, steps_per_epoch)
        self.image_shape = experiment.image_shape(config)
        feature = jax.eval_shape(
            lambda: self.model.init_with_output(
                jax.random.PRNGKey(0), jnp.zeros((1, *self.image_shape, 3)), train=False)[0])
        _, num_parts, dim = feature.shape  # [1, P, D]
        memory = AnchorMemory.zeros(table.tracklets_per_camera, num_parts, dim)
        self.state = train_lib.create_train_state(
            self.model, jax.random.PRNGKey(config.seed), image_shape=self.image_shape,
            tx=self.tx, memory=memory, mesh=mesh, pretrained=pretrained or None)
        self.step_fn = train_lib.make_train_step(
            self.model, self.tx, self.schedule, mesh=mesh, margin=config.train.margin,
            eta=config.train.eta, weight_decay=config.train.weight_decay,
            clip=config.train.clip, ema_decay=config.train.ema_decay,
            cross_start_step=self.cross_start, frozen_scopes=self.model.frozen_scopes)
        self.resident = None

    def load_resident(self):
        """Decodes the training frames onto the devices (config.data.resident)."""
        self.resident = data_lib.load_resident(self.table, self.config.data.image_size,
                                               self.mesh)

    def batches(self, start_step):
        """Yields the batch of each step from `start_step` on (a function of seed and step)."""
        config = self.config
        if self.resident is None:
            yield from data_lib.TrainInput(
                self.table, global_batch=config.train.batch_size,
                image_size=config.data.image_size, seed=config.seed,
                mesh=self.mesh).iterate(start_step)
            return
        yield from data_lib.resident_batches(
            self.num_frames, global_batch=config.train.batch_size, seed=config.seed,
            mesh=self.mesh, start_step=start_step)

    def step(self, batch):
        """One training step; returns its device metrics."""
        if self.resident is None:
            self.state, metrics = self.step_fn(self.state, batch)
        else:
            self.state, metrics = self.step_fn(self.state, batch, self.resident)
        return metrics


def make_trainer(config, head, table, mesh, *, load_weights=True):
    """The trainer of one model; `load_weights=False` skips the ImageNet file (a resumed
    run restores every weight from its checkpoint; a benchmark times, never learns)."""
    pretrained = config.model.pretrained if load_weights else None
    return Trainer(config, head, table, mesh, pretrained=pretrained)
