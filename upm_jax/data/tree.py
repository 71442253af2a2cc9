"""The file tree the dataset readers read: the local disk, or a prepared set's record of a
release folder.

The readers ask a tree four things: whether a path is a folder, whether it is a file, what
a folder holds (its sub-folders and files) and a file's bytes. `LOCAL` answers from the
disk. A `RecordedTree` answers from a `Record` of the answers a release folder gave, with
paths relative to that folder (`..` for the folders above it), mounted at any path, and
asks the disk only what the record does not hold. A prepared set keeps the record a
`Recorder` made while the readers listed every frame of the release and built its default
protocol (split files, MARS's info files): whatever split spec or split file a run then
uses, the readers ask the same questions of the release folder (a split file named by a
config is the user's own file, read from disk), so from the record they build exactly the
tables, splits and protocol the folder gives, on a machine that does not have it. Frames
themselves are never recorded: a prepared set stores them as records.
"""
from __future__ import annotations

import base64
import gzip
import json
import os

from upm_jax.data.table import DatasetError

DIR, FILE, NONE = "dir", "file", "none"


class LocalTree:
    """The local file system."""

    origin = None   # what answers besides the disk (a prepared set's path), for messages

    def kind(self, path: str) -> str:
        """DIR, FILE or NONE (anything else, or nothing, at `path`)."""
        return DIR if os.path.isdir(path) else FILE if os.path.isfile(path) else NONE

    def isdir(self, path: str) -> bool:
        return self.kind(path) == DIR

    def isfile(self, path: str) -> bool:
        return self.kind(path) == FILE

    def listdir(self, folder: str) -> tuple:
        """([sub-folder names], [file names]) of `folder`, sorted, hidden names included;
        OSError when it cannot be listed."""
        dirs, files = [], []
        with os.scandir(folder) as it:
            for entry in it:
                try:   # follows links: one that cannot be followed (a loop) names itself
                    if entry.is_dir():
                        dirs.append(entry.name)
                    elif entry.is_file():
                        files.append(entry.name)
                except OSError as e:
                    raise DatasetError(f"{entry.path}: cannot be followed ({e.strerror}); "
                                       "remove or fix it") from None
        return sorted(dirs), sorted(files)

    def read(self, path: str) -> bytes:
        """The bytes of the file `path`; OSError when it cannot be read."""
        with open(path, "rb") as f:
            return f.read()


LOCAL = LocalTree()


class Record:
    """Answers a release folder gave, keyed by paths relative to it ('.' is the folder,
    '../x' beside it): kinds of paths asked about, listings of folders, bytes of files."""

    def __init__(self, kinds=None, folders=None, contents=None, root: str = ""):
        self.kinds = dict(kinds or {})         # relpath -> DIR | FILE | NONE
        self.folders = dict(folders or {})     # relpath -> ([dirs], [files])
        self.contents = dict(contents or {})   # relpath -> bytes
        self.root = root                       # the folder recorded, as named then

    def kind(self, rel: str) -> str | None:
        """The kind of `rel` if the record knows it (asked, listed, or in a listed
        folder), else None."""
        if rel in self.kinds:
            return self.kinds[rel]
        if rel in self.folders:
            return DIR
        parent, name = os.path.split(rel)
        listing = self.folders.get(parent or ".") if rel != "." else None
        if listing is None:
            return None
        return DIR if name in listing[0] else FILE if name in listing[1] else NONE

    def save(self, path: str) -> None:
        """Writes the record as gzip-compressed JSON (file bytes in base64)."""
        data = {"root": self.root, "kinds": self.kinds,
                "folders": {k: [list(d), list(f)] for k, (d, f) in self.folders.items()},
                "contents": {k: base64.b64encode(v).decode("ascii")
                             for k, v in self.contents.items()}}
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"), sort_keys=True)

    @classmethod
    def load(cls, path: str) -> "Record":
        """The record `save` wrote (ValueError, OSError when it cannot be read)."""
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        return cls(kinds=data["kinds"],
                   folders={k: (tuple(d), tuple(f)) for k, (d, f) in data["folders"].items()},
                   contents={k: base64.b64decode(v) for k, v in data["contents"].items()},
                   root=data["root"])


class RecordedTree(LocalTree):
    """A `Record` mounted at `mount` (the path the readers are given as the release
    folder): paths under and around it are answered from the record where it holds them,
    everything else from the disk."""

    def __init__(self, record: Record, mount: str, origin: str | None = None):
        self.record, self.origin = record, origin
        self.mount = os.path.abspath(os.path.expanduser(mount))

    def _rel(self, path: str) -> str:
        return os.path.relpath(os.path.abspath(path), self.mount)

    # what the record does not hold: the disk's answer (a Recorder also keeps it)
    def _miss_kind(self, rel: str, path: str) -> str:
        return LOCAL.kind(path)

    def _miss_listdir(self, rel: str, folder: str) -> tuple:
        return LOCAL.listdir(folder)

    def _miss_read(self, rel: str, path: str) -> bytes:
        return LOCAL.read(path)

    def kind(self, path: str) -> str:
        rel = self._rel(path)
        known = self.record.kind(rel)
        return self._miss_kind(rel, path) if known is None else known

    def listdir(self, folder: str) -> tuple:
        rel = self._rel(folder)
        listing = self.record.folders.get(rel)
        return self._miss_listdir(rel, folder) if listing is None else listing

    def read(self, path: str) -> bytes:
        rel = self._rel(path)
        data = self.record.contents.get(rel)
        return self._miss_read(rel, path) if data is None else data


class Recorder(RecordedTree):
    """The disk under and around `root`, each answer kept in `record` (and given again
    from there when asked twice)."""

    def __init__(self, root: str):
        root = os.path.abspath(os.path.expanduser(root))
        super().__init__(Record(root=root), root)

    def _miss_kind(self, rel, path):
        self.record.kinds[rel] = kind = LOCAL.kind(path)
        return kind

    def _miss_listdir(self, rel, folder):
        self.record.folders[rel] = listing = LOCAL.listdir(folder)
        return listing

    def _miss_read(self, rel, path):
        self.record.contents[rel] = data = LOCAL.read(path)
        return data
