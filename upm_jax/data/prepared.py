"""Prepared datasets: every frame of a benchmark release resized once, stored as a TFDS set.

One builder per benchmark layout (`BUILDERS`: PRID2011, iLIDS-VID, MARS,
DukeMTMC-VideoReID), one builder config per image size. The manual dir is the release
folder as downloaded (what `config.data.root` names); the set holds one record per frame
of the whole release, in one split "frames": the frame resized to (image_size,
image_size // 2) with the input pipeline's own TF1 resize, as raw uint8 bytes, with its
path (relative to the release folder), part (the release's train/test/query/gallery
folder), camera (1-based), person (-1 junk, 0 distractor), tracklet and frame order.
The protocol (which frames train and test, PRID2011/iLIDS-VID's person splits) is chosen
when the set is read, by the same readers as the raw folder, so one set serves every
split. Records are ArrayRecord, uncompressed (the frames barely compress and decompressing
dominated reading), read by random access through TFDS's data source, with no TensorFlow
import.

Unreadable frames are handled as the raw reader handles them: preparing stops at the first
one, naming it, unless asked to skip them; skipped frames are listed in the set's metadata
and a run reading the set leaves them out only under `config.data.skip_corrupt`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import decode as tfds_decode
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core import writer as tfds_writer

from upm_jax.data import images, readers
from upm_jax.data.table import DatasetError

SET_VERSION = "1.0.0"
SPLIT = "frames"
# ShardWriter holds a whole shard in memory: about 0.5 GB of frames per shard.
SHARD_BYTES = 2**29
# Image sizes the builders list (any other even size can be prepared too).
SIZES = (128, 224, 256)

_MANUAL = """\
Download the {name} release and extract it. The manual dir is that folder exactly as
distributed, the one a run's config.data.root names:
{expected}
Prepare with: python -m upm_jax.data prepare --layout {layout} --root FOLDER --image-size 256 --data-dir DIR
"""
_RELEASES = {
    "prid2011": ("PRID2011 (prid_2011.zip)", "  FOLDER/multi_shot/cam_a/person_0001/0001.png ..."),
    "ilidsvid": ("iLIDS-VID (iLIDS-VID.tar)",
                 "  FOLDER/i-LIDS-VID/sequences/cam1/person001/cam1_person001_00317.png ..."),
    "mars": ("MARS (bbox_train.zip, bbox_test.zip, plus the info/ name lists of the MARS "
             "evaluation code)", "  FOLDER/bbox_train/0001/0001C1T0001F001.jpg ...\n"
             "  FOLDER/info/train_name.txt, test_name.txt"),
    "dukev": ("DukeMTMC-VideoReID (DukeMTMC-VideoReID.zip)",
              "  FOLDER/DukeMTMC-VideoReID/train/0001/0001/0001_C6_F0099_X30823.jpg ..."),
}


@dataclasses.dataclass
class FramesConfig(tfds.core.BuilderConfig):
    """Frames resized to (image_size, image_size // 2)."""

    image_size: int = 256


def builder_config(image_size: int) -> FramesConfig:
    """The builder config of one image size (named by it, e.g. "256")."""
    height, width = images.image_shape(image_size)
    return FramesConfig(name=str(image_size), image_size=int(image_size),
                        description=f"every frame resized to {height}x{width}, uint8")


class UncompressedArrayRecordWriter(tfds_writer.ExampleWriter):
    """ArrayRecord with one record per chunk and no compression (TFDS writes brotli, whose
    decompression cost three times the read for frames that barely compress)."""

    OPTIONS = "group_size:1,uncompressed"

    def __init__(self):
        super().__init__(file_format=file_adapters.FileFormat.ARRAY_RECORD)

    def write(self, path, examples):
        from array_record.python import array_record_module  # noqa: PLC0415
        writer = array_record_module.ArrayRecordWriter(os.fspath(path), self.OPTIONS)
        try:
            for _, serialized in examples:
                writer.write(serialized)
        finally:
            writer.close()


@dataclasses.dataclass
class _Frame:
    """One frame of the release: where it is and what it shows."""

    path: str        # absolute, as listed
    relpath: str     # relative to the release folder's base (the reader's root)
    part: str
    camera: int      # 1-based
    person: int
    tracklet: int    # index of the tracklet in the listing
    frame: int       # order within the tracklet


def listing(layout: str, root: str) -> tuple:
    """(base folder, [_Frame]) of every frame of the release, in record order: parts, then
    tracklets, then frames, as the readers list them."""
    base, parts = readers.tracklets_on_disk(layout, root)
    frames, tracklet = [], 0
    for part, tracklets in parts.items():
        for camera, person, paths in tracklets:
            frames.extend(_Frame(p, os.path.relpath(p, base), part, camera + 1, person,
                                 tracklet, f) for f, p in enumerate(paths))
            tracklet += 1
    return base, frames


class _Shard:
    """Yields the examples of one shard (its frames decoded and resized in a thread pool);
    keeps which frames it stored and which it skipped, for the set's metadata."""

    def __init__(self, frames, start, image_size, skip_corrupt, threads):
        self.frames, self.start, self.image_size = frames, start, image_size
        self.skip_corrupt, self.threads = skip_corrupt, threads
        self.stored, self.skipped = [], []

    def _decode(self, frame):
        height, width = images.image_shape(self.image_size)
        try:
            return images.decode_resize(frame.path, height, width), None
        except DatasetError as e:
            if not self.skip_corrupt:
                raise DatasetError(f"{e}; prepare with --skip-corrupt to leave unreadable "
                                   "frames out of the set") from e
            return None, str(e.__cause__ or e)

    def __call__(self):
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            for i, (frame, (image, reason)) in enumerate(
                    zip(self.frames, pool.map(self._decode, self.frames))):
                if image is None:
                    self.skipped.append([frame.relpath, reason])
                    continue
                self.stored.append(frame.relpath)
                yield self.start + i, {"image": image, "path": frame.relpath, "part": frame.part,
                                       "camera": frame.camera, "person": frame.person,
                                       "tracklet": frame.tracklet, "frame": frame.frame}


class _FramesBuilder(tfds.core.ShardBasedBuilder):
    """Every frame of one benchmark release, resized; subclasses name the layout."""

    LAYOUT = ""
    VERSION = tfds.core.Version(SET_VERSION)
    RELEASE_NOTES = {SET_VERSION: "Every frame of the release, TF1-resized, raw uint8."}
    BUILDER_CONFIGS = [builder_config(size) for size in SIZES]

    def __init__(self, *, skip_corrupt=False, threads=None, **kwargs):
        super().__init__(file_format="array_record", **kwargs)
        self._skip_corrupt = bool(skip_corrupt)
        self._threads = threads or min(32, (os.cpu_count() or 1) + 2)

    def _info(self):
        size = self.builder_config.image_size
        height, width = images.image_shape(size)
        return self.dataset_info_from_configs(
            description=f"{_RELEASES[self.LAYOUT][0]}: every frame resized to {height}x{width} "
                        "(TF1 bilinear, no half-pixel centres), one record per frame.",
            features=tfds.features.FeaturesDict({
                # the frame's bytes as they are: no re-encoding, no int64 widening
                "image": tfds.features.Tensor(shape=(height, width, 3), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                "path": tfds.features.Text(),
                "part": tfds.features.Text(),
                "camera": tfds.features.Scalar(dtype=np.int32),
                "person": tfds.features.Scalar(dtype=np.int32),
                "tracklet": tfds.features.Scalar(dtype=np.int32),
                "frame": tfds.features.Scalar(dtype=np.int32),
            }),
            metadata=tfds.core.MetadataDict())

    def _shard_iterators_per_split(self, dl_manager):
        _, frames = listing(self.LAYOUT, os.fspath(dl_manager.manual_dir))
        if not frames:
            raise DatasetError(f"{self.LAYOUT}: no frames under {dl_manager.manual_dir}")
        height, width = images.image_shape(self.builder_config.image_size)
        per_shard = max(64, SHARD_BYTES // (height * width * 3))
        self._shards = [_Shard(frames[s:s + per_shard], s, self.builder_config.image_size,
                               self._skip_corrupt, self._threads)
                        for s in range(0, len(frames), per_shard)]
        return {SPLIT: self._shards}

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config)
        # the shards ran in order in this process: their records are the set's, in order
        self.info.metadata.update(
            layout=self.LAYOUT, image_size=self.builder_config.image_size,
            paths=[p for shard in self._shards for p in shard.stored],
            skipped=[s for shard in self._shards for s in shard.skipped])

    def _example_writer(self):
        return UncompressedArrayRecordWriter()


def _builder(layout: str):
    class Builder(_FramesBuilder):
        LAYOUT = layout
        name = f"upm_{layout}"
        MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL.format(
            name=_RELEASES[layout][0], expected=_RELEASES[layout][1], layout=layout)

    Builder.__name__ = Builder.__qualname__ = f"Upm{layout.capitalize()}Frames"
    Builder.__doc__ = f"{_RELEASES[layout][0]}: every frame of the release, resized."
    return Builder


# layout -> its TFDS builder class (registered with TFDS as upm_<layout>)
BUILDERS = {layout: _builder(layout) for layout in readers.LAYOUTS}


def dataset_dir(data_dir: str, layout: str, image_size: int) -> str:
    """Where the set of `layout` at `image_size` lives under `data_dir`."""
    return os.path.join(data_dir, f"upm_{layout}", str(int(image_size)), SET_VERSION)


def prepare(layout: str, root: str, image_size: int, data_dir: str, *, skip_corrupt=False,
            threads=None) -> dict:
    """Writes the prepared set of the release folder `root` under `data_dir` (a local
    folder, or gs://BUCKET/... : written locally, then copied up). Returns its summary."""
    if layout not in BUILDERS:
        raise DatasetError(f"unknown dataset layout {layout!r}; expected one of "
                           f"{readers.LAYOUTS}")
    images.image_shape(image_size)
    if data_dir.startswith("gs://"):
        remote = _cloud_folder(dataset_dir(data_dir, layout, image_size))   # before any work
        with tempfile.TemporaryDirectory(prefix="upm_prepare_") as local:
            summary = prepare(layout, root, image_size, local, skip_corrupt=skip_corrupt,
                              threads=threads)
            folder = dataset_dir(local, layout, image_size)
            for name in sorted(os.listdir(folder)):
                _epath(os.path.join(folder, name)).copy(remote / name)
        return dict(summary, path=os.fspath(remote))
    target = dataset_dir(data_dir, layout, image_size)
    if os.path.exists(target):
        raise DatasetError(f"{target} already exists; remove it to prepare the set again")
    base, _ = readers.tracklets_on_disk(layout, root)   # a clear error for a wrong folder
    config = str(image_size) if image_size in SIZES else builder_config(image_size)
    builder = BUILDERS[layout](config=config, data_dir=data_dir, skip_corrupt=skip_corrupt,
                               threads=threads)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=base, try_download_gcs=False))
    meta = builder.info.metadata
    return {"layout": layout, "image_size": int(image_size), "path": target,
            "release": base, "frames": len(meta["paths"]), "skipped": list(meta["skipped"]),
            "bytes": sum(os.path.getsize(os.path.join(target, f)) for f in os.listdir(target))}


def _cloud_folder(path: str):
    """The etils.epath Path of a gs:// folder a set is copied to (through gcsfs, so without
    TensorFlow); fails when gcsfs is missing or the folder exists."""
    os.environ.setdefault("EPATH_USE_TF", "false")   # read at the first gs:// path
    try:
        import gcsfs  # noqa: F401, PLC0415  (epath's gs:// backend without TensorFlow)
    except ImportError as e:
        raise DatasetError("--data-dir gs://...: install gcsfs (pip install gcsfs) to copy "
                           "the prepared set to Cloud Storage") from e
    remote = _epath(path)
    if remote.exists():
        raise DatasetError(f"{path} already exists; remove it to prepare the set again")
    return remote


def _epath(path: str):
    """etils.epath.Path(path) (imported on use)."""
    from etils import epath  # noqa: PLC0415
    return epath.Path(path)


class PreparedSet:
    """A prepared set on local disk: the record of each frame path, what was skipped."""

    def __init__(self, data_dir: str, layout: str, image_size: int):
        self.path = dataset_dir(data_dir, layout, image_size)
        if not os.path.isfile(os.path.join(self.path, "dataset_info.json")):
            raise DatasetError(
                f"no prepared {layout} set of image size {image_size} under "
                f"config.data.data_dir={data_dir!r} (looked for {self.path}); prepare it with "
                f"python -m upm_jax.data prepare --layout {layout} --root RELEASE_FOLDER "
                f"--image-size {image_size} --data-dir {data_dir}")
        self.image_size = int(image_size)
        metadata = tfds.builder_from_directory(self.path).info.metadata
        stored = np.asarray(metadata["paths"], dtype=bytes)         # [R] record -> relpath
        self._order = np.argsort(stored, kind="stable")
        self._sorted = stored[self._order]
        self.skipped = {path: reason for path, reason in metadata["skipped"]}

    def _lookup(self, relpaths: np.ndarray) -> np.ndarray:
        """[N] record index of each relative path, -1 where the set has no such frame."""
        at = np.searchsorted(self._sorted, relpaths)
        at = np.minimum(at, len(self._sorted) - 1)
        return np.where(self._sorted[at] == relpaths, self._order[at], -1)

    def _relpaths(self, paths) -> np.ndarray:
        """Table paths relative to the release folder the set was prepared from (found as
        the ancestor of the first path under which it is a stored or skipped frame)."""
        paths = np.asarray(paths, dtype=str)
        if paths.size == 0:
            return np.zeros(0, bytes)
        base = os.path.dirname(paths[0])
        while True:
            rel = os.path.relpath(paths[0], base)
            if self._lookup(np.asarray([rel], bytes))[0] >= 0 or rel in self.skipped:
                break
            if os.path.dirname(base) == base:
                raise DatasetError(f"{paths[0]} is not a frame of the prepared set {self.path} "
                                   "(was it prepared from another release folder?)")
            base = os.path.dirname(base)
        prefix = base.rstrip(os.sep) + os.sep
        outside = [p for p in paths if not p.startswith(prefix)]
        if outside:
            raise DatasetError(f"{outside[0]} is not under {base}, the release folder of the "
                               f"prepared set {self.path}")
        return np.asarray([p[len(prefix):] for p in paths], dtype=bytes)

    def unreadable(self, paths) -> list:
        """[reason or None] for each path: why preparing skipped it, None when stored."""
        return [self.skipped.get(p.decode()) for p in self._relpaths(paths)]

    def records(self, paths) -> np.ndarray:
        """[N] int64 record index of each table path; an error names a missing frame."""
        relpaths = self._relpaths(paths)
        found = self._lookup(relpaths)
        missing = np.flatnonzero(found < 0)
        if missing.size:
            first = relpaths[missing[0]].decode()
            why = (f"preparing skipped it as unreadable ({self.skipped[first]}); set "
                   "config.data.skip_corrupt=True to leave such frames out"
                   if first in self.skipped else "the release folder changed after preparing")
            raise DatasetError(f"{len(missing)} frames of the table are not in the prepared set "
                               f"{self.path}, e.g. {first}: {why}")
        return found.astype(np.int64)

    def frames(self, table) -> "PreparedFrames":
        """The frame source of `table` (its rows' records)."""
        return PreparedFrames(self.path, self.records(table.path), self.image_size)


@functools.lru_cache(maxsize=4)
def open_set(data_dir: str, layout: str, image_size: int) -> PreparedSet:
    """The PreparedSet of a config (opened once per process: its path list is large)."""
    return PreparedSet(data_dir, layout, image_size)


class PreparedFrames:
    """Frame source: table rows -> uint8 [n, H, W, 3] read from a prepared set's records.

    `records` [N] maps table rows to records. The TFDS data source is opened on first use
    in each process (it is not pickled: grain's worker processes open their own).
    """

    def __init__(self, path: str, records: np.ndarray, image_size: int):
        self.path, self.records = path, np.asarray(records, np.int64)
        self.image_shape = images.image_shape(image_size)
        self._source = None

    def __getstate__(self):
        return dict(self.__dict__, _source=None)

    def __len__(self):
        return len(self.records)

    def _records(self):
        if self._source is None:
            self._source = tfds.builder_from_directory(self.path).as_data_source(
                split=SPLIT, deserialize_method=tfds_decode.DeserializeMethod.RAW_BYTES)
        return self._source

    def read(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Writes the frames of table `rows` [n] into `out` (uint8 [n, H, W, 3])."""
        source = self._records()
        size = int(np.prod(out.shape[1:]))
        flat = out.reshape(len(out), size)
        for i, record in enumerate(self.records[rows].tolist()):
            flat[i] = np.frombuffer(example_bytes(source[record], b"image"), np.uint8, size)
        return out


def _varint(buf, pos):
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _field(buf, pos: int, number: int) -> tuple:
    """(start, end) of the length-delimited field `number` whose tag is at buf[pos]."""
    tag, pos = _varint(buf, pos)
    if tag != number << 3 | 2:
        raise DatasetError(f"prepared record: expected field {number} (length-delimited) at "
                           f"byte {pos}, found tag {tag}")
    length, pos = _varint(buf, pos)
    return pos, pos + length


def example_bytes(record: bytes, key: bytes) -> memoryview:
    """The first bytes value of feature `key` in a serialized tf.Example, without a copy.

    Example{features=1: Features{feature=1 (repeated map entry){key=1, value=2: Feature{
    bytes_list=1: BytesList{value=1}}}}}: TFDS's Tensor(encoding=BYTES) stores the array's
    bytes there. Parsing the whole example (TFDS's decoder, protobuf) costs several times
    more than walking to the one field.
    """
    start, end = _field(record, 0, 1)                       # Example.features
    pos = start
    while pos < end:
        entry, entry_end = _field(record, pos, 1)           # one map entry
        key_start, key_end = _field(record, entry, 1)
        if record[key_start:key_end] == key:
            feature, feature_end = _field(record, key_end, 2)
            values, _ = _field(record, feature, 1)          # Feature.bytes_list
            value, value_end = _field(record, values, 1)    # BytesList.value[0]
            return memoryview(record)[value:value_end]
        pos = entry_end
    raise DatasetError(f"prepared record: no bytes feature {key.decode()!r}")
