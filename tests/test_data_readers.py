"""Readers over tiny synthetic trees in all four raw layouts: indexing, protocols, quirks, errors."""
import json
import os
import re
import shutil

import numpy as np
import pytest

from upm_jax.data import DatasetError, load_dataset, synthetic
from upm_jax.data.__main__ import main as inspect_main

SIZE = (16, 8)
FRAMES = (2, 4)


def _make(factory, layout, ids=8, **kw):
    out = str(factory.mktemp(layout) / "root")
    return synthetic.generate(layout, out, ids=ids, seed=7, frames=FRAMES, size=SIZE, **kw)


@pytest.fixture(scope="module")
def prid(tmp_path_factory):
    return _make(tmp_path_factory, "prid2011")


@pytest.fixture(scope="module")
def ilids(tmp_path_factory):
    return _make(tmp_path_factory, "ilidsvid")


@pytest.fixture(scope="module")
def mars(tmp_path_factory):
    return _make(tmp_path_factory, "mars", ids=10)


@pytest.fixture(scope="module")
def duke(tmp_path_factory):
    return _make(tmp_path_factory, "dukev", ids=10)


def _copy(info, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(info["root"], dst)
    return dst


def _check_table_invariants(table):
    # frames grouped by tracklet, in order, frame order 0..n-1 within each tracklet
    assert np.all(np.diff(table.tracklet) >= 0)
    for t in range(table.num_tracklets):
        assert np.array_equal(table.frame[table.tracklet == t], np.arange((table.tracklet == t).sum()))
    # tracklet_index is 0..N_c-1 per camera in protocol order
    for c in range(table.num_cameras):
        assert np.array_equal(table.tracklet_index[table.tracklet_camera == c],
                              np.arange(table.tracklets_per_camera[c]))
    assert np.array_equal(table.track, table.tracklet_index[table.tracklet])
    assert np.array_equal(table.camera, table.tracklet_camera[table.tracklet])


def test_prid_tables_follow_split_order(prid):
    split = json.load(open(prid["split_file"]))["splits"][2]
    ds = load_dataset("prid2011", prid["root"], split=3, split_file=prid["split_file"])
    assert ds.num_cameras == 2 and ds.split == 3
    for part, table in (("train", ds.train), ("test", ds.test)):
        _check_table_invariants(table)
        persons = split[part]
        n = len(persons)
        assert table.tracklets_per_camera == (n, n)
        pids = [int(p.split("_")[1]) for p in persons]
        # cameras 0 then 1, each in split-list order; the index is the position in the list
        assert table.tracklet_pid.tolist() == pids + pids
        assert table.tracklet_camera.tolist() == [0] * n + [1] * n
        assert table.tracklet_index.tolist() == list(range(n)) * 2
        for cam, cam_dir in ((0, "cam_a"), (1, "cam_b")):
            assert int((table.camera == cam).sum()) == split[f"{part}_frames"][f"camera{cam + 1}"]
        first = table.path[(table.tracklet == 0)]
        assert first[0].endswith(os.path.join("cam_a", persons[0], "0001.png"))
        assert first.tolist() == sorted(first.tolist())
    n_test = len(split["test"])
    assert ds.query.tolist() == list(range(n_test))
    assert ds.gallery.tolist() == list(range(n_test, 2 * n_test))
    assert set(ds.train.tracklet_pid) & set(ds.test.tracklet_pid) == set()


def test_prid_cam_b_only_persons_are_ignored(prid):
    # the generator writes persons 9.. in cam_b (and 9 in cam_a) that are not in the protocol
    cam_a = sorted(os.listdir(os.path.join(prid["root"], "multi_shot", "cam_a")))
    cam_b = sorted(os.listdir(os.path.join(prid["root"], "multi_shot", "cam_b")))
    assert len(cam_b) > len(cam_a) > 8
    ds = load_dataset("prid2011", prid["root"], split_file=prid["split_file"])
    all_pids = set(ds.train.tracklet_pid) | set(ds.test.tracklet_pid)
    assert all_pids == set(range(1, 9))


def test_prid_frame_count_mismatch_names_the_person(prid, tmp_path):
    root = _copy(prid, tmp_path)
    victim = os.path.join(root, "multi_shot", "cam_b", "person_0005")
    os.remove(os.path.join(victim, sorted(os.listdir(victim))[-1]))
    with pytest.raises(DatasetError, match=r"frame counts .* do not match") as e:
        load_dataset("prid2011", root, split_file=os.path.join(root, "prid2011_splits.json"))
    assert "frame count differs (by -1): person_0005" in str(e.value)


def test_prid_missing_person_and_bad_root(prid, tmp_path):
    root = _copy(prid, tmp_path)
    shutil.rmtree(os.path.join(root, "multi_shot", "cam_a", "person_0003"))
    with pytest.raises(DatasetError, match=r"missing under .*cam_a/person_0003"):
        load_dataset("prid2011", root, split_file=os.path.join(root, "prid2011_splits.json"))
    with pytest.raises(DatasetError, match=r"does not exist.*\n.*multi_shot/cam_a/person_0001"):
        load_dataset("prid2011", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"not laid out as expected.*cam_a"):
        load_dataset("prid2011", str(tmp_path))
    # no split file given: the synthetic tree lacks the official persons, so its own file is used
    ds = load_dataset("prid2011", prid["root"])
    assert ds.protocol.startswith("this folder's own split file") and prid["split_file"] in ds.protocol
    os.remove(os.path.join(root, "prid2011_splits.json"))
    with pytest.raises(DatasetError, match=r"does not hold the persons of the official splits") as e:
        load_dataset("prid2011", root)
    assert re.search(r"\d+ person folders are missing \(cam_a/person_\d{4}", str(e.value))
    assert "config.data.split_file" in str(e.value) and "random:SEED" in str(e.value)


def test_prid_unparsable_person_folder(prid, tmp_path):
    root = _copy(prid, tmp_path)
    os.makedirs(os.path.join(root, "multi_shot", "cam_b", "someone_else"))
    with pytest.raises(DatasetError, match=r"id does not parse.*someone_else"):
        load_dataset("prid2011", root, split_file=os.path.join(root, "prid2011_splits.json"))


def test_split_file_errors(prid, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"splits": [{"split": 1, "train": ["person_0001"],
                                           "test": ["person_0002"], "train_frames": {"camera1": 1}}]}))
    with pytest.raises(DatasetError, match=r"'train_frames' must be"):
        load_dataset("prid2011", prid["root"], split_file=str(bad))
    with pytest.raises(DatasetError, match=r"there is no split 11; it has splits 1..10"):
        load_dataset("prid2011", prid["root"], split=11, split_file=prid["split_file"])
    with pytest.raises(DatasetError, match=r"unknown dataset layout 'prid'"):
        load_dataset("prid", prid["root"])


def test_official_split_files_are_consistent():
    for name, n in (("prid2011", 89), ("ilidsvid", 150)):
        path = os.path.join(os.path.dirname(synthetic.__file__), "splits", f"{name}_splits.json")
        data = json.load(open(path))
        assert [s["split"] for s in data["splits"]] == list(range(1, 11))
        for s in data["splits"]:
            assert len(s["train"]) == len(s["test"]) == n
            assert not set(s["train"]) & set(s["test"])


def test_ilids_tables_and_frame_name_check(ilids, tmp_path):
    ds = load_dataset("ilidsvid", ilids["root"], split=2, split_file=ilids["split_file"])
    split = json.load(open(ilids["split_file"]))["splits"][1]
    _check_table_invariants(ds.train)
    assert ds.train.tracklet_pid.tolist() == [int(p[6:]) for p in split["train"]] * 2
    name = os.path.basename(ds.test.path[0])
    assert name.startswith(f"cam1_{split['test'][0]}_")
    root = _copy(ilids, tmp_path)
    folder = os.path.join(root, "sequences", "cam2", "person004")
    first = sorted(os.listdir(folder))[0]
    os.rename(os.path.join(folder, first), os.path.join(folder, "cam1_person004_99999.png"))
    with pytest.raises(DatasetError, match=r"person004: frame names that do not parse.*cam1_person004_99999"):
        load_dataset("ilidsvid", root, split_file=os.path.join(root, "ilidsvid_splits.json"))


def test_mars_protocol_junk_and_distractors(mars):
    ds = load_dataset("mars", mars["root"])
    assert ds.num_cameras == 6 and len(ds.train.tracklets_per_camera) == 6
    assert min(ds.train.tracklets_per_camera) >= 1
    _check_table_invariants(ds.train)
    _check_table_invariants(ds.test)
    names = open(os.path.join(mars["root"], "info", "test_name.txt")).read().split()
    assert [os.path.basename(p) for p in ds.test.path] == names
    assert all(os.path.basename(os.path.dirname(p)) == os.path.basename(p)[:4] for p in ds.test.path)
    # junk (00-1 -> -1) and distractors (0000 -> 0) are test tracklets, in the gallery, never queries
    pid = ds.test.tracklet_pid
    assert (pid == -1).sum() >= 1 and (pid == 0).sum() >= 1
    junk_paths = ds.test.path[ds.test.pid == -1]
    assert all(os.path.basename(os.path.dirname(p)) == "00-1" for p in junk_paths)
    assert ds.gallery.tolist() == list(range(ds.test.num_tracklets))
    assert (pid[ds.query] > 0).all()
    assert set(ds.train.tracklet_pid) & set(pid[pid > 0]) == set()
    # one query per camera of a test person seen by two or more cameras
    for q in ds.query:
        same = (pid == pid[q])
        assert np.unique(ds.test.tracklet_camera[same]).size >= 2
    # tracklet frames follow the info rows
    import scipy.io
    info = scipy.io.loadmat(os.path.join(mars["root"], "info", "tracks_test_info.mat"))["track_test_info"]
    assert ds.test.frames_per_tracklet().tolist() == (info[:, 1] - info[:, 0] + 1).tolist()
    assert ds.test.tracklet_camera.tolist() == (info[:, 3] - 1).tolist()


def test_mars_info_precedence_and_errors(mars, tmp_path):
    root = _copy(mars, tmp_path)
    for stem in ("tracks_train_info", "tracks_test_info", "query_IDX"):
        os.remove(os.path.join(root, "info", stem + ".mat"))
    # without the tree's own .mat files the shipped (real MARS) protocol is used -> clear mismatch
    with pytest.raises(DatasetError, match=r"splits/mars/tracks_train_info.mat: rows"):
        load_dataset("mars", root)
    os.remove(os.path.join(root, "info", "train_name.txt"))
    with pytest.raises(DatasetError, match=r"train_name.txt is missing.*MARS-evaluation"):
        load_dataset("mars", root)
    root2 = str(tmp_path / "copy2")
    shutil.copytree(mars["root"], root2)
    junk_dir = os.path.join(root2, "bbox_test", "00-1")
    os.remove(os.path.join(junk_dir, sorted(os.listdir(junk_dir))[0]))
    with pytest.raises(DatasetError, match=r"1 frames listed .* missing .*00-1/00-1C"):
        load_dataset("mars", root2)
    with pytest.raises(DatasetError, match=r"single protocol"):
        load_dataset("mars", mars["root"], split=2)


def test_dukev_query_gallery_and_cameras(duke):
    ds = load_dataset("dukev", duke["root"])
    assert ds.num_cameras == 8 and min(ds.train.tracklets_per_camera) >= 1
    _check_table_invariants(ds.train)
    _check_table_invariants(ds.test)
    n_query = sum(len(os.listdir(os.path.join(duke["root"], "query", p)))
                  for p in os.listdir(os.path.join(duke["root"], "query")))
    assert ds.query.tolist() == list(range(n_query))
    assert ds.gallery.tolist() == list(range(ds.test.num_tracklets))  # paper mode: queries included
    for t in range(ds.test.num_tracklets):
        paths = ds.test.path[ds.test.tracklet == t]
        cam = int(os.path.basename(paths[0]).split("_")[1][1:])
        assert ds.test.tracklet_camera[t] == cam - 1
        assert ("query" in paths[0]) == (t < n_query)
        frames = [int(os.path.basename(p).split("_")[2][1:]) for p in paths]
        assert frames == sorted(frames)
    # each query's person has gallery tracklets in another camera
    for q in ds.query:
        other = (ds.test.tracklet_pid == ds.test.tracklet_pid[q]) & \
                (ds.test.tracklet_camera != ds.test.tracklet_camera[q])
        assert other.any()


def test_dukev_old_naming_reads_the_same(tmp_path_factory, duke):
    old = _make(tmp_path_factory, "dukev", ids=10, duke_naming="old")
    a, b = load_dataset("dukev", duke["root"]), load_dataset("dukev", old["root"])
    assert os.path.basename(b.train.path[0])[4] == "C"
    for x, y in ((a.train, b.train), (a.test, b.test)):
        assert np.array_equal(x.tracklet, y.tracklet) and np.array_equal(x.frame, y.frame)
        assert np.array_equal(x.tracklet_camera, y.tracklet_camera)
        assert np.array_equal(x.tracklet_pid, y.tracklet_pid)


def test_dukev_errors(duke, tmp_path, capsys):
    root = _copy(duke, tmp_path)
    ds = load_dataset("dukev", root)
    # remove every training tracklet of one camera that also appears in the test set
    cam = int(ds.test.tracklet_camera[0])
    for t in np.flatnonzero(ds.train.tracklet_camera == cam):
        shutil.rmtree(os.path.dirname(ds.train.path[ds.train.tracklet == t][0]))
    partial = load_dataset("dukev", root)  # a camera without training tracklets is fine
    assert partial.num_cameras == ds.num_cameras
    assert partial.train.tracklets_per_camera[cam] == 0
    assert partial.warnings == (f"DukeMTMC-VideoReID: camera(s) [{cam + 1}] have no training "
                                f"tracklets; they get no anchors and take part in evaluation only "
                                f"(cameras are numbered 1..{ds.num_cameras} as on disk)",)
    assert np.array_equal(partial.test.tracklet_camera, ds.test.tracklet_camera)
    assert inspect_main([root, "--layout", "dukev"]) == 0
    assert f"warning: DukeMTMC-VideoReID: camera(s) [{cam + 1}]" in capsys.readouterr().out
    root2 = _copy(duke, tmp_path / "b")
    tdir = os.path.dirname(ds.train.path[0]).replace(root, root2)
    open(os.path.join(tdir, "0001_CX_F1_X1.jpg"), "wb").close()
    with pytest.raises(DatasetError, match=r"do not parse.*0001_CX_F1_X1.jpg"):
        load_dataset("dukev", root2)


def test_corrupt_image_skip_and_report(prid, tmp_path):
    root = _copy(prid, tmp_path)
    split_file = os.path.join(root, "prid2011_splits.json")
    ds = load_dataset("prid2011", root, split_file=split_file)
    bad = ds.train.path[ds.train.tracklet == 2][1]
    with open(bad, "wb") as f:
        f.write(b"not a png")
    from upm_jax.data import images
    with pytest.raises(DatasetError, match=r"cannot decode image .*" + os.path.basename(bad) +
                       r": not an image format Pillow reads; fix or remove the file, or set "
                       r"--config.data.skip_corrupt=True"):
        images.decode(bad)
    skipped = load_dataset("prid2011", root, split_file=split_file, skip_corrupt=True)
    assert [p for p, _ in skipped.skipped] == [bad]
    assert skipped.train.num_frames == ds.train.num_frames - 1
    assert bad not in set(skipped.train.path)
    assert skipped.train.frames_per_tracklet()[2] == ds.train.frames_per_tracklet()[2] - 1
    _check_table_invariants(skipped.train)


def test_a_damaged_mars_mat_file_is_named(mars, tmp_path):
    root = _copy(mars, tmp_path)
    path = os.path.join(root, "info", "query_IDX.mat")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    with pytest.raises(DatasetError, match=re.escape(path) + r": not a readable MATLAB file, "
                                           r"truncated or damaged"):
        load_dataset("mars", root)


def test_a_symbolic_link_loop_in_a_dataset_is_named(prid, tmp_path):
    root = _copy(prid, tmp_path)
    cam = os.path.join(root, "multi_shot", "cam_a")
    os.symlink("loop_b", os.path.join(cam, "loop_a"))
    os.symlink("loop_a", os.path.join(cam, "loop_b"))
    with pytest.raises(DatasetError, match=re.escape(os.path.join(cam, "loop_a")) +
                       r": cannot be followed \(Too many levels of symbolic links\); remove"):
        load_dataset("prid2011", root, split_file=os.path.join(root, "prid2011_splits.json"))


def test_inspection_cli(prid, mars, capsys):
    assert inspect_main([prid["root"], "--layout", "prid2011", "--split-file", prid["split_file"],
                         "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["splits"][0]
    assert summary["train"]["cameras"][0]["tracklets"] == 4
    assert summary["query"] == summary["gallery"] == 4
    assert inspect_main([mars["root"], "--layout", "mars"]) == 0
    text = capsys.readouterr().out
    assert "junk tracklets" in text and "query:" in text and "camera 6:" in text
    assert inspect_main([mars["root"], "--layout", "dukev"]) == 2
    assert "not laid out as expected" in capsys.readouterr().err


def test_shipped_mars_protocol_files_parse():
    # the real MARS info files with name lists rebuilt from their own rows (no images needed)
    from upm_jax.data import mars as mars_reader
    for part in ("train", "test"):
        info, path = mars_reader._read_mat("/nonexistent", f"tracks_{part}_info")
        assert path.endswith(os.path.join("splits", "mars", f"tracks_{part}_info.mat"))
        names = [""] * int(info[:, 1].max())
        for t, (s, e, p, c) in enumerate(info):
            tag = "00-1" if p == -1 else f"{p:04d}"
            names[s - 1:e] = [f"{tag}C{c}T{t % 10000:04d}F{f % 1000:03d}.jpg" for f in range(e - s + 1)]
        tracklets = mars_reader._tracklets(info, path, names, "/x")
        assert len(tracklets) == info.shape[0]
        assert {c for c, _, _ in tracklets} == set(range(6))
        assert sum(len(f) for _, _, f in tracklets) == len(names)
    query, _ = mars_reader._read_mat("/nonexistent", "query_IDX")
    test_info, _ = mars_reader._read_mat("/nonexistent", "tracks_test_info")
    assert query.size == 1980 and query.min() >= 1 and query.max() <= test_info.shape[0]
    assert (test_info[query.ravel() - 1, 2] > 0).all()
