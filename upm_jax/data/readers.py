"""`load_dataset`: one entry point over the layout readers."""
from __future__ import annotations

from upm_jax.data import common, dukev, ilidsvid, mars, prid2011
from upm_jax.data.table import DatasetError, ReidDataset

LAYOUTS = ("prid2011", "ilidsvid", "mars", "dukev")


def load_dataset(layout: str, root: str, *, split: int = 1, split_file: str | None = None,
                 skip_corrupt: bool = False) -> ReidDataset:
    """Reads a raw benchmark folder into train/test frame tables under its protocol.

    PRID2011/iLIDS-VID take a 1-based `split` of `split_file` (default: the official file
    shipped in upm_jax/data/splits/). MARS and DukeMTMC-VideoReID have one protocol. With
    `skip_corrupt`, every frame is decoded once and unreadable ones are dropped and listed in
    `ds.skipped`; otherwise an unreadable frame fails when the pipeline decodes it.
    """
    if layout in ("prid2011", "ilidsvid"):
        reader = prid2011 if layout == "prid2011" else ilidsvid
        ds = reader.load(root, split=split, split_file=split_file or None)
    elif layout in ("mars", "dukev"):
        if split_file:
            raise DatasetError(f"{layout}: has a single protocol; split_file={split_file!r} "
                               "applies to prid2011/ilidsvid only")
        if int(split) != 1:
            raise DatasetError(f"{layout}: has a single protocol; split must be 1, got {split}")
        ds = (mars if layout == "mars" else dukev).load(root)
    else:
        raise DatasetError(f"unknown dataset layout {layout!r}; expected one of {LAYOUTS}")
    if skip_corrupt:
        (train, test), skipped = common.screen_corrupt([ds.train, ds.test])
        ds = ReidDataset(layout=ds.layout, root=ds.root, train=train, test=test, query=ds.query,
                         gallery=ds.gallery, num_cameras=ds.num_cameras, split=ds.split,
                         skipped=skipped)
    return ds
