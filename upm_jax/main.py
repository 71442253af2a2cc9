"""Command line: `python -m upm_jax.main --config configs/prid.py [--workdir runs/prid]`.

Thin on purpose: flags in, one library call (`upm_jax.run.run`) out, so notebooks and
tests drive the same code. A user's mistake (flags, config, data, workdir) is one line
`error: ...` on stderr and exit status 2, never a traceback.

    --config FILE[:k=v,...] [--config.FIELD=VALUE ...]   what to run (recorded in the workdir)
    --workdir DIR     default runs/<config name>[_<overrides>]; with --mode extract|evaluate
                      a workdir alone is enough (its recorded config is used)
    --overwrite       replace a workdir's recorded config that differs in a model field
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/prid.py:split=3.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, features, results (default: "
    "runs/<config name>[_<overrides>]).")
_MODE = flags.DEFINE_enum("mode", "all", ["train", "extract", "evaluate", "all"],
                          "What to run.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace the workdir's recorded config even where it differs in a "
    "field that changes the trained model.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "yes", "no"],
    "Join a multi-process run (upm_jax.parallel.initialize): 'auto' does when a launcher started "
    "several processes (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, SLURM, "
    "Open MPI, multi-host TPU).")


class UsageError(ValueError):
    """Flags that cannot work; the message says which and why."""


def _check_config_flags(argv):
    """The config file exists and every --config.FIELD override names a real field
    (checked before absl parses them, which reports neither clearly)."""
    from upm_jax import config as config_lib  # noqa: PLC0415

    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                raise UsageError(f"--config {path}: no such file (the repository's experiment "
                                 "files are in its configs/ folder)")
        elif arg.startswith("--config."):
            field = arg[len("--config."):].split("=", 1)[0]
            try:
                config_lib.check_known_fields(_field_tree(field))
            except config_lib.ConfigError as e:
                raise UsageError(f"{arg}: {e}") from None


def _field_tree(field):
    import ml_collections  # noqa: PLC0415

    *parents, leaf = field.split(".")
    tree = {leaf: 0}
    for name in reversed(parents):
        tree = {name: tree}
    return ml_collections.ConfigDict(tree)


def parse_flags(argv):
    """absl's parser, with every flag mistake turned into UsageError."""
    _check_config_flags(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise UsageError(lines[-1] if "Traceback" in str(e) else str(e)) from None


def _default_workdir():
    config_flag = flags.FLAGS["config"]
    overrides = [f"{k}={v}" for k, v in
                 sorted(config_flags.get_override_values(config_flag).items())]
    from upm_jax import workdir  # noqa: PLC0415

    return workdir.default_workdir(config_flags.get_config_filename(config_flag), overrides)


def main(argv):
    """Runs the parsed flags; returns the exit status."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # XLA's C++ log: warnings and up
    import jax  # Imported here so the environment above applies.

    from upm_jax import parallel  # noqa: PLC0415
    from upm_jax import runtime  # noqa: PLC0415
    runtime.enable_compilation_cache()
    try:
        parallel.initialize(_DISTRIBUTED.value)
    except parallel.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from upm_jax import progress  # noqa: PLC0415
    from upm_jax import run as run_lib  # noqa: PLC0415

    logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
    progress.quiet_third_party()
    config = _CONFIG.value
    workdir = _WORKDIR.value
    if workdir is None:
        if config is None:
            raise UsageError("give --config (what to run) or --workdir (a run to continue)")
        workdir = _default_workdir()
        progress.say(f"--workdir not given: writing to {workdir}")
    try:
        results = run_lib.run(config, workdir, _MODE.value, overwrite=_OVERWRITE.value)
    except run_lib.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if results and jax.process_index() == 0:
        from upm_jax.evaluation import summary  # noqa: PLC0415
        print(summary.format_results(results))
    return 0


def _guarded_main(argv):
    try:
        return main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cli(argv):
    """Parses `argv` (argv[0] is the program) and runs it: the exit status, in-process.
    (ml_collections reads --config.FIELD overrides from sys.argv, so it is `argv` meanwhile,
    and defines one flag per override, so an earlier parse's are removed first.)"""
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)   # overrides an earlier in-process parse defined
    flags.FLAGS.unparse_flags()
    saved, sys.argv = sys.argv, list(argv)
    try:
        rest = parse_flags(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return _guarded_main(rest)


def _absl_parser(argv):
    try:
        return parse_flags(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from upm_jax import host_malloc
    host_malloc.reexec_with_huge_pages()
    app.run(lambda argv: sys.exit(_guarded_main(argv)), flags_parser=_absl_parser)
