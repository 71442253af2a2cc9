"""Shared reader for the two-camera benchmarks with person splits (PRID2011, iLIDS-VID).

Reading is three steps: `scan` lists what is on disk (person folders and frames per camera,
whatever protocol applies), `choose_source` decides where the person splits come from (see
`person_splits` for the forms and README "Split files" for the order), and `build` turns
one split into train/test frame tables. Frame counts given by a split file are what the
folder must hold for the listed persons; they are checked over every split of the file, so
a differing person folder can be named.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import numpy as np

from upm_jax.data import common, person_splits
from upm_jax.data.person_splits import SplitSource, SplitSpec
from upm_jax.data.table import DatasetError, ReidDataset, build_table

SPLITS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")
PARTS = person_splits.PARTS
NO_PROTOCOL_HELP = ("set config.data.split_file (--split-file) to a split file listing this "
                    "folder's persons (accepted forms: README, 'Split files'), or use "
                    "config.data.splits=random:SEED (--split random:SEED) for a seeded random "
                    "half/half split of the persons seen by both cameras")


@dataclasses.dataclass(frozen=True)
class TwoCamLayout:
    """What differs between PRID2011 and iLIDS-VID."""

    name: str
    candidates: tuple      # sub-paths of the user's root that may hold the camera folders
    cameras: tuple         # the two camera folder names
    person_re: str         # regex with one group: the numeric person id
    default_split_file: str
    expected: str          # the layout shown in errors
    frame_re: Callable | None = None   # (camera folder, person folder) -> regex for frame names
    own_split_files: tuple = ()        # split files a copy may carry, relative to its folders
    directions: str = "one"            # evaluation: "one" (camera 1 -> 2) or "both" (mean)
    paired_ids: int | None = None      # person ids above this name different people per camera


@dataclasses.dataclass(frozen=True)
class Inventory:
    """What one two-camera folder holds: per camera, person folder -> frame paths."""

    layout: TwoCamLayout
    base: str
    frames: tuple          # per camera: {person folder: [paths in frame order]}

    @property
    def cameras(self) -> tuple:
        return self.layout.cameras

    def persons(self, cam: int) -> list:
        return sorted(self.frames[cam])

    def in_both(self) -> list:
        """Persons with frames in both cameras (the same person: within `paired_ids`)."""
        pattern, limit = re.compile(self.layout.person_re), self.layout.paired_ids
        return sorted(p for p, f in self.frames[0].items() if f and self.frames[1].get(p)
                      and (limit is None or int(pattern.fullmatch(p).group(1)) <= limit))

    def missing(self, source: SplitSource) -> list:
        """camera/person of every person of `source` without a folder on disk."""
        wanted = sorted({p for s in source.splits for part in PARTS for p in getattr(s, part)})
        return [os.path.join(c, p) for c, f in zip(self.cameras, self.frames) for p in wanted
                if p not in f]

    def summary(self) -> dict:
        cams = [{"camera": c + 1, "folder": name, "persons": len(f), "tracklets": len(f),
                 "frames": sum(len(v) for v in f.values())}
                for c, (name, f) in enumerate(zip(self.cameras, self.frames))]
        return {"layout": self.layout.name, "root": self.base, "parts": {"all": cams},
                "persons_in_both_cameras": len(self.in_both())}


def scan(layout: TwoCamLayout, root: str) -> Inventory:
    """Lists every person folder and frame of both cameras (names checked, nothing decoded)."""
    base = common.resolve_root(root, layout.candidates, layout.cameras, layout.name,
                               layout.expected)
    pattern = re.compile(layout.person_re)
    frames = []
    for cam in layout.cameras:
        cam_dir = os.path.join(base, cam)
        persons = common.list_dirs(cam_dir)
        bad = [d for d in persons if not pattern.fullmatch(d)]
        if bad:
            raise DatasetError(f"{cam_dir}: person folders whose id does not parse "
                               f"(expected {layout.person_re}): {common.name_list(bad)}")
        frames.append({p: _person_frames(layout, cam_dir, cam, p) for p in persons})
    return Inventory(layout, base, tuple(frames))


def tracklets_on_disk(layout: TwoCamLayout, root: str) -> tuple:
    """(base folder, {"all": [(camera0, pid, [paths])]}): every person folder of both
    cameras (one tracklet each), cameras in order, persons sorted."""
    inventory = scan(layout, root)
    pattern = re.compile(layout.person_re)
    return inventory.base, {"all": [
        (cam, int(pattern.fullmatch(person).group(1)), frames[person])
        for cam, frames in enumerate(inventory.frames) for person in sorted(frames)]}


def _person_frames(layout: TwoCamLayout, cam_dir: str, cam_name: str, person: str) -> list:
    folder = os.path.join(cam_dir, person)
    names = common.list_images(folder)
    if layout.frame_re is not None:
        pattern = re.compile(layout.frame_re(cam_name, person))
        bad = [n for n in names if not pattern.fullmatch(n)]
        if bad:
            raise DatasetError(f"{folder}: frame names that do not parse: {common.name_list(bad)}")
    return [os.path.join(folder, n) for n in names]


def choose_source(layout: TwoCamLayout, inventory: Inventory, root: str, spec: SplitSpec,
                  split_file: str | None) -> SplitSource:
    """Where the splits come from: random:SEED, else the given file, else the shipped
    official lists when the folder holds their persons, else the folder's own split file."""
    if spec.is_random:
        if split_file:
            raise DatasetError(f"{layout.name}: splits=random:{spec.random_seed} draws its own "
                               f"splits; do not also give a split file ({split_file})")
        return person_splits.random_splits(inventory.in_both(), spec.random_seed,
                                           spec.random_count)
    folders = inventory.persons(0)
    if split_file:
        source = person_splits.read_split_file(split_file, folders)
        _require_persons(layout, inventory, source, "")
        return source
    shipped = person_splits.read_split_file(layout.default_split_file)
    missing = inventory.missing(shipped)
    if not missing:
        return dataclasses.replace(shipped, protocol=f"the official {layout.name} splits shipped "
                                                     f"with upm_jax ({shipped.path})")
    own = person_splits.discover(layout.own_split_files, root, inventory.base)
    if own is None:
        raise DatasetError(
            f"{layout.name}: {inventory.base} does not hold the persons of the official splits "
            f"({shipped.path}): {len(missing)} person folders are missing "
            f"({common.name_list(missing)}), and no split file of its own was found (looked for "
            f"{', '.join(layout.own_split_files)} next to the camera folders and above them); "
            + NO_PROTOCOL_HELP)
    source = person_splits.read_split_file(own, folders)
    _require_persons(layout, inventory, source, " (found next to the data)")
    return dataclasses.replace(source, protocol=f"this folder's own {source.protocol}")


def _require_persons(layout, inventory, source, found):
    missing = inventory.missing(source)
    if missing:
        raise DatasetError(f"{layout.name}: person folders listed in {source.path}{found} are "
                           f"missing under {inventory.base}: {common.name_list(missing)}; "
                           + NO_PROTOCOL_HELP)


def _explain_mismatch(source: SplitSource, counts: dict, cam: int, cam_name: str) -> str:
    """Names the person folders whose counts explain the per-split total differences."""
    lines, residual = [f"{cam_name} (camera{cam + 1}):"], {}
    for s in source.splits:
        for part in PARTS:
            found = sum(counts[p][cam] for p in getattr(s, part))
            want = s.frames[part][f"camera{cam + 1}"]
            if found != want:
                residual[(s.number, part)] = found - want
                lines.append(f"  split {s.number} {part}: {found} frames on disk, {want} expected")
    suspects = None
    for (k, part), _ in residual.items():
        members = set(getattr(source.get(k), part))
        suspects = members if suspects is None else suspects & members
    if suspects:
        deltas = set(residual.values())
        note = (f"  the person folder(s) whose frame count differs (by {deltas.pop():+d}): "
                if len(deltas) == 1 else "  person folders common to every differing total: ")
        lines.append(note + common.name_list(sorted(suspects)))
    else:
        lines.append("  more than one person folder differs; per-person counts on disk: "
                     + common.name_list(f"{p}={c[cam]}" for p, c in sorted(counts.items())))
    return "\n  ".join(lines)


def _check_frame_counts(layout, inventory, source):
    counted = [s for s in source.splits if s.frames is not None]
    if not counted:
        return
    persons = {p for s in counted for part in PARTS for p in getattr(s, part)}
    counts = {p: [len(f[p]) for f in inventory.frames] for p in persons}
    checked = dataclasses.replace(source, splits=tuple(counted))
    problems = [_explain_mismatch(checked, counts, cam, layout.cameras[cam]) for cam in (0, 1)
                if any(sum(counts[p][cam] for p in getattr(s, part)) != s.frames[part][f"camera{cam + 1}"]
                       for s in counted for part in PARTS)]
    if problems:
        raise DatasetError(f"{layout.name}: frame counts under {inventory.base} do not match "
                           f"{source.protocol} (a partial or modified copy?); "
                           + NO_PROTOCOL_HELP + ":\n  " + "\n  ".join(problems))


def build(layout: TwoCamLayout, inventory: Inventory, source: SplitSource,
          number: int) -> ReidDataset:
    """The train/test tables of split `number` of `source`."""
    chosen = source.get(int(number))
    pattern = re.compile(layout.person_re)
    _check_frame_counts(layout, inventory, source)
    empty = [os.path.join(c, p) for part in PARTS for p in getattr(chosen, part)
             for c, f in zip(layout.cameras, inventory.frames) if not f[p]]
    if empty:
        raise DatasetError(f"{layout.name}: person folders without frames under "
                           f"{inventory.base}: {common.name_list(empty)}")

    def table(part):
        tracklets = [(cam, int(pattern.fullmatch(p).group(1)), inventory.frames[cam][p])
                     for cam in (0, 1) for p in getattr(chosen, part)]
        return build_table(tracklets, 2)

    n_test = len(chosen.test)
    return ReidDataset(layout=layout.name, root=inventory.base, train=table("train"),
                       test=table("test"), query=np.arange(n_test),
                       gallery=np.arange(n_test, 2 * n_test), num_cameras=2, split=int(number),
                       protocol=source.protocol, directions=layout.directions)


def train_frames(inventory: Inventory, source: SplitSource, number: int) -> int:
    """Frames on disk of the training persons of split `number` (both cameras)."""
    return sum(len(frames.get(p, ())) for p in source.get(int(number)).train
               for frames in inventory.frames)


def read(layout: TwoCamLayout, root: str, split: int, split_file: str | None,
         splits: str = "1") -> ReidDataset:
    """Reads a two-camera benchmark under split `split` of the source `splits` resolves to."""
    inventory = scan(layout, root)
    source = choose_source(layout, inventory, root, person_splits.parse_spec(splits), split_file)
    return build(layout, inventory, source, split)
