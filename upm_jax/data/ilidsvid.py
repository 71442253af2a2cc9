"""iLIDS-VID reader (cam1 = camera 1, cam2 = camera 2; evaluated in both directions).

Frames are named `cam1_person001_00317.png`; the camera and person in a frame name must
agree with its folders. The release's own splits, `train-test people splits/
train_test_splits_ilidsvid.mat` next to `i-LIDS-VID/`, are found automatically.
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
    own_split_files=(os.path.join("train-test people splits", "train_test_splits_ilidsvid.mat"),
                     "train_test_splits_ilidsvid.mat", "ilidsvid_splits.json",
                     "splits_ilidsvid.json"),
    directions="both",
    expected=("  ROOT/sequences/cam1/person001/cam1_person001_00317.png ...\n"
              "  ROOT/sequences/cam2/person001/cam2_person001_00317.png ...\n"
              "(ROOT = the extracted i-LIDS-VID folder; ROOT/cam1, ROOT/cam2 also accepted)"),
    frame_re=lambda cam, person: re.escape(f"{cam}_{person}_") + r"\d+\.(?i:png|jpg|jpeg|bmp)",
)


def load(root: str, *, split: int = 1, split_file: str | None = None,
         splits: str = "1") -> ReidDataset:
    """Reads iLIDS-VID under split `split` (see `twocam.choose_source` for where from)."""
    return twocam.read(LAYOUT, root, split, split_file, splits)
