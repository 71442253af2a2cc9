"""upm_jax: unsupervised video person re-identification (DAL, uPMnet) in JAX/Flax."""
