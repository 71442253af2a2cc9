"""TFDS builders (manual download) wrapping the raw-layout readers, plus the synthetic set.

`prepare(layout, root, data_dir)` reads the raw folder (`manual_dir`) once, writes TFRecords
with a progress bar, and returns the builder; later calls find the prepared data and reuse it.
Each example is one frame, in protocol order (shuffling disabled): the original encoded bytes
(no re-encoding), its path, tracklet, frame order, camera, within-camera track and pid. The
protocol (query/gallery tracklets, per-tracklet camera/pid/index) is in
`builder.info.metadata`; `dataset_from_tfds(builder)` rebuilds the ReidDataset from it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from upm_jax.data import readers, synthetic
from upm_jax.data.table import FrameTable, ReidDataset

_INSTRUCTIONS = ("Download {name} yourself and pass the extracted folder as manual_dir "
                 "(tfds.download.DownloadConfig(manual_dir=ROOT)); the expected layout is "
                 "described in upm_jax/data/{module}.py.")


@dataclasses.dataclass
class ReidConfig(tfds.core.BuilderConfig):
    """Which protocol split to read (PRID2011/iLIDS-VID) and how."""

    split: int = 1
    split_file: str = ""
    skip_corrupt: bool = False


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    """Parameters of the generated set (see upm_jax.data.synthetic.generate)."""

    layout: str = "prid2011"
    ids: int = 40
    seed: int = 0
    frames: tuple = (8, 16)
    size: tuple = (128, 64)


def _features():
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "path": tfds.features.Text(),
        "tracklet": tfds.features.Scalar(dtype=np.int32),
        "frame": tfds.features.Scalar(dtype=np.int32),
        "camera": tfds.features.Scalar(dtype=np.int32),
        "track": tfds.features.Scalar(dtype=np.int32),
        "pid": tfds.features.Scalar(dtype=np.int32),
    })


def _examples(table):
    camera, track, pid = table.camera, table.track, table.pid
    for i in range(table.num_frames):
        yield i, {"image": table.path[i], "path": table.path[i],
                  "tracklet": int(table.tracklet[i]), "frame": int(table.frame[i]),
                  "camera": int(camera[i]), "track": int(track[i]), "pid": int(pid[i])}


def _store_protocol(metadata, ds):
    metadata.update({
        "layout": ds.layout, "num_cameras": int(ds.num_cameras),
        "query": ds.query.tolist(), "gallery": ds.gallery.tolist(),
        "skipped": [list(s) for s in ds.skipped],
        **{f"{part}_tracklet_{k}": getattr(getattr(ds, part), f"tracklet_{k}").tolist()
           for part in ("train", "test") for k in ("camera", "pid", "index")}})


class _RawReid(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common body: one benchmark layout read from manual_dir."""

    VERSION = tfds.core.Version("1.0.0")
    # Nothing is downloaded, so there is no checksums file to locate; this also keeps TFDS
    # from importing `importlib_resources`, which tensorflow-datasets does not declare.
    code_path = None
    LAYOUT = ""
    BUILDER_CONFIGS = [ReidConfig(name="default")]

    def _info(self):
        return self.dataset_info_from_configs(features=_features(), disable_shuffling=True,
                                              metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        ds = readers.load_dataset(self.LAYOUT, os.fspath(dl_manager.manual_dir), split=cfg.split,
                                  split_file=cfg.split_file or None,
                                  skip_corrupt=cfg.skip_corrupt)
        _store_protocol(self.info.metadata, ds)
        return {"train": _examples(ds.train), "test": _examples(ds.test)}

    def _generate_examples(self, table):
        return _examples(table)


class UpmPrid2011(_RawReid):
    """PRID2011 multi-shot, one official split (manual download)."""

    LAYOUT = "prid2011"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(name="PRID2011", module="prid2011")
    BUILDER_CONFIGS = [ReidConfig(name=f"split{k}", split=k) for k in range(1, 11)]


class UpmIlidsvid(_RawReid):
    """iLIDS-VID, one official split (manual download)."""

    LAYOUT = "ilidsvid"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(name="iLIDS-VID", module="ilidsvid")
    BUILDER_CONFIGS = [ReidConfig(name=f"split{k}", split=k) for k in range(1, 11)]


class UpmMars(_RawReid):
    """MARS with its evaluation info files (manual download)."""

    LAYOUT = "mars"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(name="MARS", module="mars")


class UpmDukev(_RawReid):
    """DukeMTMC-VideoReID (manual download)."""

    LAYOUT = "dukev"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(name="DukeMTMC-VideoReID", module="dukev")


class UpmSynthetic(tfds.core.GeneratorBasedBuilder):
    """A synthetic set generated on preparation (raw tree kept under data_dir/downloads)."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # as _RawReid
    BUILDER_CONFIGS = [SyntheticConfig(name="prid2011_40ids")]

    def _info(self):
        return self.dataset_info_from_configs(features=_features(), disable_shuffling=True,
                                              metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        root = os.path.join(os.fspath(dl_manager.download_dir), "upm_synthetic", cfg.name)
        if not os.path.isdir(root):  # generate() renames a complete tree into place
            synthetic.generate(cfg.layout, root, ids=cfg.ids, seed=cfg.seed,
                               frames=tuple(cfg.frames), size=tuple(cfg.size))
        split_file = os.path.join(root, f"{cfg.layout}_splits.json")
        ds = readers.load_dataset(cfg.layout, root,
                                  split_file=split_file if os.path.isfile(split_file) else None)
        _store_protocol(self.info.metadata, ds)
        return {"train": _examples(ds.train), "test": _examples(ds.test)}

    def _generate_examples(self, table):
        return _examples(table)


BUILDERS = {"prid2011": UpmPrid2011, "ilidsvid": UpmIlidsvid, "mars": UpmMars, "dukev": UpmDukev}


def _config(layout: str, split: int, split_file: str | None, skip_corrupt: bool) -> ReidConfig:
    name = f"split{split}" if layout in ("prid2011", "ilidsvid") else "default"
    if split_file:
        with open(split_file, "rb") as f:
            name += "_" + hashlib.sha1(f.read()).hexdigest()[:10]
    if skip_corrupt:
        name += "_skipcorrupt"
    return ReidConfig(name=name, split=split, split_file=os.path.abspath(split_file) if split_file
                      else "", skip_corrupt=skip_corrupt)


def prepare(layout: str, root: str, data_dir: str, *, split: int = 1,
            split_file: str | None = None, skip_corrupt: bool = False):
    """Prepares (once) and returns the TFDS builder of a raw benchmark folder."""
    if layout not in BUILDERS:
        raise ValueError(f"unknown dataset layout {layout!r}; expected one of {tuple(BUILDERS)}")
    builder = BUILDERS[layout](data_dir=data_dir,
                               config=_config(layout, split, split_file, skip_corrupt))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(root)))
    return builder


def prepare_synthetic(data_dir: str, *, layout: str = "prid2011", ids: int = 40, seed: int = 0,
                      frames=(8, 16), size=(128, 64)):
    """Prepares (once) and returns the TFDS builder of a generated synthetic set."""
    name = f"{layout}_{ids}ids_seed{seed}_f{frames[0]}-{frames[1]}_{size[0]}x{size[1]}"
    builder = UpmSynthetic(data_dir=data_dir,
                           config=SyntheticConfig(name=name, layout=layout, ids=ids, seed=seed,
                                                  frames=tuple(frames), size=tuple(size)))
    builder.download_and_prepare()
    return builder


def dataset_from_tfds(builder) -> ReidDataset:
    """The ReidDataset recorded in a prepared builder (frame paths point at the raw files)."""
    meta = builder.info.metadata
    tables = {}
    for part in ("train", "test"):
        rows = tfds.as_numpy(builder.as_dataset(
            split=part, decoders={"image": tfds.decode.SkipDecoding()}, batch_size=4096))
        cols = {"path": [], "tracklet": [], "frame": []}
        for batch in rows:
            for k in cols:
                cols[k].append(batch[k])
        tables[part] = FrameTable(
            path=np.concatenate(cols["path"]).astype(str),
            tracklet=np.concatenate(cols["tracklet"]).astype(np.int32),
            frame=np.concatenate(cols["frame"]).astype(np.int32),
            tracklet_camera=np.asarray(meta[f"{part}_tracklet_camera"], np.int32),
            tracklet_pid=np.asarray(meta[f"{part}_tracklet_pid"], np.int32),
            tracklet_index=np.asarray(meta[f"{part}_tracklet_index"], np.int32),
            num_cameras=int(meta["num_cameras"]))
    return ReidDataset(layout=meta["layout"], root=os.fspath(builder.data_dir),
                       train=tables["train"], test=tables["test"],
                       query=np.asarray(meta["query"], np.int64),
                       gallery=np.asarray(meta["gallery"], np.int64),
                       num_cameras=int(meta["num_cameras"]),
                       skipped=[tuple(s) for s in meta["skipped"]])
