"""What the user sees while a run works: one line per stage on stderr, from process 0 only,
and third-party chatter kept out of it."""
import logging
import sys

import jax

# absl-logged messages from orbax that say nothing a user can act on.
_NOISE = ("Given directory is read only", "CheckpointManagerOptions.read_only=True",
          "was found in the checkpoint, but could not be restored",
          "Waiting for previous save to complete", "Reached preemption sync point")


def say(message):
    """A progress message for the user, from process 0 only."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


class _DropNoise(logging.Filter):
    def filter(self, record):
        return not any(text in record.getMessage() for text in _NOISE)


def quiet_third_party():
    """Drops orbax's read-only warnings and the INFO chatter of absl-logging libraries."""
    absl_logger = logging.getLogger("absl")
    absl_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropNoise) for f in absl_logger.filters):
        absl_logger.addFilter(_DropNoise())
