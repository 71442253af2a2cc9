"""Extraction streams every test frame into the features file, with its montage paths file,
and warns when the features are degenerate."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from upm_jax import extract, parallel
from upm_jax.data import FrameTable, RawFrames
from upm_jax.evaluation import DegenerateFeaturesWarning, load_features, montage_paths_file


class MeanColour(nn.Module):
    """A stand-in model: [B, 2, 3] features from each image's mean colour."""

    @nn.compact
    def __call__(self, images, train=False):
        return nn.Dense(6)(images.mean(axis=(1, 2))).reshape(-1, 2, 3)


def _dataset(tmp_path, same_images):
    """10 frames in 4 tracklets (2 cameras) of 32x16 PNGs; frame order reversed on disk."""
    rng = np.random.default_rng(0)
    tracklet = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3], np.int32)
    frame = np.array([2, 1, 0, 0, 1, 3, 2, 1, 0, 0], np.int32)
    paths = []
    for i in range(10):
        pixels = np.full((32, 16, 3), 128, np.uint8) if same_images else rng.integers(
            0, 256, (32, 16, 3), dtype=np.uint8)
        paths.append(str(tmp_path / f"f{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    table = FrameTable(path=np.array(paths), tracklet=tracklet, frame=frame,
                       tracklet_camera=np.array([0, 1, 0, 1], np.int32),
                       tracklet_pid=np.array([1, 1, 2, 2], np.int32),
                       tracklet_index=np.array([0, 0, 1, 1], np.int32), num_cameras=2)
    return types.SimpleNamespace(test=table, query=np.array([0, 2]), gallery=np.array([1, 3]),
                                 directions="one")


def _extract(tmp_path, same_images):
    dataset = _dataset(tmp_path, same_images)
    model = MeanColour()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 16, 3)))
    mesh = parallel.make_mesh()
    path = str(tmp_path / "features.npz")
    frames = RawFrames(dataset.test.path, 32)
    extract.write_frame_features(model, variables, dataset, path, mesh=mesh,
                                 batch_size=mesh.size, frames=frames, pooling="max")
    in_memory = extract.extract_frame_features(model, variables, frames, mesh=mesh,
                                               batch_size=mesh.size)
    return dataset, path, in_memory


def test_streamed_features_file_holds_every_frame_and_the_paths_file(tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateFeaturesWarning)
        dataset, path, in_memory = _extract(tmp_path, same_images=False)
    f = load_features(path)
    assert isinstance(f["frame_feat"], np.memmap) and f["frame_feat"].shape == (10, 2, 3)
    np.testing.assert_array_equal(f["frame_feat"], in_memory)  # 10 frames over 2 batches of 8
    np.testing.assert_array_equal(f["frame_track"], dataset.test.tracklet)
    assert f["pooling"] == "max" and f["cam"].tolist() == [1, 2, 1, 2]
    with open(montage_paths_file(path)) as fh:
        lines = fh.read().splitlines()
    # the middle frame in frame order: tracklet 0 has frames 2,1,0 -> frame 1 is row 1
    assert lines == [str(tmp_path / n) for n in ("f1.png", "f4.png", "f6.png", "f9.png")]


def test_identical_frames_warn_at_extraction(tmp_path):
    with pytest.warns(DegenerateFeaturesWarning, match="features.npz: extracted frame features "
                                                       "are nearly identical across all 10 rows"):
        _extract(tmp_path, same_images=True)
