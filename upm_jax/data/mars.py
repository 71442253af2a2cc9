"""MARS reader: bbox_train/, bbox_test/ and the evaluation info files.

Frame order and tracklets follow the info files exactly: `train_name.txt` / `test_name.txt`
(read from the user's ROOT/info/) list every frame; `tracks_*_info.mat` rows are
[start, end, pid, camera] (1-based, inclusive, into those lists); `query_IDX.mat` holds the
1-based query rows of `tracks_test_info`. The three .mat files ship in
`upm_jax/data/splits/mars/`; copies in ROOT/info/ take precedence (this is how a synthetic
or custom MARS-layout set brings its own protocol). pid 0 = distractor, -1 = junk (`00-1`).
"""
from __future__ import annotations

import io
import os
import re

import numpy as np
import scipy.io

from upm_jax.data import common
from upm_jax.data.table import (DatasetError, ReidDataset, build_table,
                                cameras_without_training, per_camera)
from upm_jax.data.tree import LOCAL

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits", "mars")
NAME_RE = re.compile(r"(\d{4}|00-1)C(\d)T(\d{4})F(\d{3})\.jpg")
EXPECTED = ("  ROOT/bbox_train/0001/0001C1T0001F001.jpg ...\n"
            "  ROOT/bbox_test/0000/..., ROOT/bbox_test/00-1/..., ROOT/bbox_test/0002/...\n"
            "  ROOT/info/train_name.txt, ROOT/info/test_name.txt\n"
            "  (optional) ROOT/info/tracks_train_info.mat, tracks_test_info.mat, query_IDX.mat")
NAMES_HELP = ("{path} is missing. MARS frame order is defined by the evaluation name lists: "
              "copy train_name.txt and test_name.txt from the 'info' folder of the official "
              "MARS evaluation code (github.com/liangzheng06/MARS-evaluation) into {info}/")


def _read_names(info_dir: str, fname: str, tree=LOCAL) -> list:
    path = os.path.join(info_dir, fname)
    if not tree.isfile(path):
        raise DatasetError(NAMES_HELP.format(path=path, info=info_dir))
    try:
        text = tree.read(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path} as a text file: {e}") from e
    names = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [n for n in names if not NAME_RE.fullmatch(n)]
    if bad:
        raise DatasetError(f"{path}: frame names that do not parse as PPPPCcTttttFfff.jpg: "
                           f"{common.name_list(bad)}")
    return names


def _read_mat(info_dir: str, stem: str, tree=LOCAL) -> tuple:
    """Loads the one array of `stem`.mat from ROOT/info/ if present, else the shipped copy."""
    path = os.path.join(info_dir, stem + ".mat")
    if not tree.isfile(path):
        path, tree = os.path.join(SHIPPED, stem + ".mat"), LOCAL
    try:
        raw = tree.read(path)
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        contents = scipy.io.loadmat(io.BytesIO(raw))
    except Exception as e:  # noqa: BLE001  (scipy raises IndexError, TypeError... on damage)
        raise DatasetError(f"cannot read {path}: not a readable MATLAB file, truncated or "
                           f"damaged ({type(e).__name__}: {e}); copy it again from the MARS "
                           "evaluation code, or delete it to use the copy shipped with "
                           "upm_jax") from None
    arrays = [v for k, v in contents.items() if not k.startswith("__")]
    if len(arrays) != 1:
        raise DatasetError(f"{path}: expected exactly one array, found {len(arrays)}")
    return np.asarray(arrays[0]).astype(np.int64), path


def read_train_info() -> tuple:
    """(tracks_train_info rows [start, end, pid, camera], its path) as shipped with upm_jax."""
    return _read_mat(SHIPPED, "tracks_train_info")


def _tracklets(info: np.ndarray, info_path: str, names: list, folder: str) -> list:
    if info.ndim != 2 or info.shape[1] != 4 or info.shape[0] == 0:
        raise DatasetError(f"{info_path}: expected a non-empty [T, 4] array "
                           f"(start, end, pid, camera), got shape {info.shape}")
    start, end, pid, cam = info.T
    bad = np.flatnonzero((start < 1) | (end < start) | (end > len(names)) | (cam < 1) | (pid < -1))
    if bad.size:
        raise DatasetError(f"{info_path}: rows (1-based) {common.name_list(bad + 1)} are invalid "
                           f"for a name list of {len(names)} frames (need 1 <= start <= end <= "
                           f"{len(names)}, camera >= 1, pid >= -1)")
    out, wrong = [], []
    for t, (s, e, p, c) in enumerate(info):
        frames = names[s - 1:e]
        tag = "00-1" if p == -1 else f"{p:04d}"
        for n in (frames[0], frames[-1]):
            m = NAME_RE.fullmatch(n)
            if m.group(1) != tag or int(m.group(2)) != c:
                wrong.append(f"row {t + 1} ({n}: pid {p}, camera {c})")
                break
        out.append((int(c) - 1, int(p), [os.path.join(folder, n[:4], n) for n in frames]))
    if wrong:
        raise DatasetError(f"{info_path}: rows whose frame names disagree with their pid/camera: "
                           f"{common.name_list(wrong)}")
    return out


def _check_on_disk(folder: str, names: list, tree=LOCAL) -> None:
    wanted = {}
    for n in names:
        wanted.setdefault(n[:4], []).append(n)
    missing = []
    for sub, listed in wanted.items():
        d = os.path.join(folder, sub)
        have = set(common.list_images(d, tree)) if tree.isdir(d) else set()
        missing.extend(os.path.join(sub, n) for n in listed if n not in have)
    if missing:
        raise DatasetError(f"MARS: {len(missing)} frames listed in the name list are missing under "
                           f"{folder}: {common.name_list(missing)}")


def load(root: str, tree=LOCAL) -> ReidDataset:
    """Reads MARS under its single official protocol (the release folder through `tree`)."""
    base = common.resolve_root(root, ("", "MARS"), ("bbox_train", "bbox_test"), "mars", EXPECTED,
                               tree)
    info_dir = os.path.join(base, "info")
    streams = {}
    for part, folder in (("train", "bbox_train"), ("test", "bbox_test")):
        names = _read_names(info_dir, f"{part}_name.txt", tree)
        _check_on_disk(os.path.join(base, folder), names, tree)
        info, info_path = _read_mat(info_dir, f"tracks_{part}_info", tree)
        streams[part] = _tracklets(info, info_path, names, os.path.join(base, folder))
    num_cameras = max(c for part in streams.values() for c, _, _ in part) + 1
    train = build_table(streams["train"], num_cameras)
    test = build_table(streams["test"], num_cameras)
    query, q_path = _read_mat(info_dir, "query_IDX", tree)
    query = query.reshape(-1) - 1
    bad = query[(query < 0) | (query >= test.num_tracklets)]
    if bad.size:
        raise DatasetError(f"{q_path}: query rows {common.name_list(bad + 1)} outside 1.."
                           f"{test.num_tracklets} (tracks_test_info rows)")
    return ReidDataset(layout="mars", root=base, train=train, test=test, query=query,
                       gallery=np.arange(test.num_tracklets), num_cameras=num_cameras,
                       protocol=f"the MARS info files ({os.path.dirname(q_path)})",
                       warnings=cameras_without_training(train, "MARS"))


def tracklets_on_disk(root: str, tree=LOCAL) -> tuple:
    """(base folder, {"bbox_train" | "bbox_test": [(camera0, pid, [paths])]}): every frame
    on disk grouped by tracklet (one person, camera and tracklet number) from the frame names
    alone (no info files needed), tracklets and frames in name order."""
    base = common.resolve_root(root, ("", "MARS"), ("bbox_train", "bbox_test"), "mars", EXPECTED,
                               tree)
    parts = {}
    for folder in ("bbox_train", "bbox_test"):
        tracks, bad = {}, []
        for sub in common.list_dirs(os.path.join(base, folder), tree):
            for name in common.list_images(os.path.join(base, folder, sub), tree):
                m = NAME_RE.fullmatch(name)
                if m is None:
                    bad.append(os.path.join(sub, name))
                    continue
                pid = -1 if m.group(1) == "00-1" else int(m.group(1))
                key = (int(m.group(2)) - 1, pid, int(m.group(3)))
                tracks.setdefault(key, []).append(os.path.join(base, folder, sub, name))
        if bad:
            raise DatasetError(f"{os.path.join(base, folder)}: frame names that do not parse as "
                               f"PPPPCcTttttFfff.jpg: {common.name_list(bad)}")
        parts[folder] = [(c, p, f) for (c, p, _), f in sorted(tracks.items())]
    return base, parts


def inventory(root: str, tree=LOCAL) -> dict:
    """What bbox_train/ and bbox_test/ hold per camera, from the frame names alone (no info
    files needed): a tracklet is one (person, camera, tracklet number)."""
    base, parts = tracklets_on_disk(root, tree)
    return {"layout": "mars", "root": base,
            "parts": {p: per_camera(t) for p, t in parts.items()}}
