"""DukeMTMC-VideoReID reader: ROOT/{train,query,gallery}/PID/TRACKLET/frames.

The camera of a tracklet comes from its frame names, in either naming of the release:
`0001_C6_F0099_X30823.jpg` or the older `0001C6F0099X30823.jpg`. Tracklets are taken in
(person folder, tracklet folder) order, frames by frame number. Test protocol (paper mode):
the query folder's tracklets are the queries and the gallery is the whole test set
(queries first, then the gallery folder), as the papers' evaluation does.
"""
from __future__ import annotations

import os
import re

import numpy as np

from upm_jax.data import common
from upm_jax.data.table import (DatasetError, ReidDataset, build_table,
                                cameras_without_training, per_camera)

FRAME_RE = re.compile(r"(\d+)_?C(\d+)_?F(\d+)_?X(\d+)\.(?i:jpg|jpeg|png)")
EXPECTED = ("  ROOT/train/0001/0001/0001_C6_F0099_X30823.jpg ...\n"
            "  ROOT/query/PID/TRACKLET/..., ROOT/gallery/PID/TRACKLET/...\n"
            "(ROOT = the extracted DukeMTMC-VideoReID folder; frame names "
            "PPPP_Cc_Ffff_Xxxxxx.jpg or PPPPCcFfffXxxxxx.jpg)")


def read_folder(folder: str) -> list:
    """[(camera0, pid, [paths])] of one of train/query/gallery, in protocol order."""
    out = []
    for pdir in common.list_dirs(folder):
        if not pdir.isdigit():
            raise DatasetError(f"{os.path.join(folder, pdir)}: person folder name is not a number")
        pid = int(pdir)
        for tdir in common.list_dirs(os.path.join(folder, pdir)):
            tpath = os.path.join(folder, pdir, tdir)
            parsed, bad = [], []
            for name in common.list_images(tpath):
                m = FRAME_RE.fullmatch(name)
                if m is None:
                    bad.append(name)
                else:
                    parsed.append((int(m.group(3)), name, int(m.group(1)), int(m.group(2))))
            if bad:
                raise DatasetError(f"{tpath}: frame names that do not parse as "
                                   f"PPPP_Cc_Ffff_Xxxxxx.jpg: {common.name_list(bad)}")
            if not parsed:
                raise DatasetError(f"{tpath}: tracklet folder without frames")
            cams = {c for _, _, _, c in parsed}
            pids = {p for _, _, p, _ in parsed}
            if len(cams) != 1 or pids != {pid} or min(cams) < 1:
                raise DatasetError(f"{tpath}: frames disagree on camera {sorted(cams)} or person "
                                   f"{sorted(pids)} (folder person {pid}); cameras start at 1")
            parsed.sort()
            out.append((cams.pop() - 1, pid, [os.path.join(tpath, n) for _, n, _, _ in parsed]))
    if not out:
        raise DatasetError(f"DukeMTMC-VideoReID: no tracklets under {folder}")
    return out


def load(root: str) -> ReidDataset:
    """Reads DukeMTMC-VideoReID under its official train/query/gallery protocol."""
    base, parts = tracklets_on_disk(root)
    num_cameras = max(c for part in parts.values() for c, _, _ in part) + 1
    train = build_table(parts["train"], num_cameras)
    test = build_table(parts["query"] + parts["gallery"], num_cameras)
    return ReidDataset(layout="dukev", root=base, train=train, test=test,
                       query=np.arange(len(parts["query"])),
                       gallery=np.arange(test.num_tracklets), num_cameras=num_cameras,
                       protocol="the official train/query/gallery folders",
                       warnings=cameras_without_training(train, "DukeMTMC-VideoReID"))


def tracklets_on_disk(root: str) -> tuple:
    """(base folder, {"train" | "query" | "gallery": [(camera0, pid, [paths])]}): every
    tracklet on disk in protocol order."""
    base = common.resolve_root(root, ("", "DukeMTMC-VideoReID"), ("train", "query", "gallery"),
                               "dukev", EXPECTED)
    return base, {p: read_folder(os.path.join(base, p)) for p in ("train", "query", "gallery")}


def inventory(root: str) -> dict:
    """What the train/query/gallery folders hold per camera (the protocol is the folders)."""
    base, parts = tracklets_on_disk(root)
    return {"layout": "dukev", "root": base,
            "parts": {p: per_camera(t) for p, t in parts.items()}}
