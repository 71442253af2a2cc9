"""Command line: `python -m upm_jax.main --config configs/prid.py --workdir runs/prid`.

Thin on purpose: flags in, one library call (`upm_jax.run.run`) out, so notebooks and
tests drive the same code.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/prid.py:split=3.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, features, results.")
_MODE = flags.DEFINE_enum("mode", "all", ["train", "extract", "evaluate", "all"],
                          "What to run.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "yes", "no"],
    "Join a multi-process run (upm_jax.distributed): 'auto' does when a launcher started "
    "several processes (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, SLURM, "
    "Open MPI, multi-host TPU).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax  # Imported here so the environment above applies.

    from upm_jax import distributed
    try:
        distributed.initialize(_DISTRIBUTED.value)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from upm_jax import run as run_lib

    logging.set_verbosity(logging.WARNING)  # orbax and TF log every step at INFO
    try:
        results = run_lib.run(_CONFIG.value, _WORKDIR.value, _MODE.value)
    except run_lib.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if results and jax.process_index() == 0:
        from upm_jax import report
        print(report.format_results(results))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
