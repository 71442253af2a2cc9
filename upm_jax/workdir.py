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
resolved: a path inside the workdir is recorded as `{workdir}/...` and expanded with the
workdir's current path when read, so a workdir moved or copied elsewhere keeps reading
(and writing) inside itself. The record carries the SHA-256 of its own content
(`checksum`), so a damaged record is refused instead of silently changing a setting.
Later invocations are compared with it: a field that changes the trained model (anything
outside FREE_FIELDS) must match, unless the user asks to overwrite the record;
`--mode extract|evaluate --workdir DIR` needs no config at all.
"""
import dataclasses
import fcntl
import hashlib
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
from upm_jax.files import atomic_write, remove_temporaries

# Fields a later invocation may change: they say where the data is, how it is read (every
# source and reader count gives the same batches), how often to log and checkpoint, how many
# splits train side by side (each as it would alone), or only affect extraction and
# evaluation, never the trained model.
FREE_FIELDS = ("data.root", "data.resident", "data.skip_corrupt", "data.source",
               "data.data_dir", "data.workers", "data.prefetch", "model.allow_scratch",
               "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
               "train.divergence_factor", "train.parallel_splits", "eval.")
# The config fields that hold paths (recorded relative to the workdir when inside it).
PATH_FIELDS = ("data.root", "data.split_file", "data.data_dir", "model.pretrained")
_WORKDIR_PLACEHOLDER = "{workdir}"
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
        """A copy of `config` with its paths resolved (absolute, `{workdir}` expanded)."""
        resolved = ml_collections.ConfigDict(config.to_dict())
        for field in PATH_FIELDS:
            section, name = field.split(".")
            resolved[section][name] = self.resolve_path(config[section][name])
        return resolved

    def resolve_path(self, path):
        """A config path with `{workdir}` expanded, made absolute ('' and URLs stay)."""
        if not path or "://" in path:
            return path
        return os.path.abspath(path.replace(_WORKDIR_PLACEHOLDER, os.path.abspath(self.path)))

    def _relative_path(self, path):
        """`path` as recorded: `{workdir}/...` when inside the workdir, else as is."""
        if not path or "://" in path:
            return path
        inside = os.path.relpath(path, os.path.abspath(self.path))
        if inside == "." or inside.startswith(os.pardir):
            return path
        return f"{_WORKDIR_PLACEHOLDER}/{inside}"

    def remove_temporaries(self):
        """Removes the temporary files a killed run left in the workdir (orbax cleans its
        own in checkpoints/); call it holding the lock. Returns their paths."""
        if not os.path.isdir(self.path):
            return []
        return remove_temporaries(self.path, skip=("checkpoints",))

    def read_record(self, overrides=()):
        """The recorded config (fields added to the project since filled with their
        defaults; `overrides` [(field, text)] applied), or None when the workdir has none.
        A record that fails its checksum, or whose values do not have the types of the
        project's fields, is a WorkdirError naming it."""
        if not os.path.isfile(self.record):
            return None
        try:
            with open(self.record, encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError) as e:
            raise WorkdirError(f"{self.record}: cannot read the workdir's recorded config ({e}); "
                               f"{_RECORD_ADVICE}") from e
        if not isinstance(recorded, dict):
            raise WorkdirError(f"{self.record}: holds a JSON {type(recorded).__name__}, not the "
                               f"recorded config (an object); {_RECORD_ADVICE}")
        checksum = recorded.pop("checksum", None)
        if checksum is not None and checksum != _checksum(recorded):
            raise WorkdirError(f"{self.record}: its content does not match its checksum (the "
                               f"file was damaged or edited by hand); {_RECORD_ADVICE}")
        base = config_lib.get_base_config().to_dict()
        _check_types(self.record, base, recorded)
        config = ml_collections.ConfigDict(_merge(base, recorded))
        for field in PATH_FIELDS:
            section, name = field.split(".")
            config[section][name] = self.resolve_path(config[section][name])
        if overrides:
            config = config_lib.apply_overrides(config, overrides)
        return config

    def write_record(self, config):
        """Writes DIR/config.json atomically, paths inside the workdir as `{workdir}/...`,
        with the checksum of its content."""
        recorded = config.to_dict()
        for field in PATH_FIELDS:
            section, name = field.split(".")
            recorded[section][name] = self._relative_path(recorded[section][name])
        text = json.dumps(dict(recorded, checksum=_checksum(recorded)), indent=2)
        atomic_write(self.record, lambda f: f.write(text), mode="w")

    def open_record(self, config, *, mode, overwrite=False, overrides=(), say=print):
        """The config this invocation runs with, after checking it against the record.

        `config` None: the recorded one with `overrides` applied (an error when there is
        none). Otherwise the resolved `config`. Either must agree with the record on every
        field that changes the trained model; with `overwrite`, or while nothing is
        trained yet in a training mode, the record is replaced instead. A workdir without
        a record gets one. With `overwrite` and a `config`, a damaged record is replaced.
        """
        if config is not None and overwrite:
            try:
                recorded = self.read_record()
            except WorkdirError as e:
                say(f"replacing a damaged record, as asked (--overwrite): {e}")
                self.write_record(self.resolve(config))
                return self.resolve(config)
        else:
            recorded = self.read_record()
        if config is None:
            if recorded is None:
                raise ConfigError(f"--workdir {self.path} has no config.json: give --config (it "
                                  "is recorded there when a run starts)")
            say(f"using the config recorded in {self.record}")
            if not overrides:
                return recorded
            config = config_lib.apply_overrides(recorded, overrides)
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


# What to do about a record that cannot be used.
_RECORD_ADVICE = ("restore it, or record the config again with --config FILE --overwrite (the "
                  "checkpoints must still fit it), or start a new --workdir")


def _checksum(recorded):
    """SHA-256 of the canonical JSON of a record (without its checksum)."""
    text = json.dumps(recorded, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _check_types(path, base, recorded, prefix=""):
    """Each recorded value has the type of the project's field (an int for a float, and
    None for an optional field, are accepted); unknown fields are ignored."""
    for key, value in recorded.items():
        if key not in base:
            continue
        field, default = f"{prefix}{key}", base[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise WorkdirError(f"{path}: '{field}' is {value!r}, expected a section (a JSON "
                                   f"object); {_RECORD_ADVICE}")
            _check_types(path, default, value, field + ".")
            continue
        if default is None:   # an optional number (e.g. model.bn_decay)
            if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
                continue
        elif isinstance(default, bool):
            if isinstance(value, bool):
                continue
        elif isinstance(default, float):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                continue
        elif type(value) is type(default):
            continue
        expected = "a number" if default is None else type(default).__name__
        raise WorkdirError(f"{path}: '{field}' is {value!r} ({type(value).__name__}), expected "
                           f"{expected}; {_RECORD_ADVICE}")


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
