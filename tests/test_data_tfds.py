"""TFDS builders: one preparation from a raw (synthetic) folder, reused, same protocol as the reader."""
import shutil

import numpy as np
import tensorflow_datasets as tfds

from upm_jax.data import images, load_dataset, synthetic, tfds_builders


def test_prepare_reads_raw_folder_once_and_keeps_protocol(tmp_path):
    info = synthetic.generate("prid2011", str(tmp_path / "raw"), ids=6, seed=2, frames=(2, 3),
                              size=(16, 8))
    data_dir = str(tmp_path / "tfds")
    builder = tfds_builders.prepare("prid2011", info["root"], data_dir, split=2,
                                    split_file=info["split_file"])
    ref = load_dataset("prid2011", info["root"], split=2, split_file=info["split_file"])
    assert builder.info.splits["train"].num_examples == ref.train.num_frames
    assert builder.info.splits["test"].num_examples == ref.test.num_frames
    got = tfds_builders.dataset_from_tfds(builder)
    for a, b in ((got.train, ref.train), (got.test, ref.test)):
        assert a.path.tolist() == b.path.tolist()  # protocol order survives (no shuffling)
        for k in ("tracklet", "frame", "tracklet_camera", "tracklet_pid", "tracklet_index"):
            assert np.array_equal(getattr(a, k), getattr(b, k))
    assert np.array_equal(got.query, ref.query) and np.array_equal(got.gallery, ref.gallery)
    example = next(iter(tfds.as_numpy(builder.as_dataset(split="test"))))
    assert np.array_equal(example["image"], images.decode(ref.test.path[0]))
    assert example["camera"] == 0 and example["pid"] == ref.test.tracklet_pid[0]
    # a second call finds the prepared data (even with the raw folder gone)
    shutil.rmtree(info["root"] + "/multi_shot")
    again = tfds_builders.prepare("prid2011", info["root"], data_dir, split=2,
                                  split_file=info["split_file"])
    assert again.info.splits["train"].num_examples == ref.train.num_frames


def test_prepare_synthetic_builder(tmp_path):
    builder = tfds_builders.prepare_synthetic(str(tmp_path), layout="mars", ids=6, seed=1,
                                              frames=(2, 2), size=(16, 8))
    ds = tfds_builders.dataset_from_tfds(builder)
    assert ds.layout == "mars" and ds.num_cameras == 6
    assert ds.train.num_frames == builder.info.splits["train"].num_examples
    assert (ds.test.tracklet_pid == -1).any() and (ds.test.tracklet_pid[ds.query] > 0).all()
