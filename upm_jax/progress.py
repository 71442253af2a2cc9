"""What the user sees while a run works: one line per stage on stderr, from process 0 only,
and third-party start-up noise kept out of it."""
import contextlib
import importlib.util
import logging
import os
import sys

import jax

# absl-logged messages from orbax that say nothing a user can act on.
_NOISE = ("Given directory is read only", "CheckpointManagerOptions.read_only=True",
          "was found in the checkpoint, but could not be restored",
          "Waiting for previous save to complete")


def say(message):
    """A progress message for the user, from process 0 only."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


class _DropNoise(logging.Filter):
    def filter(self, record):
        return not any(text in record.getMessage() for text in _NOISE)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Points file descriptor 2 at /dev/null: C++ libraries log there before any setting
    of theirs applies (TensorFlow's start-up lines, printed twice)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_third_party(*, tensorflow=False):
    """Drops orbax's read-only warnings and INFO chatter of absl-logging libraries; with
    `tensorflow` (runs that train: the TensorBoard writer imports it) imports TensorFlow
    here, without its native start-up lines."""
    if tensorflow and "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow"):
        with _native_stderr_silenced():
            import tensorflow  # noqa: F401,PLC0415  (only the TensorBoard writer uses it)
    absl_logger = logging.getLogger("absl")
    absl_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropNoise) for f in absl_logger.filters):
        absl_logger.addFilter(_DropNoise())
