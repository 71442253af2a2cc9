"""Checkpoints: asynchronous saves that survive the donation of the saved arrays, failures
reported with their step, and the SHA-256 checksums that name any damaged file."""
import errno
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from upm_jax import checkpoints as checkpoints_lib
from upm_jax.checkpoints import CHECKSUMS, CheckpointError, Checkpoints, abstract_like


def _state(offset):
    return {"params": {"w": jnp.arange(4096, dtype=jnp.float32) + offset,
                       "b": jnp.full((3, 5), offset, jnp.float32)},
            "step": jnp.asarray(offset, jnp.int32)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints of steps 1 and 2; every saved array is deleted right after its save (as
    the training step's donation does) before the write can have finished."""
    directory = str(tmp_path_factory.mktemp("ck") / "checkpoints")
    checkpoints = Checkpoints(directory, keep=3)
    for step in (1, 2):
        state = _state(step)
        checkpoints.save(step, state)
        for leaf in jax.tree.leaves(state):
            leaf.delete()
    checkpoints.close()
    return directory


def test_async_saves_hold_the_state_of_their_step(saved):
    checkpoints = Checkpoints(saved, read_only=True)
    assert checkpoints.latest_step() == 2
    for step in (1, 2):
        restored = checkpoints.restore(abstract_like(_state(0)), step=step)
        jax.tree.map(np.testing.assert_array_equal, restored, _state(step))
    checkpoints.close()
    manifest = json.load(open(os.path.join(saved, "2", "default", CHECKSUMS)))
    listed = set(manifest["files"])
    assert {"_METADATA", "manifest.ocdbt"} <= listed
    assert any(name.startswith("ocdbt.process_0/d/") for name in listed)
    on_disk = {os.path.relpath(os.path.join(r, n), os.path.join(saved, "2", "default"))
               for r, _, ns in os.walk(os.path.join(saved, "2", "default")) for n in ns}
    # every file orbax wrote before its commit is covered (commit_success.txt comes after)
    assert on_disk - listed == {CHECKSUMS, "commit_success.txt"}


def _damaged_copy(saved, tmp_path, pick, damage):
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(saved, directory)
    item = os.path.join(directory, "2", "default")
    names = sorted(json.load(open(os.path.join(item, CHECKSUMS)))["files"]) + [CHECKSUMS]
    name = pick(names, item)
    damage(os.path.join(item, name))
    return directory, name


def _flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x20
    open(path, "wb").write(bytes(data))


def _alter_one_digest(path):
    """Changes one recorded SHA-256 to another valid one: the file stays well-formed JSON,
    so only its own checksum can tell."""
    manifest = json.load(open(path))
    entry = manifest["files"][sorted(manifest["files"])[0]]
    entry["sha256"] = ("0" if entry["sha256"][0] != "0" else "1") + entry["sha256"][1:]
    open(path, "w").write(json.dumps(manifest))


def _largest_data_file(names, item):
    data = [n for n in names if n.startswith("ocdbt.process_0/d/")]
    return max(data, key=lambda n: os.path.getsize(os.path.join(item, n)))


@pytest.mark.parametrize("pick", [
    lambda names, item: "_METADATA",
    lambda names, item: "_sharding",
    lambda names, item: "manifest.ocdbt",
    lambda names, item: "array_metadatas/process_0",
    _largest_data_file,
], ids=["_METADATA", "_sharding", "manifest.ocdbt", "array_metadatas", "array data"])
def test_a_flipped_bit_in_any_file_is_named_before_anything_is_restored(saved, tmp_path, pick):
    directory, name = _damaged_copy(saved, tmp_path, pick, _flip)
    checkpoints = Checkpoints(directory, read_only=True)
    for restore in (lambda: checkpoints.restore(abstract_like(_state(0))),
                    lambda: checkpoints.restore_inference({"params": abstract_like(
                        _state(0)["params"])})):
        with pytest.raises(CheckpointError, match=(
                rf"the checkpoint {directory}/2 is damaged: default/{name} is damaged \(its "
                r"SHA-256 differs.*delete that folder to use the checkpoint of step 1")):
            restore()
    checkpoints.close()


def test_a_damaged_checksums_file_a_truncated_and_a_missing_file(saved, tmp_path):
    for case, (pick, damage, message) in enumerate([
            (lambda names, item: CHECKSUMS, _alter_one_digest,
             rf"default/{CHECKSUMS} is damaged \(its own checksum does not match\)"),
            (lambda names, item: CHECKSUMS, lambda p: open(p, "r+b").truncate(40),
             rf"default/{CHECKSUMS} is damaged \("),
            (_largest_data_file, lambda p: open(p, "r+b").truncate(10), r"has 10 bytes, \d+ were"),
            (lambda names, item: "_METADATA", os.remove, "default/_METADATA is missing")]):
        directory, _ = _damaged_copy(saved, tmp_path / str(case), pick, damage)
        checkpoints = Checkpoints(directory, read_only=True)
        with pytest.raises(CheckpointError, match=message):
            checkpoints.restore(abstract_like(_state(0)))
        checkpoints.close()


def test_a_checkpoint_without_checksums_is_restored_with_a_warning(saved, tmp_path):
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(saved, directory)
    os.remove(os.path.join(directory, "2", "default", CHECKSUMS))
    checkpoints = Checkpoints(directory, read_only=True)
    with pytest.warns(checkpoints_lib.UnverifiedCheckpointWarning, match="restoring it unverified"):
        restored = checkpoints.restore(abstract_like(_state(0)))
    jax.tree.map(np.testing.assert_array_equal, restored, _state(2))
    checkpoints.close()


def test_a_failed_background_write_names_its_step_and_keeps_the_last_one(saved, tmp_path,
                                                                       monkeypatch):
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(saved, directory)

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints_lib, "write_checksums", full)
    checkpoints = Checkpoints(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoints.save(3, _state(3))   # returns: the write fails in the background
    with pytest.raises(CheckpointError, match=r"checkpoint of step 3 .*No space left on device; "
                                              r"the checkpoint of step 2 is intact"):
        checkpoints.wait()
    checkpoints.close()
    assert checkpoints_lib.latest_saved_step(directory) == 2
