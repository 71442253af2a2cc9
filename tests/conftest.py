"""Test session set-up: 8 fake CPU devices so multi-device behaviour is exercised."""
import os
import tempfile

import pytest

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


@pytest.fixture(scope="module")
def one_device():
    """The runs of the module using it train, extract and evaluate on one of the 8 devices
    (the mesh `parallel.make_mesh()` builds by default; an explicit device list is kept).

    What a whole run records, refuses and reports does not depend on the device count, and
    the data-parallel paths have tests of their own on 8 devices (test_train,
    test_data_pipeline, test_parallel_splits' whole runs; test_multihost on 2 processes);
    on 8 fake devices of 2 cores the tiny run costs half as much again (40.7 against 26.5
    CPU-seconds, measured)."""
    from upm_jax import parallel
    make_mesh = parallel.make_mesh
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parallel, "make_mesh", lambda devices=None: make_mesh(
            jax.devices()[:1] if devices is None else devices))
        yield make_mesh
