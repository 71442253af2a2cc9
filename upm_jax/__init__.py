"""upm_jax: unsupervised video person re-identification (DAL, uPMnet) in JAX/Flax."""

__version__ = "0.1.0"
