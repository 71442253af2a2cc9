"""Optimisers, schedules, L2 weight decay and EMA with the originals' TF1 semantics.

TF1 ``RMSPropOptimizer(lr, decay=0.9, momentum=0.9, epsilon=1.0)`` updates

    ms  = decay * ms + (1 - decay) * g^2             (ms starts at 1, not 0)
    mom = momentum * mom + lr_t * g / sqrt(ms + eps)  (eps inside the square root)
    var = var - mom

with the learning rate inside the momentum accumulator. That is ``optax.rmsprop``'s chain
(scale_by_rms -> rate -> trace) with ``initial_scale=1``, ``eps_in_sqrt=True`` and
``momentum``; the rate is read at the count of updates already made, like TF's
``global_step`` before the increment.

TF1 ``MomentumOptimizer(use_nesterov=True)``: accum = m * accum + g;
var -= lr_t * (g + m * accum), which is ``optax.sgd(..., nesterov=True)``'s chain.

The rates are not baked into the optimizer: they come from a ``Schedule`` of traced values
given to every update, so one compiled training step serves runs of any length and size.
"""
from __future__ import annotations

from typing import Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ("rmsprop", "sgd")
RMSPROP_DECAY = 0.9
RMSPROP_MOMENTUM = 0.9
RMSPROP_EPSILON = 1.0
SGD_MOMENTUM = 0.9
# rmsprop has no second rate: its boundary is a step no run reaches.
_NO_BOUNDARY = np.iinfo(np.int32).max


@flax.struct.dataclass
class Schedule:
    """One training run's schedule as values the jitted step traces (scalar arrays), not
    constants compiled into it: every split of a benchmark, whatever its frame count, runs
    the one compiled step, and a leading split axis can be vmapped.

    The rate at step t is ``(learning_rate if t <= boundary else learning_rate_2) *
    decay_rate ** floor(t / decay_steps)``: rmsprop's staircase decay has no boundary, sgd's
    two pieces no decay (decay_rate 1). Cross-camera association is on from ``cross_start``.
    """

    learning_rate: jax.Array    # float32 []
    learning_rate_2: jax.Array  # float32 []: the rate after `boundary`
    boundary: jax.Array         # int32 []: the last step at learning_rate
    decay_rate: jax.Array       # float32 []: staircase factor ...
    decay_steps: jax.Array      # int32 []: ... every this many steps
    cross_start: jax.Array      # int32 []: the first step of cross-camera association


def learning_rate_at(schedule: Schedule, step) -> jax.Array:
    """The rate of update `step` (0-based count of updates already made): float32 []."""
    step = jnp.asarray(step, jnp.int32)
    rate = jnp.where(step <= schedule.boundary, schedule.learning_rate, schedule.learning_rate_2)
    return rate * jnp.power(schedule.decay_rate, jnp.floor(step / schedule.decay_steps))


def make_schedule(name: str, *, learning_rate: float, steps_per_epoch: float, total_steps: int,
                  decay_rate: float = 0.94, decay_epochs: float = 2.0,
                  learning_rate_2: float = 0.0, cross_start: int = 0) -> Schedule:
    """The originals' schedule of optimizer `name`, as host scalars (see ``Schedule``).

    'rmsprop': learning_rate decayed x decay_rate every int(steps_per_epoch * decay_epochs)
    steps (staircase, as tf.train.exponential_decay). 'sgd': learning_rate up to and
    including step total_steps // 2, then learning_rate_2 (tf.train.piecewise_constant).
    steps_per_epoch is num_frames / batch as a float.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name {name!r} is not one of {OPTIMIZERS}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if name == "rmsprop":
        decay_steps = int(steps_per_epoch * decay_epochs)
        if decay_steps < 1:
            raise ValueError(f"the learning-rate decay interval int(steps_per_epoch * decay_epochs) = "
                             f"int({steps_per_epoch!r} * {decay_epochs!r}) must be >= 1 step")
        second, boundary = learning_rate, _NO_BOUNDARY
    else:
        if not learning_rate_2 > 0:
            raise ValueError(f"sgd needs learning_rate_2 > 0 (the rate after step "
                             f"{int(total_steps) // 2}), got {learning_rate_2!r}")
        second, boundary, decay_rate, decay_steps = learning_rate_2, int(total_steps) // 2, 1.0, 1
    return Schedule(learning_rate=np.float32(learning_rate), learning_rate_2=np.float32(second),
                    boundary=np.int32(boundary), decay_rate=np.float32(decay_rate),
                    decay_steps=np.int32(decay_steps), cross_start=np.int32(cross_start))


def scale_by_scheduled_rate() -> optax.GradientTransformationExtraArgs:
    """-learning_rate_at(schedule, count) * updates, with the ``Schedule`` given to each update
    as the extra argument ``schedule=`` (optax.scale_by_learning_rate with a traced schedule;
    the same state, so checkpoints keep their layout)."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, schedule: Schedule, **extra_args):
        del params, extra_args
        step_size = -learning_rate_at(schedule, state.count)
        updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(name: str) -> optax.GradientTransformationExtraArgs:
    """The originals' optimizer `name`; its rate comes from the ``Schedule`` passed to
    ``tx.update(grads, opt_state, params, schedule=...)``.

    'rmsprop': TF1 RMSProp (module docstring): optax.rmsprop's chain (scale_by_rms with
    initial_scale 1 and eps in the square root -> rate -> trace with momentum 0.9).
    'sgd': Nesterov momentum 0.9 (optax.sgd's chain). Clipping and weight decay live in the
    train step.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name {name!r} is not one of {OPTIMIZERS}")
    if name == "rmsprop":
        return optax.chain(
            optax.scale_by_rms(decay=RMSPROP_DECAY, eps=RMSPROP_EPSILON, initial_scale=1.0,
                               eps_in_sqrt=True, bias_correction=False),
            scale_by_scheduled_rate(),
            optax.trace(decay=RMSPROP_MOMENTUM, nesterov=False))
    return optax.chain(optax.trace(decay=SGD_MOMENTUM, nesterov=True), scale_by_scheduled_rate())


def _path_names(path) -> Tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_decayed_kernel(path, leaf) -> bool:
    """True for conv weights that slim regularises: 4-D leaves named ``kernel``.

    Depthwise kernels (named ``depthwise_kernel``, under ``*_depthwise`` scopes) are
    excluded, as slim's MobileNet arg scope does not regularise them; biases and BN
    scale/offset are not decayed either.
    """
    names = _path_names(path)
    return (bool(names) and names[-1] == "kernel" and jnp.ndim(leaf) == 4
            and not any("depthwise" in n.lower() for n in names))


def weight_decay_mask(params):
    """Pytree of bools (same structure as params): which leaves get L2 weight decay."""
    return jax.tree_util.tree_map_with_path(is_decayed_kernel, params)


def l2_weight_decay(params, weight_decay: float) -> jax.Array:
    """weight_decay * sum(w^2) / 2 over the decayed conv kernels (float32 scalar)."""
    leaves = [jnp.sum(jnp.square(leaf.astype(jnp.float32)))
              for path, leaf in jax.tree_util.tree_leaves_with_path(params)
              if is_decayed_kernel(path, leaf)]
    return weight_decay * 0.5 * sum(leaves, jnp.float32(0.0))


def ema_decay_at(step, max_decay: float) -> jax.Array:
    """TF ExponentialMovingAverage with num_updates: min(max_decay, (1 + t) / (10 + t))."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(max_decay), (1.0 + t) / (10.0 + t))


def ema_update(ema, params, step, max_decay: float):
    """shadow -= (1 - decay_t) * (shadow - value), decay_t from ``ema_decay_at(step)``."""
    decay = ema_decay_at(step, max_decay)
    return jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p), ema, params)

