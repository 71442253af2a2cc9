"""Frame tables: the one representation every reader produces and the pipeline consumes.

A `FrameTable` has one row per frame (in protocol order) plus per-tracklet arrays. Tracklets
are numbered globally 0..T-1 in protocol order; each also has a 0-based camera and a 0-based
index within its camera (the anchor row it trains). Person ids are kept for evaluation only:
-1 = junk, 0 = distractor, > 0 = a real identity.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


class DatasetError(ValueError):
    """A dataset folder, split file or image does not match what the reader expects."""


@dataclasses.dataclass(frozen=True)
class FrameTable:
    """Frames of one stream (train or test); numpy arrays, frames grouped by tracklet."""

    path: np.ndarray             # [N] str, absolute image paths
    tracklet: np.ndarray         # [N] int32, global tracklet id 0..T-1
    frame: np.ndarray            # [N] int32, order of the frame within its tracklet
    tracklet_camera: np.ndarray  # [T] int32, 0-based camera
    tracklet_pid: np.ndarray     # [T] int32, person id (-1 junk, 0 distractor)
    tracklet_index: np.ndarray   # [T] int32, 0-based index within its camera
    num_cameras: int

    @property
    def num_frames(self) -> int:
        return int(self.path.shape[0])

    @property
    def num_tracklets(self) -> int:
        return int(self.tracklet_camera.shape[0])

    @property
    def camera(self) -> np.ndarray:
        """[N] int32 camera of each frame."""
        return self.tracklet_camera[self.tracklet]

    @property
    def track(self) -> np.ndarray:
        """[N] int32 tracklet index within the frame's camera (the anchor row)."""
        return self.tracklet_index[self.tracklet]

    @property
    def pid(self) -> np.ndarray:
        """[N] int32 person id of each frame."""
        return self.tracklet_pid[self.tracklet]

    @property
    def tracklets_per_camera(self) -> tuple:
        """Number of tracklets in each camera, length num_cameras."""
        counts = np.bincount(self.tracklet_camera, minlength=self.num_cameras)
        return tuple(int(c) for c in counts)

    def frames_per_tracklet(self) -> np.ndarray:
        """[T] int frame count of each tracklet."""
        return np.bincount(self.tracklet, minlength=self.num_tracklets)

    def select_tracklets(self, keep: np.ndarray) -> "FrameTable":
        """The table restricted to the tracklets where `keep` [T] is true, renumbered."""
        keep = np.asarray(keep, bool)
        new_id = np.full(self.num_tracklets, -1, np.int64)
        new_id[keep] = np.arange(int(keep.sum()))
        rows = keep[self.tracklet]
        cams = self.tracklet_camera[keep]
        index = np.zeros(cams.shape[0], np.int32)
        for c in range(self.num_cameras):
            sel = cams == c
            index[sel] = np.arange(int(sel.sum()))
        return FrameTable(path=self.path[rows], tracklet=new_id[self.tracklet[rows]].astype(np.int32),
                          frame=self.frame[rows], tracklet_camera=cams,
                          tracklet_pid=self.tracklet_pid[keep], tracklet_index=index,
                          num_cameras=self.num_cameras)

    def summary(self) -> dict:
        """Per-camera frame, tracklet and person counts (what the inspection CLI prints)."""
        cams = self.camera
        out = []
        for c in range(self.num_cameras):
            sel = self.tracklet_camera == c
            pids = self.tracklet_pid[sel]
            out.append({"camera": c + 1, "frames": int((cams == c).sum()),
                        "tracklets": int(sel.sum()), "persons": int(np.unique(pids[pids > 0]).size),
                        "distractor_tracklets": int((pids == 0).sum()),
                        "junk_tracklets": int((pids == -1).sum())})
        return {"frames": self.num_frames, "tracklets": self.num_tracklets,
                "persons": int(np.unique(self.tracklet_pid[self.tracklet_pid > 0]).size),
                "cameras": out}


@dataclasses.dataclass(frozen=True)
class ReidDataset:
    """A benchmark read under its protocol: train and test tables, query/gallery tracklets."""

    layout: str
    root: str
    train: FrameTable
    test: FrameTable
    query: np.ndarray    # [Q] int, test tracklet ids used as queries/probes
    gallery: np.ndarray  # [G] int, test tracklet ids forming the gallery
    num_cameras: int
    split: int | None = None
    skipped: list = dataclasses.field(default_factory=list)  # (path, reason)
    protocol: str = ""           # where the split came from, as printed for the user
    directions: str = "one"      # "one": query -> gallery; "both": also gallery -> query, mean
    warnings: tuple = ()         # e.g. a camera without training tracklets

    def summary(self) -> dict:
        return {"layout": self.layout, "root": self.root, "split": self.split,
                "protocol": self.protocol, "directions": self.directions,
                "warnings": list(self.warnings),
                "num_cameras": self.num_cameras, "train": self.train.summary(),
                "test": self.test.summary(), "query": int(self.query.size),
                "gallery": int(self.gallery.size),
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


def build_table(tracklets: Sequence[tuple], num_cameras: int) -> FrameTable:
    """Builds a table from (camera0, pid, [paths in frame order]) in protocol order.

    Tracklet indices within a camera follow the order of appearance.
    """
    paths, track, frame = [], [], []
    cams = np.zeros(len(tracklets), np.int32)
    pids = np.zeros(len(tracklets), np.int32)
    index = np.zeros(len(tracklets), np.int32)
    seen = np.zeros(num_cameras, np.int64)
    for t, (cam, pid, frames) in enumerate(tracklets):
        if not 0 <= cam < num_cameras:
            raise DatasetError(f"tracklet {t}: camera {cam + 1} outside 1..{num_cameras}")
        cams[t], pids[t], index[t] = cam, pid, seen[cam]
        seen[cam] += 1
        paths.extend(frames)
        track.append(np.full(len(frames), t, np.int32))
        frame.append(np.arange(len(frames), dtype=np.int32))
    return FrameTable(path=np.asarray(paths, dtype=str),
                      tracklet=np.concatenate(track) if track else np.zeros(0, np.int32),
                      frame=np.concatenate(frame) if frame else np.zeros(0, np.int32),
                      tracklet_camera=cams, tracklet_pid=pids, tracklet_index=index,
                      num_cameras=num_cameras)


def cameras_without_training(train: FrameTable, layout: str) -> tuple:
    """Warnings naming each camera without training tracklets (it simply gets no anchors)."""
    empty = [c + 1 for c, n in enumerate(train.tracklets_per_camera) if n == 0]
    if not empty:
        return ()
    return (f"{layout}: camera(s) {empty} have no training tracklets; they get no anchors and "
            f"take part in evaluation only (cameras are numbered 1..{train.num_cameras} as on "
            "disk)",)


def per_camera(tracklets: Sequence[tuple]) -> list:
    """Persons, tracklets and frames per 1-based camera of (camera0, pid, frames) tuples,
    for the cameras that appear (pids <= 0, distractors and junk, are not persons)."""
    out = {}
    for cam, pid, frames in tracklets:
        row = out.setdefault(cam, {"camera": cam + 1, "persons": set(), "tracklets": 0,
                                   "frames": 0})
        row["tracklets"] += 1
        row["frames"] += len(frames)
        if pid > 0:
            row["persons"].add(pid)
    return [dict(r, persons=len(r["persons"])) for _, r in sorted(out.items())]
