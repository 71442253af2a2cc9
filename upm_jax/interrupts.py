"""Stop signals: SIGTERM (a scheduler, a preemptible VM) and SIGINT (Ctrl-C).

Outside training a signal raises `Interrupted` in the main thread at once, so a file
being written is removed (`files.atomic_write`) and the command line prints one line and
exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT: the shells'
status of a process ended by that signal). During training (`deferred`) a signal only
sets a flag: the loop finishes the step in flight, saves a checkpoint of that step, waits
until it is committed, and then raises Interrupted naming it, so at most the step being
computed when the signal came is lost, and then only until the checkpoint is written.

Several processes must save the same step together (an orbax save is collective). The
signalled process posts JAX's preemption notice (the coordination-service key that JAX's
own SIGTERM listener would post; our handler replaces that listener so that SIGINT and
the stages outside training are handled too), and every process asks
`multihost_utils.reached_preemption_sync_point(step)` after each step: JAX's sync
protocol picks the first step every process can still reach, and all save it.

Importable without JAX (it is imported only where training needs it): `command` gives
the NumPy-only command lines the same handling.
"""
import contextlib
import datetime
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The coordination-service key of JAX's preemption notice (xla/tsl preemption_sync_manager).
_PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
# Which signal the signalled process received, for the others' messages.
_SIGNAL_KEY = "upm_jax/stop_signal"


class Interrupted(BaseException):
    """A stop signal ended the run (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` swallows it). `signum`: the signal; `message`: what was kept;
    `together`: every process of the run stops at this point (the training loop's
    agreed step), so none needs to be told."""

    def __init__(self, signum, message="", *, together=False):
        super().__init__(signum, message)
        self.signum = signum
        self.message = message
        self.together = together

    @property
    def status(self):
        """The exit status: 128 + the signal's number."""
        return 128 + int(self.signum)

    def __str__(self):
        line = f"stopped by {signal.Signals(self.signum).name}"
        return f"{line}: {self.message}" if self.message else line


class _State:
    def __init__(self):
        self.installed = False
        self.deferring = 0        # depth of `deferred` blocks
        self.signum = None        # the signal received while deferring


_state = _State()


def _handler(signum, frame):
    if not _state.deferring:
        raise Interrupted(signum, "no file was left half-written; run the same command "
                                  "again to continue")
    import jax  # noqa: PLC0415  (deferring happens only in training, where JAX is in use)

    from upm_jax.progress import say  # noqa: PLC0415
    if _state.signum is not None:
        say(f"{signal.Signals(signum).name}: already stopping after the step in flight "
            "(saving its checkpoint)")
        return
    _state.signum = signum
    if jax.process_count() > 1:
        _post_preemption_notice(signum)


@contextlib.contextmanager
def installed():
    """Within this block SIGTERM and SIGINT are handled as the module docstring says (the
    command line's whole run, entered after joining a multi-process run, whose JAX
    listener it replaces); the previous handlers come back after it. Main thread only."""
    previous = {signum: signal.signal(signum, _handler) for signum in SIGNALS}
    _state.installed = True
    try:
        yield
    finally:
        _state.installed = False
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


class _Stop:
    """What the training loop asks after each step."""

    def requested(self, step):
        """True when the loop must save `step` and stop (on every process alike)."""
        import jax  # noqa: PLC0415
        from jax.experimental import multihost_utils  # noqa: PLC0415
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(int(step))
        return _state.signum is not None

    def requested_locally(self):
        """True when this process received a stop signal (whatever the others do)."""
        return _state.signum is not None

    @property
    def signum(self):
        """The signal that stops the run: this process's, else the one a peer posted."""
        from upm_jax import parallel  # noqa: PLC0415
        if _state.signum is not None:
            return _state.signum
        posted = parallel.key_value_get(_SIGNAL_KEY)
        return int(posted) if posted else signal.SIGTERM


@contextlib.contextmanager
def deferred():
    """Within this block a stop signal only asks the loop to stop (`_Stop.requested`).
    Installs the handlers for the block when `installed` is not in force (a library user's
    main thread); elsewhere the signals keep their handlers and nothing is deferred."""
    installed_here = {}
    if not _state.installed and threading.current_thread() is threading.main_thread():
        installed_here = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state.deferring += 1
    try:
        yield _Stop()
    finally:
        _state.deferring -= 1
        if not _state.deferring:
            _state.signum = None
        for signum, previous in installed_here.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)


def _post_preemption_notice(signum):
    """Starts JAX's preemption sync protocol on every process (see the module docstring)."""
    from upm_jax import parallel  # noqa: PLC0415
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    parallel.key_value_set(_SIGNAL_KEY, str(int(signum)))
    parallel.key_value_set(_PREEMPTION_NOTICE_KEY, now)


def command(main):
    """Runs the `main()` of a command line other than upm_jax.main (the evaluator, the
    porting tool, Grad-CAM, the export) with the stop signals handled as outside training:
    the file being written is removed, one line `stopped by SIGINT: ...` is printed, and
    the status is 128 + the signal's number. Returns the exit status."""
    with installed():
        try:
            return main()
        except Interrupted as e:
            print(e, file=sys.stderr)
            return e.status
