"""The workdir is the record of a run: every path in it, its resolved config, its lock.

    DIR/config.json                  the resolved config, recorded when the run started
    DIR/.lock                        held while a run uses the workdir (names its holder)
    DIR/results.json, DIR/cmc.png    per split, mean, and `initial` when asked
    DIR/split_K/test_set.npz         the split's test frames (what a later extraction reads)
    DIR/split_K/features.npz         the features evaluated (for `upm`: LAM and GAM fused)
    DIR/split_K/<model>/             one trained model (`dal`, `lam` or `gam`): checkpoints/,
                                     metrics.jsonl, tensorboard/, features.npz, mat/

`Workdir`, `SplitDir` and `ModelDir` own these paths; no other module joins them by hand.
`config.json` is written once, when a run starts in an empty workdir, with every path
resolved and `{workdir}` expanded. Later invocations are compared with it: a field that
changes the trained model (anything outside FREE_FIELDS) must match, unless the user asks
to overwrite the record; `--mode extract|evaluate --workdir DIR` needs no config at all.
"""
import dataclasses
import fcntl
import json
import os
import re
import socket
import time

import ml_collections

from upm_jax import checkpoints
from upm_jax import config as config_lib
from upm_jax import methods
from upm_jax.config import ConfigError
from upm_jax.files import atomic_write

# Fields a later invocation may change: they say where the data is, how it is read (every
# source and reader count gives the same batches), how often to log and checkpoint, how many
# splits train side by side (each as it would alone), or only affect extraction and
# evaluation, never the trained model.
FREE_FIELDS = ("data.root", "data.resident", "data.skip_corrupt", "data.source",
               "data.data_dir", "data.workers", "data.prefetch", "model.allow_scratch",
               "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
               "train.divergence_factor", "train.parallel_splits", "eval.")
# Stems of the features files: the trained model's, and the untrained network's.
FEATURES = "features"
INITIAL_FEATURES = "initial_features"


class WorkdirError(RuntimeError):
    """A workdir that cannot be used as asked (busy, or recorded for another config)."""


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """One model trained on one split: DIR/split_K/<name>, with its head."""
    path: str
    split: int
    name: str    # dal | lam | gam
    head: str    # dal | local | global

    @property
    def label(self):
        """How progress messages name the model: 'split 3 lam'."""
        return f"split {self.split} {self.name}"

    @property
    def checkpoints(self):
        return os.path.join(self.path, "checkpoints")

    @property
    def metrics(self):
        return os.path.join(self.path, "metrics.jsonl")

    @property
    def tensorboard(self):
        return os.path.join(self.path, "tensorboard")

    @property
    def mat(self):
        return os.path.join(self.path, "mat")

    def features(self, stem=FEATURES):
        return os.path.join(self.path, f"{stem}.npz")

    def latest_step(self):
        """The newest complete checkpoint's step, or None (no collective: see checkpoints)."""
        return checkpoints.latest_saved_step(self.checkpoints)


@dataclasses.dataclass(frozen=True)
class SplitDir:
    """One split of a run: DIR/split_K."""
    path: str
    number: int

    @property
    def eval_set(self):
        """The recorded test frames, query and gallery (upm_jax.data.eval_set)."""
        return os.path.join(self.path, "test_set.npz")

    def features(self, stem=FEATURES):
        """The evaluated features file (the models' fused for `upm`)."""
        return os.path.join(self.path, f"{stem}.npz")

    def models(self, method):
        """The ModelDirs of `method`'s models on this split (methods.METHODS)."""
        return [ModelDir(os.path.join(self.path, name), self.number, name, head)
                for name, head in methods.METHODS[method]]


class Workdir:
    """The folder of one run (see the module docstring for its layout)."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __repr__(self):
        return f"Workdir({self.path!r})"

    @property
    def record(self):
        return os.path.join(self.path, "config.json")

    @property
    def lock_file(self):
        return os.path.join(self.path, ".lock")

    @property
    def results(self):
        return os.path.join(self.path, "results.json")

    @property
    def cmc_plot(self):
        return os.path.join(self.path, "cmc.png")

    def split(self, number):
        return SplitDir(os.path.join(self.path, f"split_{int(number)}"), int(number))

    def recorded_splits(self):
        """Split numbers K with a DIR/split_K folder, sorted."""
        if not os.path.isdir(self.path):
            return []
        found = [name[len("split_"):] for name in os.listdir(self.path)
                 if name.startswith("split_")]
        return sorted(int(k) for k in found if k.isdigit())

    def has_trained(self):
        """True when some model folder of the workdir has a complete checkpoint (any
        model: this is asked before the record says which the method trains)."""
        for number in self.recorded_splits():
            split = self.split(number)
            for name in sorted(os.listdir(split.path)):
                folder = os.path.join(split.path, name, "checkpoints")
                if checkpoints.latest_saved_step(folder) is not None:
                    return True
        return False

    def resolve(self, config):
        """A copy of `config` with its paths resolved (what the record holds)."""
        resolved = ml_collections.ConfigDict(config.to_dict())
        resolved.data.root = self.resolve_path(config.data.root)
        resolved.data.split_file = self.resolve_path(config.data.split_file)
        resolved.model.pretrained = self.resolve_path(config.model.pretrained)
        return resolved

    def resolve_path(self, path):
        """A config path with `{workdir}` expanded, made absolute ('' stays '')."""
        if not path:
            return path
        return os.path.abspath(path.replace("{workdir}", os.path.abspath(self.path)))

    def read_record(self):
        """The recorded config (fields added to the project since filled with their
        defaults), or None when the workdir has none."""
        if not os.path.isfile(self.record):
            return None
        try:
            with open(self.record, encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError) as e:
            raise WorkdirError(f"{self.record}: cannot read the workdir's recorded config ({e}); "
                               "restore it, or start a new --workdir") from e
        return ml_collections.ConfigDict(_merge(config_lib.get_base_config().to_dict(), recorded))

    def write_record(self, config):
        """Writes DIR/config.json atomically."""
        text = config.to_json(indent=2)
        atomic_write(self.record, lambda f: f.write(text), mode="w")

    def open_record(self, config, *, mode, overwrite=False, say=print):
        """The config this invocation runs with, after checking it against the record.

        `config` None: the recorded one (an error when there is none). Otherwise the
        resolved `config`, which must agree with the record on every field that changes
        the trained model; with `overwrite`, or while nothing is trained yet in a training
        mode, the record is replaced instead. A workdir without a record gets one.
        """
        recorded = self.read_record()
        if config is None:
            if recorded is None:
                raise ConfigError(f"--workdir {self.path} has no config.json: give --config (it "
                                  "is recorded there when a run starts)")
            say(f"using the config recorded in {self.record}")
            return recorded
        config = self.resolve(config)
        if recorded is None:
            self.write_record(config)
            say(f"recorded the config in {self.record}")
            return config
        differences = model_differences(recorded, config)
        if not differences:
            return config
        listed = "; ".join(f"{field}: {old!r} recorded, {new!r} now"
                           for field, old, new in differences)
        if overwrite or (mode in ("train", "all") and not self.has_trained()):
            self.write_record(config)
            why = "as asked (--overwrite)" if overwrite else "nothing is trained there yet"
            say(f"replaced the recorded config in {self.record}, {why}: {listed}")
            return config
        raise WorkdirError(
            f"--workdir {self.path} was recorded with another config ({self.record}); fields "
            f"that change the trained model differ: {listed}. Use another --workdir, drop the "
            "differing overrides (or --config: the record is used), or pass --overwrite to "
            "replace the record (the checkpoints must still fit the model)")

    def lock(self):
        """The workdir's WorkdirLock (not yet acquired)."""
        return WorkdirLock(self.lock_file)


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

    def __init__(self, path):
        self.path = path
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
