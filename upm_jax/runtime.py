"""JAX settings of the process that the command-line entry points make before the first
computation: the persistent compilation cache.

Compiling the full training step takes a minute or more on an accelerator host (several on
a TPU's host CPU); XLA's persistent cache keeps each compiled executable on disk, keyed by
the computation, its devices and the JAX version, so a resumed run, the next split or a
second run of the same config loads it instead. It lives in
`$XDG_CACHE_HOME/upm_jax/jax` (default `~/.cache/upm_jax/jax`); JAX's own variable
`JAX_COMPILATION_CACHE_DIR` moves it (a folder every host of a multi-host run can reach) or,
set empty, turns it off. JAX caches only compilations of at least a second
(`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`).
"""
import os

CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"


def default_cache_dir(environ=None) -> str:
    """$XDG_CACHE_HOME/upm_jax/jax, or ~/.cache/upm_jax/jax."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "upm_jax", "jax")


def enable_compilation_cache(environ=None):
    """Turns on JAX's persistent compilation cache in `default_cache_dir()` unless
    JAX_COMPILATION_CACHE_DIR is set (JAX then uses that folder, or no cache when empty).
    Returns the folder in use, or None when the cache is off."""
    import jax  # noqa: PLC0415

    environ = os.environ if environ is None else environ
    if CACHE_VARIABLE in environ:
        return environ[CACHE_VARIABLE] or None
    path = default_cache_dir(environ)
    jax.config.update("jax_compilation_cache_dir", path)
    return path
