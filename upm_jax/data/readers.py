"""`load_dataset` and `resolve_splits`: one entry point over the layout readers.

Each reads the release folder `root` through a file tree (`upm_jax.data.tree`): the disk
by default, or the record a prepared set keeps of the folder (`survey` makes it).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from upm_jax.data import common, dukev, ilidsvid, mars, person_splits, prid2011, twocam
from upm_jax.data.table import DatasetError, ReidDataset
from upm_jax.data.tree import LOCAL

LAYOUTS = ("prid2011", "ilidsvid", "mars", "dukev")
SPLIT_LAYOUTS = ("prid2011", "ilidsvid")
_TWOCAM = {"prid2011": prid2011.LAYOUT, "ilidsvid": ilidsvid.LAYOUT}


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """The splits a run goes through and the protocol they come from (to print)."""

    numbers: list      # 1-based split numbers, in run order
    protocol: str
    available: list    # every split number the source has
    # split number -> its training frames on disk (two-camera layouts; empty for the
    # single-protocol ones): a run pads its resident frames to the largest, so its splits
    # share one compiled training step
    train_frames: dict = dataclasses.field(default_factory=dict)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {layout!r}; expected one of {LAYOUTS}")


def _single_protocol(layout: str, spec: str, split_file: str | None, field="splits") -> None:
    if split_file:
        raise DatasetError(f"{layout}: has a single protocol; split_file={split_file!r} "
                           "applies to prid2011/ilidsvid only")
    parsed = person_splits.parse_spec(spec, field)
    if parsed.is_random or parsed.numbers not in (None, (1,)):
        raise DatasetError(f"{field}={spec!r}: {layout} has a single protocol (split 1); other "
                           "splits apply to prid2011/ilidsvid only")


def resolve_splits(layout: str, root: str, splits="1", split_file: str | None = None, *,
                   field: str = "splits", tree=LOCAL) -> SplitPlan:
    """Resolves a split spec (`config.data.splits`: 'all', '3', '1,2,5', 'random:SEED[:COUNT]')
    against the dataset folder: the split numbers to run and the protocol used.

    PRID2011/iLIDS-VID, with no split file: the official lists shipped with upm_jax when the
    folder holds their persons, else the folder's own split file (the iLIDS-VID release's
    .mat, torchreid's JSON, ours), else an error that names the missing persons and offers
    `split_file` or `random:SEED`. MARS and DukeMTMC-VideoReID have one protocol, split 1.
    Errors about the spec name `field` (e.g. 'config.data.splits').
    """
    _check_layout(layout)
    if layout not in SPLIT_LAYOUTS:
        _single_protocol(layout, splits, split_file, field)
        return SplitPlan([1], f"the single {layout} protocol", [1])
    spec = person_splits.parse_spec(splits, field)
    inventory = twocam.scan(_TWOCAM[layout], root, tree)
    source = twocam.choose_source(_TWOCAM[layout], inventory, root, spec, split_file or None,
                                  tree)
    numbers = person_splits.select(source, spec, str(splits), field)
    return SplitPlan(numbers, source.protocol, source.numbers,
                     {n: twocam.train_frames(inventory, source, n) for n in numbers})


def protocol_frames(layout: str) -> int:
    """Every frame of the protocol's persons (split 1's training and test frames together,
    from the protocol file shipped with upm_jax): the most frames splits trained side by
    side can share. PRID2011 / iLIDS-VID only (DatasetError otherwise)."""
    _check_layout(layout)
    if layout not in SPLIT_LAYOUTS:
        raise DatasetError(f"{layout}: has a single protocol, no splits to train side by side")
    split = person_splits.read_split_file(_TWOCAM[layout].default_split_file).get(1)
    return int(sum(sum(split.frames[part].values()) for part in ("train", "test")))


def check_split_spec(splits, field: str = "splits") -> None:
    """Fails on a split spec no dataset can satisfy (syntax only; no folder is read)."""
    person_splits.parse_spec(splits, field)


def load_dataset(layout: str, root: str, *, split: int = 1, split_file: str | None = None,
                 splits="1", skip_corrupt: bool = False, unreadable=None,
                 tree=LOCAL) -> ReidDataset:
    """Reads a raw benchmark folder into train/test frame tables under its protocol.

    PRID2011/iLIDS-VID take the 1-based `split` of the source that `splits` and `split_file`
    resolve to (see `resolve_splits`; only a 'random:SEED' spec changes the source, numbers
    in it are not needed here). MARS and DukeMTMC-VideoReID have one protocol. With
    `skip_corrupt`, unreadable frames are dropped and listed in `ds.skipped`: those for which
    `unreadable(paths)` gives a reason (a prepared set's record of the frames it skipped),
    by default every frame decoded once; otherwise an unreadable frame fails when the
    pipeline reads it. `tree` answers for the release folder (`upm_jax.data.tree`).
    """
    _check_layout(layout)
    if layout in SPLIT_LAYOUTS:
        ds = twocam.read(_TWOCAM[layout], root, split, split_file or None, splits, tree)
    else:
        _single_protocol(layout, splits, split_file)
        if int(split) != 1:
            raise DatasetError(f"{layout}: has a single protocol; split must be 1, got {split}")
        ds = (mars if layout == "mars" else dukev).load(root, tree)
    if skip_corrupt:
        (train, test), skipped = common.screen_corrupt([ds.train, ds.test],
                                                       unreadable=unreadable)
        ds = dataclasses.replace(ds, train=train, test=test, skipped=skipped)
    return ds


def inspect_disk(layout: str, root: str, tree=LOCAL) -> dict:
    """Cameras, persons, tracklets and frames on disk, whatever protocol applies."""
    _check_layout(layout)
    if layout in SPLIT_LAYOUTS:
        return twocam.scan(_TWOCAM[layout], root, tree).summary()
    return (mars if layout == "mars" else dukev).inventory(root, tree)


def tracklets_on_disk(layout: str, root: str, tree=LOCAL) -> tuple:
    """(base folder, {part: [(camera0, pid, [paths in frame order])]}): every frame of the
    release folder, whatever protocol applies; parts are the release's own folders
    (MARS bbox_train/bbox_test, DukeMTMC-VideoReID train/query/gallery; "all" for the
    two-camera sets, whose splits are person lists)."""
    _check_layout(layout)
    if layout in SPLIT_LAYOUTS:
        return twocam.tracklets_on_disk(_TWOCAM[layout], root, tree)
    return (mars if layout == "mars" else dukev).tracklets_on_disk(root, tree)


def survey(layout: str, root: str, tree) -> None:
    """Asks `tree` everything a run's readers can ask of the release folder `root`: every
    frame listed, and the default protocol built (the folder's split files or MARS's info
    files read). A `tree.Recorder` then holds all a prepared set needs to stand in for the
    folder: the readers' questions depend only on the folder's contents (a random split
    asks less, a split file a config names is the user's own, read from disk), so every
    spec gets the tables, splits and protocol the folder gives. A protocol that does not
    apply is left so: the record gives a run the same error the folder would."""
    tracklets_on_disk(layout, root, tree)
    try:
        load_dataset(layout, root, tree=tree)
    except DatasetError:
        pass


def protocol_training_sets(layout: str, splits="1") -> list:
    """(training frames, tracklets per camera) of each split of `splits` under the protocol
    files shipped with upm_jax, without the dataset (the shapes of an ahead-of-time compile).
    PRID2011 / iLIDS-VID: the official split lists and their frame counts; MARS:
    tracks_train_info.mat. DukeMTMC-VideoReID ships no such file: DatasetError."""
    _check_layout(layout)
    if layout in SPLIT_LAYOUTS:
        source = person_splits.read_split_file(_TWOCAM[layout].default_split_file)
        spec = person_splits.parse_spec(splits)
        if spec.is_random:
            raise DatasetError(f"splits={splits!r}: random splits depend on the folder on disk; "
                               "the shipped protocol has numbered splits only")
        chosen = [source.get(n) for n in (spec.numbers or source.numbers)]
        return [(sum(s.frames["train"].values()), (len(s.train), len(s.train))) for s in chosen]
    if layout == "mars":
        _single_protocol(layout, splits, None)
        info, _ = mars.read_train_info()
        cameras = info[:, 3] - 1   # rows [start, end, pid, camera], 1-based
        return [(int(np.sum(info[:, 1] - info[:, 0] + 1)),
                 tuple(int(n) for n in np.bincount(cameras)))]
    raise DatasetError(f"{layout}: upm_jax ships no protocol file with its training set; "
                       "read it from the dataset folder instead")
