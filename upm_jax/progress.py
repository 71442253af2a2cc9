"""What the user sees while a run works: one line per stage on stderr, from process 0 only,
and third-party chatter kept out of it."""
import contextlib
import logging
import sys
import time

import jax

# absl-logged messages from orbax that say nothing a user can act on.
_NOISE = ("Given directory is read only", "CheckpointManagerOptions.read_only=True",
          "was found in the checkpoint, but could not be restored",
          "Waiting for previous save to complete", "Reached preemption sync point")


def say(message):
    """A progress message for the user, from process 0 only."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def compiling(bar, what):
    """Around the first call of a jitted function, which blocks while XLA compiles it (or
    loads it from the persistent compilation cache): the tqdm `bar` says so meanwhile, and
    afterwards one line above the bar says how long it took."""
    if bar.disable:   # another process's bar: it shows nothing
        yield
        return
    label = bar.desc
    bar.set_description_str(f"{label} (compiling {what})")
    start = time.perf_counter()
    try:
        yield
    finally:
        bar.set_description_str(label)
    bar.write(f"{label}: compiled {what} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


class _DropNoise(logging.Filter):
    def filter(self, record):
        return not any(text in record.getMessage() for text in _NOISE)


def quiet_third_party():
    """Drops orbax's read-only warnings and the INFO chatter of absl-logging libraries."""
    absl_logger = logging.getLogger("absl")
    absl_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropNoise) for f in absl_logger.filters):
        absl_logger.addFilter(_DropNoise())
