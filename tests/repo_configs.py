"""The repository's experiment files (configs/), loaded by path as --config loads them."""
import pathlib

from upm_jax.config import load_config_file

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def get_config(name, arg=None):
    """configs/<name>.py's get_config(arg)."""
    return load_config_file(str(CONFIGS / f"{name}.py") + (f":{arg}" if arg else ""))


def tiny_config(**overrides):
    """The demo at its smallest (8 ids, 64x32 frames, batch 16, 2 steps); `section__field=v`
    overrides, e.g. tiny_config(train__steps=4)."""
    config = get_config("demo")
    config.data.synthetic_ids = 8
    config.data.image_size = 64
    config.train.batch_size = 16
    config.train.steps = 2
    config.train.checkpoint_every = 2
    config.train.log_every = 1
    config.eval.batch_size = 64
    config.eval.initial = False
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config
