"""PRID2011 multi-shot reader (cam_a = camera 1 / probe, cam_b = camera 2 / gallery).

cam_b holds persons absent from cam_a (and vice versa); only the persons of the split are
read, so those extra folders are ignored. Folders above person_0200 are different people in
the two cameras (as in the release), so random splits draw from persons 1-200 only. The release ships no splits; a copy may carry
torchreid's `splits_prid2011.json` or a `prid2011_splits.json` in our schema.
"""
from __future__ import annotations

import os

from upm_jax.data import twocam
from upm_jax.data.table import ReidDataset

LAYOUT = twocam.TwoCamLayout(
    name="prid2011",
    candidates=("multi_shot", os.path.join("prid_2011", "multi_shot"), ""),
    cameras=("cam_a", "cam_b"),
    person_re=r"person_(\d+)",
    default_split_file=os.path.join(twocam.SPLITS_DIR, "prid2011_splits.json"),
    own_split_files=("prid2011_splits.json", "splits_prid2011.json"),
    paired_ids=200,   # the release: folders 0001-0200 are one person in both cameras
    expected=("  ROOT/multi_shot/cam_a/person_0001/0001.png ...\n"
              "  ROOT/multi_shot/cam_b/person_0001/0001.png ...\n"
              "(ROOT = the extracted prid_2011 folder; ROOT/cam_a, ROOT/cam_b also accepted)"),
)


def load(root: str, *, split: int = 1, split_file: str | None = None,
         splits: str = "1") -> ReidDataset:
    """Reads PRID2011 under split `split` (see `twocam.choose_source` for where from)."""
    return twocam.read(LAYOUT, root, split, split_file, splits)
