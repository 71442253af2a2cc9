"""Person splits of the two-camera benchmarks: the split specs, every split-file form users
have, the release's own files, seeded random splits, and the default order between them.

Split numbers are 1-based everywhere (CLI, config, workdir `split_K`, results): split K is
the entry with `"split": K` in our JSON, the K-th entry of a list-form JSON (torchreid's
`split_id` K - 1), the K-th row of a `.mat` `ls_set`, or the K-th random draw.

Accepted forms (see README, "Split files"):
  our JSON   {"splits": [{"split": 1, "train": [...], "test": [...],
                          "train_frames": {"camera1": n, "camera2": n}, "test_frames": {...}}]}
             ("split" optional, numbered by position; the frame counts optional, checked when given)
  list JSON  [{"train": [...], "test": [...]}, ...]  (torchreid's splits_prid2011.json; other keys ignored)
  .mat       `ls_set` [S, N]: 1-based indices into the N sorted person folders, first half
             test, second half train (the iLIDS-VID release's train_test_splits_ilidsvid.mat)
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re

import numpy as np
import scipy.io

from upm_jax.data import common
from upm_jax.data.table import DatasetError
from upm_jax.data.tree import LOCAL

PARTS = ("train", "test")
_RANDOM_RE = re.compile(r"random:(\d+)(?::(\d+))?")
SPEC_HELP = ("'all', split numbers such as '3' or '1,2,5' (1-based), or 'random:SEED' / "
             "'random:SEED:COUNT' (seeded random half/half splits of the persons on disk)")


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """A parsed `config.data.splits` / `--split` value."""

    numbers: tuple | None = None   # the chosen split numbers; None = all of the source
    random_seed: int | None = None
    random_count: int = 1

    @property
    def is_random(self) -> bool:
        return self.random_seed is not None


@dataclasses.dataclass(frozen=True)
class PersonSplit:
    """One split: person folders (the same name in both cameras) in tracklet-id order."""

    number: int
    train: tuple
    test: tuple
    frames: dict | None = None    # {"train": {"camera1": n, "camera2": n}, "test": {...}}


@dataclasses.dataclass(frozen=True)
class SplitSource:
    """Where a run's splits come from, and the protocol line printed for the user."""

    splits: tuple                  # PersonSplit, ascending numbers
    protocol: str
    path: str | None = None

    @property
    def numbers(self) -> list:
        return [s.number for s in self.splits]

    def get(self, number: int) -> PersonSplit:
        for s in self.splits:
            if s.number == number:
                return s
        raise DatasetError(f"{self.protocol}: there is no split {number}; it has splits "
                           f"{_number_list(self.numbers)}")


def _number_list(numbers) -> str:
    numbers = list(numbers)
    if numbers == list(range(1, len(numbers) + 1)) and len(numbers) > 2:
        return f"1..{len(numbers)}"
    return ", ".join(str(n) for n in numbers)


def parse_spec(spec, field: str = "splits") -> SplitSpec:
    """Parses 'all', '3', '1,2,5', 'random:SEED' or 'random:SEED:COUNT'; errors name `field`."""
    text = str(spec).strip().lower().replace(" ", "")
    if text == "all":
        return SplitSpec()
    m = _RANDOM_RE.fullmatch(text)
    if m:
        count = int(m.group(2)) if m.group(2) else 1
        if count < 1:
            raise DatasetError(f"{field}={spec!r}: COUNT in random:SEED:COUNT must be >= 1")
        return SplitSpec(random_seed=int(m.group(1)), random_count=count)
    try:
        numbers = tuple(int(s) for s in text.split(","))
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) < 1 or len(set(numbers)) != len(numbers):
        raise DatasetError(f"{field}={spec!r}: expected {SPEC_HELP}")
    return SplitSpec(numbers=numbers)


def select(source: SplitSource, spec: SplitSpec, text: str = "", field: str = "splits") -> list:
    """The split numbers of `source` that `spec` (parsed from `text`) chooses; each must exist."""
    if spec.numbers is None:
        return source.numbers
    missing = [n for n in spec.numbers if n not in source.numbers]
    if missing:
        raise DatasetError(f"{field}={text!r}: split(s) {_number_list(missing)} requested, but "
                           f"{source.protocol} has splits {_number_list(source.numbers)}")
    return list(spec.numbers)


def random_splits(persons, seed: int, count: int) -> SplitSource:
    """`count` seeded half/half splits of `persons` (sorted first; an odd one goes to test).

    Split k is drawn from the generator seeded by (seed, k), so adding splits keeps the
    earlier ones.
    """
    persons = sorted(persons)
    if len(persons) < 2:
        raise DatasetError(f"random:{seed}: needs at least 2 persons seen by both cameras, found "
                           f"{len(persons)}")
    half = len(persons) // 2
    splits = []
    for k in range(1, count + 1):
        order = np.random.default_rng([seed, k]).permutation(len(persons))
        splits.append(PersonSplit(k, tuple(persons[i] for i in order[:half]),
                                  tuple(persons[i] for i in order[half:])))
    return SplitSource(tuple(splits), f"random half/half split(s) seed {seed} of the "
                                      f"{len(persons)} persons seen by both cameras")


def _check_persons(where: str, part: str, persons) -> tuple:
    if (not isinstance(persons, list) or not persons
            or not all(isinstance(p, str) and p for p in persons)):
        raise DatasetError(f"{where}: '{part}' must be a non-empty list of person folder names")
    if len(set(persons)) != len(persons):
        raise DatasetError(f"{where}: '{part}' lists a person twice")
    return tuple(persons)


def _entry(where: str, entry, number: int, with_frames: bool) -> PersonSplit:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object with 'train' and 'test' lists")
    train, test = (_check_persons(where, part, entry.get(part)) for part in PARTS)
    both = set(train) & set(test)
    if both:
        raise DatasetError(f"{where}: persons in both train and test: "
                           f"{common.name_list(sorted(both))}")
    frames = None
    if with_frames and any(f"{part}_frames" in entry for part in PARTS):
        frames = {}
        for part in PARTS:
            counts = entry.get(f"{part}_frames")
            if (not isinstance(counts, dict) or set(counts) != {"camera1", "camera2"}
                    or not all(isinstance(v, int) for v in counts.values())):
                raise DatasetError(f"{where}: '{part}_frames' must be "
                                   "{\"camera1\": int, \"camera2\": int} (or leave out both counts)")
            frames[part] = dict(counts)
    return PersonSplit(number, train, test, frames)


def _from_json(path: str, data) -> tuple:
    if isinstance(data, list):
        if not data:
            raise DatasetError(f"split file {path}: the list of splits is empty")
        return tuple(_entry(f"split file {path}, entry {i} (split {i + 1})", e, i + 1, False)
                     for i, e in enumerate(data)), "list form"
    entries = data.get("splits") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"split file {path}: expected an object with a non-empty 'splits' list "
                           "or a list of {\"train\": [...], \"test\": [...]} objects")
    splits = []
    for i, e in enumerate(entries):
        where = f"split file {path}, splits[{i}]"
        number = e.get("split", i + 1) if isinstance(e, dict) else i + 1
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise DatasetError(f"{where}: 'split' must be an integer >= 1 (splits are 1-based)")
        splits.append(_entry(where, e, number, True))
    numbers = [s.number for s in splits]
    if len(set(numbers)) != len(numbers):
        raise DatasetError(f"split file {path}: split numbers repeat: {numbers}")
    return tuple(sorted(splits, key=lambda s: s.number)), "upm_jax schema"


def _from_mat(path: str, raw: bytes, folders) -> tuple:
    try:
        contents = scipy.io.loadmat(io.BytesIO(raw))
    except Exception as e:  # noqa: BLE001  (scipy raises IndexError, TypeError... on damage)
        raise DatasetError(f"cannot read split file {path} as a MATLAB v5 .mat file (truncated "
                           f"or damaged? {type(e).__name__}: {e})") from None
    if "ls_set" not in contents:
        names = sorted(k for k in contents if not k.startswith("__"))
        raise DatasetError(f"split file {path}: expected a variable 'ls_set' (splits x persons), "
                           f"found {names}")
    ls_set = np.asarray(contents["ls_set"])
    if ls_set.ndim != 2 or ls_set.shape[1] < 2 or ls_set.dtype.kind not in "iuf":
        raise DatasetError(f"split file {path}: 'ls_set' must be a numeric [splits, persons] "
                           f"array, got shape {ls_set.shape} of {ls_set.dtype}")
    n = ls_set.shape[1]
    if len(folders) != n:
        raise DatasetError(f"split file {path}: 'ls_set' indexes {n} sorted person folders, but "
                           f"the first camera holds {len(folders)}; a partial or other set needs a "
                           "split file naming its persons, or splits=random:SEED")
    splits = []
    for k, row in enumerate(ls_set):
        if (row != np.round(row)).any() or sorted(row.astype(np.int64)) != list(range(1, n + 1)):
            raise DatasetError(f"split file {path}: ls_set row {k + 1} is not a permutation of "
                               f"1..{n}")
        idx = sorted(int(i) - 1 for i in row[:n // 2]), sorted(int(i) - 1 for i in row[n // 2:])
        test, train = (tuple(folders[i] for i in part) for part in idx)
        splits.append(PersonSplit(k + 1, train, test))
    return tuple(splits), "release .mat, first half test"


def read_split_file(path: str, folders=(), tree=LOCAL) -> SplitSource:
    """Reads any accepted split file (through `tree`); `folders`: the sorted person folders
    of the first camera, which the indices of a `.mat` refer to."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        raw = tree.read(path)
    except OSError as e:
        raise DatasetError(f"cannot read split file {path}: {e.strerror or e}") from e
    if path.lower().endswith(".mat") or raw.startswith(b"MATLAB"):
        splits, form = _from_mat(path, raw, list(folders))
    else:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"split file {path} is neither JSON nor a MATLAB .mat file: "
                               f"{e}") from e
        splits, form = _from_json(path, data)
    return SplitSource(splits, f"split file {path} ({form})", path)


def discover(names, root: str, base: str, tree=LOCAL):
    """The first of `names` (paths relative to a folder) found in the folder holding the
    cameras, its parents up to the user's root, or the root's parent; else None."""
    root = os.path.abspath(root)
    folders, d = [], os.path.abspath(base)
    while True:
        folders.append(d)
        if d == root or os.path.dirname(d) == d or len(folders) > 4:
            break
        d = os.path.dirname(d)
    folders += [root, os.path.dirname(root)]
    for name in names:
        for folder in dict.fromkeys(folders):
            path = os.path.join(folder, name)
            if tree.isfile(path):
                return path
    return None
