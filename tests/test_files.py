"""The shared file helpers: atomic writes (also when interrupted), the sweep of what a killed
run left, and the CRC-32 check of .npz archives."""
import os
import zipfile

import numpy as np
import pytest

from upm_jax import files


def test_atomic_write_names_the_users_path_and_leaves_nothing_when_interrupted(tmp_path):
    with pytest.raises(OSError, match=rf"cannot write {tmp_path}/nope/r.json: the folder "
                                      rf"{tmp_path}/nope does not exist"):
        files.atomic_write(tmp_path / "nope" / "r.json", lambda f: f.write(b"{}"))

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(tmp_path / "out.npz", interrupted)
    assert os.listdir(tmp_path) == []

    def full(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=rf"cannot write {tmp_path}/out.npz: No space left"):
        files.atomic_write(tmp_path / "out.npz", full)
    assert os.listdir(tmp_path) == []


def test_the_temporaries_a_killed_run_left_are_removed(tmp_path):
    (tmp_path / "split_1" / "lam").mkdir(parents=True)
    (tmp_path / "split_1" / "lam" / ".tmp-abc.npz").write_bytes(b"half")
    (tmp_path / ".tmp-synthetic_prid2011-x" / "cam_a").mkdir(parents=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-orbax-owns-this").write_bytes(b"")
    (tmp_path / "split_1" / "features.npz").write_bytes(b"kept")
    removed = files.remove_temporaries(tmp_path, skip=("checkpoints",))
    assert sorted(os.path.relpath(p, tmp_path) for p in removed) == [
        ".tmp-synthetic_prid2011-x", os.path.join("split_1", "lam", ".tmp-abc.npz")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "split_1"]
    assert os.listdir(tmp_path / "checkpoints") == [".tmp-orbax-owns-this"]


def _member_offset(path, name):
    """Offset of the first byte of member `name`'s data in the zip file `path`."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
    return info.header_offset + 30 + int(name_len) + int(extra_len)


@pytest.mark.parametrize("member", ["a.npy", "b.npy"])
def test_a_flipped_bit_in_any_member_is_named(tmp_path, member):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.arange(1000.0), b=np.ones((50, 3), np.float32))
    files.verify_npz(path)
    data = bytearray(path.read_bytes())
    data[_member_offset(path, member) + 200] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(files.DamagedFileError,
                       match=rf"x.npz: member '{member}' is damaged \(its CRC-32 check fails\); "
                             "do this"):
        files.verify_npz(path, advice="do this")


def test_a_truncated_archive_is_named(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.arange(1000.0))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(files.DamagedFileError, match="x.npz: not a complete .npz archive"):
        files.verify_npz(path)


def test_an_unchanged_verified_archive_is_not_read_again(tmp_path, monkeypatch):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.arange(10.0))
    files.verify_npz(path)
    opened = []
    monkeypatch.setattr(files.zipfile, "ZipFile", lambda *a: opened.append(a) or 1 / 0)
    files.verify_npz(path)
    assert not opened
    os.utime(path, ns=(0, 0))   # changed since: verified again
    with pytest.raises(ZeroDivisionError):
        files.verify_npz(path)
