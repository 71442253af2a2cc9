"""Synthetic generator: byte-identical output, layouts the readers accept, a hard raw-pixel baseline."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from upm_jax.data import load_dataset, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest(root):
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            path = os.path.join(d, f)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.mark.parametrize("layout", ["prid2011", "mars"])
def test_generation_is_byte_identical_per_seed(tmp_path, layout):
    kw = dict(ids=6, frames=(2, 3), size=(16, 8))
    a = synthetic.generate(layout, str(tmp_path / "a"), seed=5, num_threads=1, **kw)
    b = synthetic.generate(layout, str(tmp_path / "b"), seed=5, num_threads=3, **kw)
    c = synthetic.generate(layout, str(tmp_path / "c"), seed=6, **kw)
    assert _digest(a["root"]) == _digest(b["root"])
    assert _digest(a["root"]) != _digest(c["root"])
    assert a["frames"] == b["frames"]
    ext = ".png" if layout == "prid2011" else ".jpg"
    assert any(f.endswith(ext) for _, _, fs in os.walk(a["root"]) for f in fs)
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_generate_refuses_to_overwrite_and_validates(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("data")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        synthetic.generate("prid2011", str(out), ids=4)
    with pytest.raises(ValueError, match="ids must be >= 2"):
        synthetic.generate("prid2011", str(tmp_path / "y"), ids=1)
    with pytest.raises(ValueError, match="unknown layout"):
        synthetic.generate("market", str(tmp_path / "y"), ids=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    info = synthetic.generate("ilidsvid", str(empty), ids=2, frames=1, size=(8, 4))
    assert info["frames"] == 4 and os.path.isfile(info["split_file"])
    assert synthetic.split_file(str(empty)) == info["split_file"] == str(empty / "ilidsvid_splits.json")
    assert synthetic.split_file(str(empty), "prid2011") is None


def test_identity_is_fixed_and_cameras_differ():
    a, b = synthetic.identity(0, 3), synthetic.identity(0, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(synthetic.identity(0, 4)["shirt"], a["shirt"])
    c0, c1 = synthetic.camera(0, 0), synthetic.camera(0, 1)
    assert c0["flip"] != c1["flip"] and not np.allclose(c0["gain"], c1["gain"])
    track = synthetic.tracklet(0, (0, 1), 4)
    f0 = synthetic.render(32, 16, a, c0, track, 0, np.random.default_rng(0))
    f1 = synthetic.render(32, 16, a, c0, track, 1, np.random.default_rng(0))
    assert f0.shape == (32, 16, 3) and f0.dtype == np.uint8
    assert 0 < np.abs(f0.astype(int) - f1.astype(int)).mean() < 40  # small motion between frames


def test_raw_pixels_match_poorly_across_cameras(tmp_path):
    info = synthetic.generate("prid2011", str(tmp_path / "r"), ids=100, seed=0, frames=(3, 4),
                              size=(32, 16))
    ds = load_dataset("prid2011", info["root"], split_file=info["split_file"])
    rank1 = synthetic.raw_pixel_rank1(ds)
    assert 0.0 <= rank1 < 30.0  # 50 test ids: chance is 2%
    assert rank1 == synthetic.raw_pixel_rank1(ds)


def test_make_synthetic_cli(tmp_path):
    out = str(tmp_path / "duke")
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_synthetic.py"),
                             "--layout", "dukev", "--out", out, "--ids", "6", "--seed", "1",
                             "--frames", "2,3", "--size", "16x8", "--duke-naming", "old"],
                            capture_output=True, text=True, check=True)
    assert "frames in" in result.stdout
    ds = load_dataset("dukev", out)
    assert ds.num_cameras == 8 and ds.query.size == 3
    bad = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_synthetic.py"),
                          "--layout", "dukev", "--out", out, "--ids", "6"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "refusing to overwrite" in bad.stderr
