"""Test session set-up: 8 fake CPU devices so multi-device behaviour is exercised."""
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The CPU only, here and in the commands the tests start: with the `aot` extra installed
# (libtpu, the CUDA plugin) JAX would otherwise probe for a TPU and a GPU in each process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache for this test run only (upm_jax.runtime), shared by the
# xdist workers and the commands the tests start: the many runs of the same small configs
# compile each step once. Nothing is written under ~/.cache; a test that counts
# compilations clears JAX's in-memory caches and turns this one off for itself.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(),
    f"upm_jax_tests_{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


def pytest_sessionfinish(session):
    """Removes this run's compilation cache (by the controller, once the workers are done)."""
    if not hasattr(session.config, "workerinput"):
        import shutil
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
