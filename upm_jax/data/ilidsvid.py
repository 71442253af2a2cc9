"""iLIDS-VID reader (cam1 = camera 1 / probe, cam2 = camera 2 / gallery).

Frames are named `cam1_person001_00317.png`; the camera and person in a frame name must
agree with its folders.
"""
from __future__ import annotations

import os
import re

from upm_jax.data import twocam
from upm_jax.data.table import ReidDataset

LAYOUT = twocam.TwoCamLayout(
    name="ilidsvid",
    candidates=("sequences", os.path.join("i-LIDS-VID", "sequences"), ""),
    cameras=("cam1", "cam2"),
    person_re=r"person(\d+)",
    default_split_file=os.path.join(twocam.SPLITS_DIR, "ilidsvid_splits.json"),
    expected=("  ROOT/sequences/cam1/person001/cam1_person001_00317.png ...\n"
              "  ROOT/sequences/cam2/person001/cam2_person001_00317.png ...\n"
              "(ROOT = the extracted i-LIDS-VID folder; ROOT/cam1, ROOT/cam2 also accepted)"),
    frame_re=lambda cam, person: re.escape(f"{cam}_{person}_") + r"\d+\.(?i:png|jpg|jpeg|bmp)",
)


def load(root: str, *, split: int = 1, split_file: str | None = None) -> ReidDataset:
    """Reads iLIDS-VID under split `split` of `split_file` (default: the official splits)."""
    return twocam.read(LAYOUT, root, split, split_file)
