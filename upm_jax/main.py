"""Command line: `python -m upm_jax.main --config configs/prid.py [--workdir runs/prid]`.

Thin on purpose: flags in, one library call (`upm_jax.run.run`) out, so notebooks and
tests drive the same code. A user's mistake (flags, config, data, workdir) is one line
`error: ...` on stderr and exit status 2, never a traceback. SIGTERM and SIGINT end the
run with one line saying what was kept and status 143 / 130 (`upm_jax.interrupts`); in a
multi-process run a process that stops takes the others with it (`upm_jax.parallel`).

    --config FILE[:k=v,...] [--config.FIELD=VALUE ...]   what to run (recorded in the workdir)
    --workdir DIR     default runs/<config name>[_<overrides>]; with --mode extract|evaluate
                      a workdir alone is enough (its recorded config is used, with any
                      --config.FIELD=VALUE applied)
    --overwrite       replace a workdir's recorded config that differs in a model field
"""
import os
import sys
import threading

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
    """Checks what absl would report unclearly, before it parses: the config file loads
    (`config.load_config_file`: missing, a folder, a Python error, no get_config...) and
    every --config.FIELD override names a real field. Without --config the overrides
    apply to the workdir's recorded config: they are taken out of the returned argv and
    returned as [(field, value)]."""
    from upm_jax import config as config_lib  # noqa: PLC0415

    spec, overrides, kept, without_overrides = None, [], [argv[0]], [argv[0]]
    args = list(argv[1:])
    while args:
        arg = args.pop(0)
        if arg == "--config" and args:
            spec = args[0]
        elif arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            field, sep, value = arg[len("--config."):].partition("=")
            taken = [arg]
            if not sep and args and not args[0].startswith("-"):
                value = args.pop(0)
                taken.append(value)
            try:
                config_lib.check_known_fields(_field_tree(field))
            except config_lib.ConfigError as e:
                raise UsageError(f"{arg}: {e}") from None
            overrides.append((field, value))
            kept += taken
            continue
        kept.append(arg)
        without_overrides.append(arg)
    if spec is not None:
        try:
            config_lib.load_config_file(spec)
        except config_lib.ConfigError as e:
            raise UsageError(str(e)) from None
        return kept, []
    return without_overrides, overrides


def _field_tree(field):
    import ml_collections  # noqa: PLC0415

    *parents, leaf = field.split(".")
    tree = {leaf: 0}
    for name in reversed(parents):
        tree = {name: tree}
    return ml_collections.ConfigDict(tree)


# --config.FIELD=VALUE overrides given without --config: applied to the recorded config.
_RECORD_OVERRIDES = []


def parse_flags(argv):
    """absl's parser, with every flag mistake turned into UsageError."""
    argv, _RECORD_OVERRIDES[:] = _check_config_flags(argv)
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

    from upm_jax import interrupts  # noqa: PLC0415
    from upm_jax import parallel  # noqa: PLC0415
    from upm_jax import runtime  # noqa: PLC0415
    runtime.enable_compilation_cache()
    try:
        parallel.initialize(_DISTRIBUTED.value)
        _check_devices(jax)
    except parallel.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parallel.watch_stops(_stop_with_peer)
    logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
    with interrupts.installed():   # after joining: it replaces JAX's own SIGTERM listener
        try:
            return _run()
        except interrupts.Interrupted as e:   # a signal that came after the run's work
            return _stop(e.status, str(e), together=e.together)


def _run():
    """The run of the parsed flags, with the stop signals handled; the exit status."""
    import jax  # noqa: PLC0415

    from upm_jax import interrupts  # noqa: PLC0415
    from upm_jax import parallel  # noqa: PLC0415
    from upm_jax import progress  # noqa: PLC0415
    from upm_jax import run as run_lib  # noqa: PLC0415

    progress.quiet_third_party()
    try:
        config = _CONFIG.value
        workdir = _WORKDIR.value
        if workdir is None:
            if config is None:
                raise UsageError("give --config (what to run) or --workdir (a run to continue)")
            workdir = _default_workdir()
            progress.say(f"--workdir not given: writing to {workdir}")
        results = run_lib.run(config, workdir, _MODE.value, overwrite=_OVERWRITE.value,
                              overrides=list(_RECORD_OVERRIDES))
        if results and jax.process_index() == 0:
            from upm_jax.evaluation import summary  # noqa: PLC0415
            print(summary.format_results(results))
        _finish_together(parallel)
        return 0
    except (UsageError,) + run_lib.USER_ERRORS as e:
        return _stop(2, f"error: {e}")
    except interrupts.Interrupted as e:
        return _stop(e.status, str(e), together=e.together)
    except Exception as e:
        lost = parallel.lost_process_message(e)
        if lost is None:
            if jax.process_count() > 1:   # a bug: its traceback here, one line for the others
                parallel.announce_stop(1, f"unexpected {type(e).__name__}: {e}")
            raise
        return _stop_with_peer(parallel.stopped_process() or {"status": 1, "line": lost})


def _check_devices(jax):
    """JAX's backend starts (JAX_PLATFORMS may name one this machine lacks)."""
    from upm_jax import parallel  # noqa: PLC0415
    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:
        platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "(default)"
        reason = f" ({str(e).splitlines()[0]})" if str(e).strip() else ""
        raise parallel.DistributedError(
            f"JAX_PLATFORMS={platforms}: JAX cannot start that backend on this machine{reason}; "
            "unset JAX_PLATFORMS to use the devices present, or install JAX for that "
            "accelerator (pip install -e '.[gpu]' or '.[tpu]')") from None


def _stop(status, line, *, together=True):
    """Prints `line` and returns `status`. A process of a multi-process run that stops on
    its own (not at the training loop's agreed step) first tells the others, then exits
    at once: waiting for them at JAX's shutdown barrier would hang."""
    import jax  # noqa: PLC0415

    from upm_jax import parallel  # noqa: PLC0415
    if jax.process_count() > 1:
        if not together or status == 2:
            parallel.announce_stop(status, line)
            _exit_now(status, line)
        print(line, file=sys.stderr, flush=True)
        _finish_together(parallel)
        return status
    print(line, file=sys.stderr)
    return status


def _finish_together(parallel):
    """parallel.finish, with a process that stopped meanwhile reported as such."""
    try:
        parallel.finish()
    except Exception as e:  # noqa: BLE001  (the end barrier failed: a process is gone)
        _stop_with_peer(parallel.stopped_process() or {
            "status": 1, "line": parallel.lost_process_message(e) or str(e)})


def _stop_with_peer(announcement):
    """Ends this process because another one stopped (`parallel.watch_stops`, or a
    collective that failed because a process is gone)."""
    import jax  # noqa: PLC0415

    status, reason = int(announcement["status"]), announcement["line"]
    if "process" in announcement:
        reason = (f"process {announcement['process']} of {jax.process_count()} stopped: "
                  f"{reason.removeprefix('error: ')}; stopping this process too")
    _exit_now(status, reason if status in _SIGNAL_STATUSES else f"error: {reason}")


# Exit statuses of a run stopped by SIGINT or SIGTERM (upm_jax.interrupts).
_SIGNAL_STATUSES = (130, 143)
_EXITING = threading.Lock()


def _exit_now(status, line):
    """Prints `line`, then ends the process with `status` without Python's clean-up (the
    first caller wins: the stop watcher and the main thread may both get here)."""
    _EXITING.acquire()
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


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
