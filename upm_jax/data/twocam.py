"""Shared reader for the two-camera benchmarks with person splits (PRID2011, iLIDS-VID).

Split files (JSON): {"splits": [{"split": k, "train": [person folders in tracklet-id order],
"test": [...], "train_frames": {"camera1": n, "camera2": n}, "test_frames": {...}}, ...]}.
The frame counts are what the folder must hold for the listed persons; they are checked on
every load, over every split of the file, so a differing person folder can be named.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable

import numpy as np

from upm_jax.data import common
from upm_jax.data.table import DatasetError, ReidDataset, build_table

SPLITS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")
PARTS = ("train", "test")


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


def load_split_file(path: str) -> dict:
    """Reads and validates a split JSON (the official schema)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise DatasetError(f"cannot read split file {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"split file {path} is not valid JSON: {e}") from e
    splits = data.get("splits") if isinstance(data, dict) else None
    if not isinstance(splits, list) or not splits:
        raise DatasetError(f"split file {path}: expected an object with a non-empty 'splits' list")
    for i, s in enumerate(splits):
        where = f"split file {path}, splits[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("split"), int):
            raise DatasetError(f"{where}: expected an object with an integer 'split'")
        for part in PARTS:
            persons = s.get(part)
            if not isinstance(persons, list) or not persons or not all(
                    isinstance(p, str) for p in persons):
                raise DatasetError(f"{where}: '{part}' must be a non-empty list of person folders")
            if len(set(persons)) != len(persons):
                raise DatasetError(f"{where}: '{part}' lists a person twice")
            counts = s.get(f"{part}_frames")
            if (not isinstance(counts, dict) or set(counts) != {"camera1", "camera2"}
                    or not all(isinstance(v, int) for v in counts.values())):
                raise DatasetError(f"{where}: '{part}_frames' must be "
                                   "{\"camera1\": int, \"camera2\": int}")
        both = set(s["train"]) & set(s["test"])
        if both:
            raise DatasetError(f"{where}: persons in both train and test: "
                               f"{common.name_list(sorted(both))}")
    return data


def _select(data: dict, split: int, path: str) -> dict:
    for s in data["splits"]:
        if s["split"] == split:
            return s
    raise DatasetError(f"split file {path} has no split {split}; it has "
                       f"{[s['split'] for s in data['splits']]}")


def _person_frames(layout: TwoCamLayout, cam_dir: str, cam_name: str, person: str) -> list:
    folder = os.path.join(cam_dir, person)
    names = common.list_images(folder)
    if layout.frame_re is not None:
        pattern = re.compile(layout.frame_re(cam_name, person))
        bad = [n for n in names if not pattern.fullmatch(n)]
        if bad:
            raise DatasetError(f"{folder}: frame names that do not parse: {common.name_list(bad)}")
    return [os.path.join(folder, n) for n in names]


def _explain_mismatch(data: dict, counts: dict, cam: int, cam_name: str) -> str:
    """Names the person folders whose counts explain the per-split total differences."""
    lines, residual = [f"{cam_name} (camera{cam + 1}):"], {}
    for s in data["splits"]:
        for part in PARTS:
            found = sum(counts[p][cam] for p in s[part])
            want = s[f"{part}_frames"][f"camera{cam + 1}"]
            if found != want:
                residual[(s["split"], part)] = found - want
                lines.append(f"  split {s['split']} {part}: {found} frames on disk, {want} expected")
    suspects = None
    for (k, part), _ in residual.items():
        members = set(next(s for s in data["splits"] if s["split"] == k)[part])
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


def read(layout: TwoCamLayout, root: str, split: int, split_file: str | None) -> ReidDataset:
    """Reads a two-camera benchmark under one split of its split file."""
    path = split_file or layout.default_split_file
    data = load_split_file(path)
    chosen = _select(data, int(split), path)
    base = common.resolve_root(root, layout.candidates, layout.cameras, layout.name,
                               layout.expected)
    cam_dirs = [os.path.join(base, c) for c in layout.cameras]
    pattern = re.compile(layout.person_re)
    for cam_dir in cam_dirs:
        bad = [d for d in common.list_dirs(cam_dir) if not pattern.fullmatch(d)]
        if bad:
            raise DatasetError(f"{cam_dir}: person folders whose id does not parse "
                               f"(expected {layout.person_re}): {common.name_list(bad)}")
    persons = sorted({p for s in data["splits"] for part in PARTS for p in s[part]})
    unparsable = [p for p in persons if not pattern.fullmatch(p)]
    if unparsable:
        raise DatasetError(f"split file {path}: person names that do not parse as "
                           f"{layout.person_re}: {common.name_list(unparsable)}")
    missing = [os.path.join(cam, p) for cam, d in zip(layout.cameras, cam_dirs) for p in persons
               if not os.path.isdir(os.path.join(d, p))]
    if missing:
        own = [os.path.join(d, f"{layout.name}_splits.json") for d in (root, base)]
        own = [p for p in own if os.path.isfile(p) and os.path.abspath(p) != os.path.abspath(path)]
        hint = f" (this folder has its own split file: {own[0]})" if own else ""
        raise DatasetError(f"{layout.name}: person folders listed in {path} are missing under "
                           f"{base}: {common.name_list(missing)}; for a partial copy or another "
                           f"set, give a split file listing its persons{hint}")
    frames = {p: [_person_frames(layout, d, c, p) for c, d in zip(layout.cameras, cam_dirs)]
              for p in persons}
    empty = [os.path.join(c, p) for p in persons for c, f in zip(layout.cameras, frames[p])
             if not f]
    if empty:
        raise DatasetError(f"{layout.name}: person folders without frames under {base}: "
                           f"{common.name_list(empty)}")
    counts = {p: [len(f) for f in frames[p]] for p in persons}
    problems = [_explain_mismatch(data, counts, cam, layout.cameras[cam]) for cam in (0, 1)
                if any(sum(counts[p][cam] for p in s[part]) != s[f"{part}_frames"][f"camera{cam + 1}"]
                       for s in data["splits"] for part in PARTS)]
    if problems:
        raise DatasetError(f"{layout.name}: frame counts under {base} do not match the split file "
                           f"{path} (a partial or modified copy? give your own split file):\n  "
                           + "\n  ".join(problems))

    def pid(p):
        return int(pattern.fullmatch(p).group(1))

    def table(part):
        tracklets = [(cam, pid(p), frames[p][cam]) for cam in (0, 1) for p in chosen[part]]
        return build_table(tracklets, 2)

    test = table("test")
    n_test = len(chosen["test"])
    return ReidDataset(layout=layout.name, root=base, train=table("train"), test=test,
                       query=np.arange(n_test), gallery=np.arange(n_test, 2 * n_test),
                       num_cameras=2, split=int(split))
