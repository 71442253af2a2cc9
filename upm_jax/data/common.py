"""Helpers shared by the layout readers: root resolution, listing, corrupt-image screening."""
from __future__ import annotations

import concurrent.futures
import os
from typing import Sequence

import numpy as np

from upm_jax.data import images
from upm_jax.data.table import DatasetError, FrameTable

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def resolve_root(root: str, candidates: Sequence[str], required: Sequence[str], layout: str,
                 expected: str) -> str:
    """Returns the first `root/candidate` holding every `required` sub-folder.

    Raises one error that shows the expected layout when none does.
    """
    if not root:
        raise DatasetError(f"{layout}: no dataset root given; expected a folder laid out as\n"
                           f"{expected}")
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DatasetError(f"{layout}: dataset root {root} does not exist or is not a folder; "
                           f"expected a folder laid out as\n{expected}")
    for cand in candidates:
        base = os.path.join(root, cand) if cand else root
        if all(os.path.isdir(os.path.join(base, r)) for r in required):
            return base
    tried = ", ".join(os.path.join(root, c) if c else root for c in candidates)
    raise DatasetError(f"{layout}: {root} is not laid out as expected (looked for "
                       f"{'/, '.join(required)}/ in {tried}); expected\n{expected}")


def _is(entry, kind: str) -> bool:
    """entry.is_dir() / entry.is_file(), following links; an entry that cannot be followed
    (a symbolic link loop, a permission error) is a DatasetError naming it."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as e:
        raise DatasetError(f"{entry.path}: cannot be followed ({e.strerror}); remove or fix "
                           "it") from None


def list_dirs(folder: str) -> list:
    """Sorted names of the visible sub-folders of `folder`."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and _is(e, "dir"))


def list_images(folder: str) -> list:
    """Sorted names of the image files in `folder` (hidden and non-image files ignored)."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if not e.name.startswith(".")
                      and e.name.lower().endswith(IMAGE_EXTENSIONS) and _is(e, "file"))


def name_list(items: Sequence[str], limit: int = 12) -> str:
    """'a, b, c ... and N more' for error messages."""
    items = list(items)
    head = ", ".join(str(x) for x in items[:limit])
    return head + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _check_image(path: str) -> str | None:
    try:
        images.decode(path)
    except DatasetError as e:
        return str(e.__cause__ or e)
    return None


def screen_corrupt(tables: Sequence[FrameTable], num_threads: int | None = None,
                   unreadable=None):
    """Returns (tables without unreadable frames, [(path, reason)]).

    `unreadable(paths)` gives each path's reason, or None for a readable frame; by default
    every frame is decoded. A tracklet whose frames are all unreadable is an error naming
    it (its anchor would be empty).
    """
    threads = num_threads or min(32, (os.cpu_count() or 1) * 2)
    out, skipped = [], []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        if unreadable is None:
            def unreadable(paths):
                return list(pool.map(_check_image, paths, chunksize=64))
        for table in tables:
            reasons = unreadable(table.path)
            bad = np.array([r is not None for r in reasons], bool)
            skipped.extend((p, r) for p, r in zip(table.path[bad], np.asarray(reasons, object)[bad]))
            if not bad.any():
                out.append(table)
                continue
            good = ~bad
            left = np.bincount(table.tracklet[good], minlength=table.num_tracklets)
            empty = np.flatnonzero(left == 0)
            if empty.size:
                first = [table.path[table.tracklet == t][0] for t in empty]
                raise DatasetError("every frame unreadable in the tracklets of "
                                   + name_list(os.path.dirname(p) for p in first))
            frame = np.zeros(int(good.sum()), np.int32)
            kept_track = table.tracklet[good]
            starts = np.r_[0, np.flatnonzero(np.diff(kept_track)) + 1]
            lengths = np.diff(np.r_[starts, kept_track.size])
            frame[:] = np.arange(kept_track.size) - np.repeat(starts, lengths)
            out.append(FrameTable(path=table.path[good], tracklet=kept_track, frame=frame,
                                  tracklet_camera=table.tracklet_camera,
                                  tracklet_pid=table.tracklet_pid,
                                  tracklet_index=table.tracklet_index,
                                  num_cameras=table.num_cameras))
    return out, skipped
