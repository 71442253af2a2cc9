"""Split sources: every split-file form, the folder's own files, random:SEED, the default
order, numbering, and the inspection CLI on folders no protocol fits."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.io

from upm_jax.data import DatasetError, load_dataset, prid2011, resolve_splits, synthetic, twocam
from upm_jax.data.__main__ import main as inspect_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prid(tmp_path_factory):
    return synthetic.generate("prid2011", str(tmp_path_factory.mktemp("p") / "root"), ids=8,
                              seed=3, frames=(1, 2), size=(8, 4))


@pytest.fixture(scope="module")
def ilids_release(tmp_path_factory):
    """iLIDS-VID laid out as the release: X/i-LIDS-VID/sequences, X/train-test people splits."""
    top = tmp_path_factory.mktemp("release")
    info = synthetic.generate("ilidsvid", str(top / "i-LIDS-VID"), ids=8, seed=4, frames=(1, 2),
                              size=(8, 4))
    os.remove(info["split_file"])
    rng = np.random.default_rng(0)
    ls_set = np.stack([rng.permutation(8) + 1 for _ in range(10)]).astype(np.float64)
    os.makedirs(top / "train-test people splits")
    scipy.io.savemat(str(top / "train-test people splits" / "train_test_splits_ilidsvid.mat"),
                     {"ls_set": ls_set})
    return str(top), ls_set


def _persons(table):
    return sorted({int(p) for p in table.tracklet_pid})


def test_torchreid_list_form_and_counts_optional(prid, tmp_path):
    ours = json.load(open(prid["split_file"]))["splits"]
    listed = tmp_path / "splits_prid2011.json"
    listed.write_text(json.dumps([{"train": s["train"], "test": s["test"], "extra": 1} for s in ours]))
    plain = tmp_path / "no_counts.json"
    plain.write_text(json.dumps({"splits": [{"train": s["train"], "test": s["test"]} for s in ours]}))
    ref = load_dataset("prid2011", prid["root"], split=4, split_file=prid["split_file"])
    for path in (listed, plain):
        ds = load_dataset("prid2011", prid["root"], split=4, split_file=str(path))
        assert ds.train.path.tolist() == ref.train.path.tolist()  # list entry 4 = split 4
        assert ds.test.tracklet_pid.tolist() == ref.test.tracklet_pid.tolist()
    assert "list form" in load_dataset("prid2011", prid["root"], split_file=str(listed)).protocol
    plan = resolve_splits("prid2011", prid["root"], "all", str(listed))
    assert plan.numbers == plan.available == list(range(1, 11))


def test_ilids_release_mat_is_found_and_read(ilids_release):
    top, ls_set = ilids_release
    plan = resolve_splits("ilidsvid", top, "all")
    assert plan.numbers == list(range(1, 11))
    assert "train_test_splits_ilidsvid.mat" in plan.protocol and "this folder's own" in plan.protocol
    ds = load_dataset("ilidsvid", top, split=3)
    # persons are person001..person008: index i is person i; first half test, second train
    assert _persons(ds.test) == sorted(int(i) for i in ls_set[2, :4])
    assert _persons(ds.train) == sorted(int(i) for i in ls_set[2, 4:])
    assert ds.directions == "both" and ds.split == 3
    given = load_dataset("ilidsvid", os.path.join(top, "i-LIDS-VID"), split=3,
                         split_file=os.path.join(top, "train-test people splits",
                                                 "train_test_splits_ilidsvid.mat"))
    assert given.test.path.tolist() == ds.test.path.tolist()


def test_mat_for_another_person_count_is_refused(ilids_release, tmp_path):
    top, _ = ilids_release
    bad = tmp_path / "other.mat"
    scipy.io.savemat(str(bad), {"ls_set": np.arange(1, 11)[None, :]})
    with pytest.raises(DatasetError, match=r"indexes 10 sorted person folders, but the first "
                                           r"camera holds 8"):
        load_dataset("ilidsvid", top, split_file=str(bad))
    scipy.io.savemat(str(bad), {"splits": np.ones((2, 2))})
    with pytest.raises(DatasetError, match=r"expected a variable 'ls_set'"):
        load_dataset("ilidsvid", top, split_file=str(bad))
    bad.write_bytes(b"\xff\xfe not a mat file")
    with pytest.raises(DatasetError, match=r"cannot read split file .* as a MATLAB v5 .mat"):
        load_dataset("ilidsvid", top, split_file=str(bad))
    other = tmp_path / "other.json"
    other.write_bytes(b"\xff\xfe not json")
    with pytest.raises(DatasetError, match=r"neither JSON nor a MATLAB .mat"):
        load_dataset("ilidsvid", top, split_file=str(other))


def test_random_splits_are_seeded_halves_of_the_persons(prid):
    plan = resolve_splits("prid2011", prid["root"], "random:5:3")
    assert plan.numbers == [1, 2, 3] and "seed 5" in plan.protocol
    a = load_dataset("prid2011", prid["root"], split=2, splits="random:5:3")
    again = load_dataset("prid2011", prid["root"], split=2, splits="random:5:5")
    other = load_dataset("prid2011", prid["root"], split=2, splits="random:6:3")
    # the 8 protocol persons are in both cameras; the extra single-camera persons are not drawn
    assert len(_persons(a.train)) == len(_persons(a.test)) == 4
    assert sorted(_persons(a.train) + _persons(a.test)) == list(range(1, 9))
    assert again.train.path.tolist() == a.train.path.tolist()  # more splits keep the earlier ones
    assert other.train.path.tolist() != a.train.path.tolist()
    with pytest.raises(DatasetError, match=r"do not also give a split file"):
        resolve_splits("prid2011", prid["root"], "random:5", prid["split_file"])


def test_spec_errors_name_the_field(prid):
    for spec, message in (("0", r"config.data.splits='0': expected 'all', split numbers"),
                          ("1,x", r"config.data.splits='1,x': expected"),
                          ("11", r"config.data.splits='11': split\(s\) 11 requested, but .* has "
                                 r"splits 1..10")):
        with pytest.raises(DatasetError, match=message):
            resolve_splits("prid2011", prid["root"], spec, field="config.data.splits")
    assert resolve_splits("prid2011", prid["root"], "3,1").numbers == [3, 1]
    with pytest.raises(DatasetError, match=r"mars has a single protocol"):
        resolve_splits("mars", prid["root"], "2")


def test_shipped_lists_win_when_the_folder_holds_their_persons(prid, tmp_path):
    # stand-in for the shipped file: the synthetic tree's own lists; the folder's own file differs
    shipped = dataclasses.replace(prid2011.LAYOUT, default_split_file=prid["split_file"])
    root = str(tmp_path / "copy")
    shutil.copytree(prid["root"], root)
    ours = json.load(open(prid["split_file"]))["splits"]
    with open(os.path.join(root, "prid2011_splits.json"), "w") as f:
        json.dump([{"train": s["test"], "test": s["train"]} for s in ours], f)
    ds = twocam.read(shipped, root, 1, None)
    assert ds.protocol.startswith("the official prid2011 splits shipped with upm_jax")
    assert _persons(ds.test) == sorted(int(p[7:]) for p in ours[0]["test"])
    own = twocam.read(prid2011.LAYOUT, root, 1, None)  # the real shipped lists do not fit
    assert own.protocol.startswith("this folder's own split file")
    assert _persons(own.test) == sorted(int(p[7:]) for p in ours[0]["train"])


def test_inspection_reports_disk_when_no_protocol_applies(prid, tmp_path, capsys):
    root = str(tmp_path / "custom")
    shutil.copytree(prid["root"], root)
    os.remove(os.path.join(root, "prid2011_splits.json"))
    assert inspect_main([root, "--layout", "prid2011"]) == 2
    captured = capsys.readouterr()
    cam_b = len(os.listdir(os.path.join(root, "multi_shot", "cam_b")))
    assert f"camera 2 (cam_b): {cam_b} persons, {cam_b} tracklets" in captured.out
    assert "persons seen by both cameras: 8" in captured.out
    assert "does not hold the persons of the official splits" in captured.err
    assert inspect_main([root, "--layout", "prid2011", "--split", "random:1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"]["selected"] == [1] and out["splits"][0]["query"] == 4
    assert inspect_main([root, "--layout", "prid2011", "--split", "0"]) == 2
    assert "--split='0'" in capsys.readouterr().err


def test_inspection_json_into_head_has_no_traceback(prid):
    base = f"{sys.executable} -m upm_jax.data {prid['root']} --layout prid2011 --split all --json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    head = subprocess.run(["bash", "-c", base + " | head -2"], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    assert head.stdout.splitlines() == ["{", ' "disk": {']
    # `| true` closes the pipe before anything is written: a broken pipe, never a traceback
    closed = subprocess.run(["bash", "-o", "pipefail", "-c", base + " | true"],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    assert closed.returncode == 0 and closed.stderr == "", closed.stderr


def test_features_file_says_how_the_split_is_scored(prid, ilids_release):
    from upm_jax import extract
    for layout, root, want in (("prid2011", prid["root"], "one"),
                               ("ilidsvid", ilids_release[0], "both")):
        ds = load_dataset(layout, root)
        arrays = extract.protocol_arrays(ds, pooling="max")
        assert str(arrays["directions"]) == want
        assert arrays["cam"].tolist() == [1] * (ds.test.num_tracklets // 2) + [2] * (ds.test.num_tracklets // 2)
