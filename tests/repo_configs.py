"""The repository's experiment files (configs/), loaded by path as --config loads them."""
import pathlib

from upm_jax.config import load_config_file

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def get_config(name, arg=None):
    """configs/<name>.py's get_config(arg)."""
    return load_config_file(str(CONFIGS / f"{name}.py") + (f":{arg}" if arg else ""))
