"""upm_jax: unsupervised video person re-identification (DAL, uPMnet) in JAX/Flax.

`upm_jax.load(workdir)` gives a finished run's feature extractor (`upm_jax.extractor`);
it is imported on first use, so `import upm_jax.evaluation` stays free of JAX.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "load":
        from upm_jax.extractor import load
        return load
    raise AttributeError(f"module 'upm_jax' has no attribute {name!r}")
