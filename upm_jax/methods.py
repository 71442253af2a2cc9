"""What each method trains, and its models built from a config (the one place a config
becomes model fields: model code itself never sees a config)."""
import jax
import jax.numpy as jnp

from upm_jax import models
from upm_jax.config import ConfigError
from upm_jax.models import BACKBONES, MATMUL_PRECISIONS

# method -> the models it trains, as (sub-folder name, head). `upm` evaluates the
# per-part concatenation of its LAM and GAM models' features.
METHODS = {
    "dal": (("dal", "dal"),),
    "upm_local": (("lam", "local"),),
    "upm_global": (("gam", "global"),),
    "upm": (("lam", "local"), ("gam", "global")),
}

__all__ = ["BACKBONES", "MATMUL_PRECISIONS", "METHODS", "build_model", "check_frames_fit",
           "image_shape", "num_parts"]


def num_parts(config, head):
    """Parts P of a head's features: one for DAL, config.model.n_part otherwise."""
    return 1 if head == "dal" else config.model.n_part


def image_shape(config):
    """(H, W) of the model's input frames."""
    return config.data.image_size, config.data.image_size // 2


def build_model(config, head):
    """The model of `head` with the config's backbone settings (one part for DAL)."""
    return models.build_model(
        config.model.backbone, head, n_part=num_parts(config, head),
        depth_multiplier=config.model.depth_multiplier,
        dtype=jnp.dtype(config.model.dtype), train_relation=config.model.train_relation,
        bn_decay=config.model.bn_decay, matmul_precision=config.model.matmul_precision)


def check_frames_fit(config):
    """Refuses frames too small for the method's models (e.g. fewer rows in the final
    feature map than config.model.n_part stripes), from the models' shapes alone."""
    height, width = image_shape(config)
    for _, head in METHODS[config.method]:
        model = build_model(config, head)
        try:
            jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, height, width, 3)), train=False))
        except ValueError as e:
            raise ConfigError(
                f"config.data.image_size={config.data.image_size} ({height}x{width} frames) "
                f"does not fit the {head} model of config.method={config.method!r} "
                f"(config.model.n_part={config.model.n_part}): {e}") from None
