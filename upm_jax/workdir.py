"""The workdir is the record of a run: its resolved config, its lock, its default place.

`DIR/config.json` is written once, when a run starts in an empty workdir, with every path
resolved and `{workdir}` expanded. Later invocations are compared with it: a field that
changes the trained model (anything outside FREE_FIELDS) must match, unless the user asks
to overwrite the record; `--mode extract|evaluate --workdir DIR` needs no config at all.
`DIR/.lock` keeps a second run out of a workdir while one is using it.
"""
import fcntl
import json
import os
import re
import socket
import time

import ml_collections

from upm_jax import checkpoint as checkpoint_lib

from upm_jax.evaluation.features import atomic_write
from upm_jax.experiment import ConfigError

RECORD = "config.json"
LOCK = ".lock"
# Fields a later invocation may change: they say where the data is or how often to log and
# checkpoint, or only affect extraction and evaluation, never the trained model.
FREE_FIELDS = ("data.root", "data.resident", "data.skip_corrupt", "model.allow_scratch",
               "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
               "train.divergence_factor", "eval.")


class WorkdirError(RuntimeError):
    """A workdir that cannot be used as asked (busy, or recorded for another config)."""


def resolve_path(path, workdir):
    """A config path with `{workdir}` expanded, made absolute ('' stays '')."""
    if not path:
        return path
    return os.path.abspath(path.replace("{workdir}", os.path.abspath(workdir)))


def resolve(config, workdir):
    """A copy of `config` with its paths resolved (what the record holds)."""
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.data.root = resolve_path(config.data.root, workdir)
    resolved.data.split_file = resolve_path(config.data.split_file, workdir)
    resolved.model.pretrained = resolve_path(config.model.pretrained, workdir)
    return resolved


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _merge(defaults, values):
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            _merge(defaults[key], value)
        else:
            defaults[key] = value
    return defaults


def read_record(workdir):
    """The recorded config of `workdir` (fields added to the project since filled with
    their defaults), or None when the workdir has none."""
    path = os.path.join(workdir, RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path}: cannot read the workdir's recorded config ({e}); restore "
                           "it, or start a new --workdir") from e
    from configs import base  # noqa: PLC0415  (the repository's config package)

    return ml_collections.ConfigDict(_merge(base.get_base_config().to_dict(), recorded))


def write_record(config, workdir):
    """Writes DIR/config.json atomically."""
    text = config.to_json(indent=2)
    atomic_write(os.path.join(workdir, RECORD), lambda f: f.write(text), mode="w")


def model_differences(recorded, config):
    """[(field, recorded value, new value)] of the fields outside FREE_FIELDS that differ."""
    old, new = _flatten(recorded.to_dict()), _flatten(config.to_dict())
    out = []
    for field in sorted(set(old) | set(new)):
        if any(field == free or (free.endswith(".") and field.startswith(free))
               for free in FREE_FIELDS):
            continue
        if old.get(field) != new.get(field):
            out.append((field, old.get(field), new.get(field)))
    return out


def has_trained(workdir):
    """True when some model of the workdir has a complete checkpoint."""
    for split in _listdir(workdir):
        if not split.startswith("split_"):
            continue
        for model in _listdir(os.path.join(workdir, split)):
            if checkpoint_lib.latest_saved_step(os.path.join(workdir, split, model)) is not None:
                return True
    return False


def _listdir(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def open_record(config, workdir, *, mode, overwrite=False, say=print):
    """The config this invocation runs with, after checking it against the record.

    `config` None: the recorded one (an error when there is none). Otherwise the resolved
    `config`, which must agree with the record on every field that changes the trained
    model; with `overwrite`, or while nothing is trained yet in a training mode, the record
    is replaced instead. A workdir without a record gets one.
    """
    recorded = read_record(workdir)
    path = os.path.join(workdir, RECORD)
    if config is None:
        if recorded is None:
            raise ConfigError(f"--workdir {workdir} has no {RECORD}: give --config (it is "
                              "recorded there when a run starts)")
        say(f"using the config recorded in {path}")
        return recorded
    config = resolve(config, workdir)
    if recorded is None:
        write_record(config, workdir)
        say(f"recorded the config in {path}")
        return config
    differences = model_differences(recorded, config)
    if not differences:
        return config
    listed = "; ".join(f"{field}: {old!r} recorded, {new!r} now"
                       for field, old, new in differences)
    if overwrite or (mode in ("train", "all") and not has_trained(workdir)):
        write_record(config, workdir)
        why = "as asked (--overwrite)" if overwrite else "nothing is trained there yet"
        say(f"replaced the recorded config in {path}, {why}: {listed}")
        return config
    raise WorkdirError(
        f"--workdir {workdir} was recorded with another config ({path}); fields that change "
        f"the trained model differ: {listed}. Use another --workdir, drop the differing "
        "overrides (or --config: the record is used), or pass --overwrite to replace the "
        "record (the checkpoints must still fit the model)")


def default_workdir(config_file, overrides=()):
    """runs/<config name>[_<overrides>] for a config file and its overrides
    ('split=3' after ':' and --config.FIELD=VALUE flags, as 'field=value' texts)."""
    name, _, arg = os.path.basename(config_file).partition(":")
    name = os.path.splitext(name)[0]
    parts = [name] + [p for p in arg.split(",") if p] + list(overrides)
    text = "_".join(parts)
    return os.path.join("runs", re.sub(r"[^A-Za-z0-9._=+-]+", "-", text))


class WorkdirLock:
    """An exclusive lock on a workdir (`DIR/.lock`, flock), naming its holder.

    The kernel drops a flock when its process dies, so a lock left by a killed run is
    taken over at once; the file then still names the dead holder, which is reported.
    """

    def __init__(self, workdir):
        self.path = os.path.join(workdir, LOCK)
        self._fd = None

    def acquire(self, say=print):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise WorkdirError(
                f"{os.path.dirname(self.path)} is in use by another run ({holder}); wait for "
                "it to finish, or use another --workdir") from None
        left = os.pread(fd, 4096, 0)
        if left:
            say(f"taking over the lock of {os.path.dirname(self.path)} left by a run that "
                f"ended without releasing it ({_describe(left)})")
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)   # empty: released cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _describe(raw):
    try:
        info = json.loads(raw.decode())
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "holder unknown"
