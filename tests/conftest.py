"""Test session set-up: 8 fake CPU devices so multi-device behaviour is exercised."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The CPU only, here and in the commands the tests start: with the `aot` extra installed
# (libtpu, the CUDA plugin) JAX would otherwise probe for a TPU and a GPU in each process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache (upm_jax.runtime): tests write nothing under ~/.cache and
# every compilation they count happens.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
