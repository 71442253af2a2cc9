"""Optimisers, schedules, L2 weight decay and EMA with the originals' TF1 semantics.

TF1 ``RMSPropOptimizer(lr, decay=0.9, momentum=0.9, epsilon=1.0)`` updates

    ms  = decay * ms + (1 - decay) * g^2             (ms starts at 1, not 0)
    mom = momentum * mom + lr_t * g / sqrt(ms + eps)  (eps inside the square root)
    var = var - mom

with the learning rate inside the momentum accumulator. ``optax.rmsprop`` is exactly this
chain (scale_by_rms -> scale_by_learning_rate -> trace) when given ``initial_scale=1``,
``eps_in_sqrt=True`` and ``momentum``, so it is used as is. Its schedule is read at the
count of updates already made, like TF's ``global_step`` before the increment.

TF1 ``MomentumOptimizer(use_nesterov=True)``: accum = m * accum + g;
var -= lr_t * (g + m * accum), which is ``optax.sgd(..., nesterov=True)``.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("rmsprop", "sgd")
RMSPROP_DECAY = 0.9
RMSPROP_MOMENTUM = 0.9
RMSPROP_EPSILON = 1.0
SGD_MOMENTUM = 0.9


def tf1_rmsprop(learning_rate, *, decay: float = RMSPROP_DECAY, momentum: float = RMSPROP_MOMENTUM,
                epsilon: float = RMSPROP_EPSILON) -> optax.GradientTransformation:
    """TF1 RMSProp (see the module docstring); learning_rate is a float or a schedule."""
    return optax.rmsprop(learning_rate, decay=decay, eps=epsilon, initial_scale=1.0,
                         eps_in_sqrt=True, centered=False, momentum=momentum, nesterov=False)


def staircase_decay(learning_rate: float, *, decay_steps: int, decay_rate: float) -> optax.Schedule:
    """lr * decay_rate ** floor(step / decay_steps), as tf.train.exponential_decay(staircase=True)."""
    return optax.exponential_decay(learning_rate, transition_steps=decay_steps,
                                   decay_rate=decay_rate, staircase=True)


def two_piece_constant(first: float, second: float, *, boundary: int) -> optax.Schedule:
    """``first`` while step <= boundary, then ``second`` (tf.train.piecewise_constant's rule)."""
    def schedule(step):
        return jnp.where(jnp.asarray(step) <= boundary, jnp.float32(first), jnp.float32(second))
    return schedule


def make_optimizer(name: str, *, learning_rate: float, steps_per_epoch: float, total_steps: int,
                   decay_rate: float = 0.94, decay_epochs: float = 2.0,
                   learning_rate_2: float = 0.0) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) as the originals.

    'rmsprop': TF1 RMSProp with lr decayed x decay_rate every int(steps_per_epoch *
    decay_epochs) steps (staircase). 'sgd': Nesterov momentum 0.9 with learning_rate up to
    and including step total_steps // 2, then learning_rate_2. steps_per_epoch is
    num_frames / batch as a float. Clipping and weight decay live in the train step.
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
        schedule = staircase_decay(learning_rate, decay_steps=decay_steps, decay_rate=decay_rate)
        return tf1_rmsprop(schedule), schedule
    if not learning_rate_2 > 0:
        raise ValueError(f"sgd needs learning_rate_2 > 0 (the rate after step {int(total_steps) // 2}), "
                         f"got {learning_rate_2!r}")
    schedule = two_piece_constant(learning_rate, learning_rate_2, boundary=int(total_steps) // 2)
    return optax.sgd(schedule, momentum=SGD_MOMENTUM, nesterov=True), schedule


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

