"""Input pipeline: TF1 resize, deterministic batches, replay, sharding, resident data, test stream."""
import dataclasses
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from upm_jax.data import (DatasetError, Loading, RawFrames, batch_indices, load_dataset,
                          load_resident, ordered_batches, resident_batches, synthetic,
                          train_batches)
from upm_jax.data import images
from upm_jax.data.pipeline import step_batches

IMAGE_SIZE = 32  # frames of 16x8 are upsampled to 32x16


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    info = synthetic.generate("prid2011", str(tmp_path_factory.mktemp("p") / "root"), ids=8,
                              seed=3, frames=(3, 6), size=(16, 8))
    return load_dataset("prid2011", info["root"], split_file=info["split_file"])


def _mesh(n):
    return Mesh(np.array(jax.devices()[:n]), ("data",))


def test_resize_matches_hand_computed_tf1_values():
    # 2x3 -> 3x4. Rows: source y = 0, 2/3, 4/3 -> (row0), (row0 + 2/3 (row1 - row0)), (row1 clamped).
    # Columns: source x = 0, .75, 1.5, 2.25 -> c0, c0 + .75 (c1 - c0), c1 + .5 (c2 - c1), c2 (clamped).
    x = np.array([[0, 10, 20], [30, 40, 50]], np.float32)[..., None]
    out = images.resize_bilinear_tf1(x, 3, 4)[..., 0]
    expected = np.array([[0.0, 7.5, 15.0, 20.0],
                         [20.0, 27.5, 35.0, 40.0],
                         [30.0, 37.5, 45.0, 50.0]])
    np.testing.assert_allclose(out, expected, atol=1e-4)
    assert images.to_uint8(out).tolist() == [[0, 8, 15, 20], [20, 28, 35, 40], [30, 38, 45, 50]]
    # 4x4 -> 2x2 samples source pixels 0 and 2 exactly (no half-pixel centres, no averaging)
    y = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    assert images.resize_bilinear_tf1(y, 2, 2)[..., 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]
    # 2x2 -> 4x4 upsampling: source 0, .5, 1, 1.5(clamped to 1)
    z = np.array([[0, 100], [200, 40]], np.float32)[..., None]
    np.testing.assert_allclose(images.resize_bilinear_tf1(z, 4, 4)[..., 0],
                               [[0, 50, 100, 100], [100, 85, 70, 70],
                                [200, 120, 40, 40], [200, 120, 40, 40]], atol=1e-4)


def test_resize_matches_tensorflow_v1_bit_exactly():
    import tensorflow as tf
    rng = np.random.default_rng(0)
    # one thread's scratch buffers grow and are reused: larger, smaller, one axis unchanged
    for h, w, oh, ow in ((16, 8, 32, 16), (37, 23, 64, 32), (50, 30, 20, 10), (300, 151, 256, 128),
                         (64, 32, 64, 16), (20, 40, 60, 40), (16, 8, 32, 16)):
        x = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        ref = tf.compat.v1.image.resize_bilinear(x[None].astype(np.float32), (oh, ow),
                                                 align_corners=False,
                                                 half_pixel_centers=False).numpy()[0]
        assert np.array_equal(images.resize_bilinear_tf1(x, oh, ow), ref)
        assert np.array_equal(images.resize_uint8(x, oh, ow), np.rint(ref).astype(np.uint8))


def test_decode_resize_png_and_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (16, 8, 3)).astype(np.uint8)
    png = str(tmp_path / "a.png")
    Image.fromarray(x).save(png)
    out = images.decode_resize(png, 32, 16)
    assert out.dtype == np.uint8 and out.shape == (32, 16, 3)
    assert np.array_equal(out, images.to_uint8(images.resize_bilinear_tf1(x, 32, 16)))
    assert np.array_equal(images.decode_resize(png, 16, 8), x)
    jpg = str(tmp_path / "a.jpg")
    Image.fromarray(x).convert("L").save(jpg)  # greyscale files become 3 channels
    assert images.decode_resize(jpg, 32, 16).shape == (32, 16, 3)
    with pytest.raises(DatasetError, match=r"cannot decode image .*missing.png"):
        images.decode(str(tmp_path / "missing.png"))


def _png16(path, samples):
    """A 16-bit PNG (greyscale [h, w] or RGB [h, w, 3]) written byte by byte (Pillow writes
    no 16-bit RGB)."""
    import struct
    import zlib

    h, w = samples.shape[:2]
    colour = 2 if samples.ndim == 3 else 0
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data)))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour,
                                                                      0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_frames_of_any_bit_depth_and_mode_decode_to_what_they_show(tmp_path):
    rng = np.random.default_rng(3)
    grey16 = rng.integers(0, 65536, (6, 4)).astype(np.uint16)
    _png16(tmp_path / "g16.png", grey16)
    want = np.rint(grey16 / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(images.decode(str(tmp_path / "g16.png")),
                                  np.repeat(want[:, :, None], 3, axis=2))
    rgb16 = rng.integers(0, 65536, (6, 4, 3)).astype(np.uint16)
    _png16(tmp_path / "rgb16.png", rgb16)
    got = images.decode(str(tmp_path / "rgb16.png")).astype(int)
    assert np.abs(got - rgb16 / 257.0).max() <= 1
    Image.fromarray(grey16).save(tmp_path / "g16.tif")   # TIFF I;16
    np.testing.assert_array_equal(images.decode(str(tmp_path / "g16.tif"))[:, :, 0], want)
    rgb = rng.integers(0, 256, (6, 4, 3)).astype(np.uint8)
    alpha = rng.integers(0, 256, (6, 4, 1)).astype(np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2)).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(images.decode(str(tmp_path / "rgba.png")), rgb)  # alpha dropped
    grey = rng.integers(0, 256, (6, 4)).astype(np.uint8)
    Image.fromarray(np.stack([grey, grey], axis=2), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(images.decode(str(tmp_path / "la.png")),
                                  np.repeat(grey[:, :, None], 3, axis=2))
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    palette = Image.open(tmp_path / "p.png").convert("RGB")
    np.testing.assert_array_equal(images.decode(str(tmp_path / "p.png")), np.asarray(palette))
    Image.fromarray(grey > 127).save(tmp_path / "bits.png")   # 1 bit
    np.testing.assert_array_equal(images.decode(str(tmp_path / "bits.png"))[:, :, 1],
                                  np.where(grey > 127, 255, 0))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert np.abs(images.decode(str(tmp_path / "cmyk.jpg")).astype(int) - rgb).mean() < 8
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "float.tif")
    with pytest.raises(DatasetError, match=r"float.tif: a floating-point image, whose value "
                                           r"range the file does not state"):
        images.decode(str(tmp_path / "float.tif"))


def test_batch_indices_is_a_pure_function_of_seed_and_step():
    a = batch_indices(5, 17, 1000, 64)
    assert np.array_equal(a, batch_indices(5, 17, 1000, 64))
    assert not np.array_equal(a, batch_indices(5, 18, 1000, 64))
    assert not np.array_equal(a, batch_indices(6, 17, 1000, 64))
    assert a.shape == (64,) and a.min() >= 0 and a.max() < 1000
    # uniform over frames: every frame of a small table shows up over a few steps
    seen = np.concatenate([batch_indices(0, s, 10, 64) for s in range(5)])
    assert np.array_equal(np.unique(seen), np.arange(10))
    with pytest.raises(ValueError, match="seed and step must be >= 0"):
        batch_indices(-1, 0, 10, 4)


def _reference(table, rows, height, width):
    """The frames of `rows` as the pipeline has always produced them: decoded, resized by
    the reference TF1 resize, rounded half to even."""
    return np.stack([np.rint(images.resize_bilinear_tf1(images.decode(p), height, width))
                     .astype(np.uint8) for p in table.path[rows]])


def _train(table, mesh, start, end, seed=11, batch=16, loading=Loading()):
    return list(train_batches(table, RawFrames(table.path, IMAGE_SIZE), global_batch=batch,
                              seed=seed, mesh=mesh, start_step=start, end_step=end,
                              loading=loading))


def test_train_batches_replay_and_match_the_reference(ds):
    mesh = _mesh(8)
    run = _train(ds.train, mesh, 0, 4)
    again = _train(ds.train, mesh, 2, 4)
    assert len(run) == 4 and len(again) == 2
    for s, batch in zip((2, 3), again):
        for k in ("image", "track", "camera"):
            assert np.array_equal(np.asarray(batch[k]), np.asarray(run[s][k]))
    b = run[1]
    assert b["image"].shape == (16, 32, 16, 3) and b["image"].dtype == np.uint8
    assert b["track"].dtype == np.int32 and b["camera"].dtype == np.int32
    assert b["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert len(b["image"].addressable_shards) == 8
    rows = batch_indices(11, 1, ds.train.num_frames, 16)
    assert np.array_equal(np.asarray(b["track"]), ds.train.track[rows])
    assert np.array_equal(np.asarray(b["camera"]), ds.train.camera[rows])
    assert np.array_equal(np.asarray(b["image"]), _reference(ds.train, rows, 32, 16))


def test_train_batches_mesh_size_and_device_order(ds):
    one, four = _train(ds.train, _mesh(1), 5, 8, 2, 8), _train(ds.train, _mesh(4), 5, 8, 2, 8)
    for x, y in zip(one, four):
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    # one process holds every device, so it reads every row, whatever the mesh's order
    shuffled = Mesh(np.array(jax.devices()[:4])[[2, 0, 3, 1]], ("data",))
    source = step_batches(ds.train, RawFrames(ds.train.path, IMAGE_SIZE), global_batch=8,
                          seed=2, mesh=shuffled, num_steps=10)
    assert source.local.tolist() == list(range(8))
    batch = _train(ds.train, shuffled, 9, 10, 2, 8)[0]
    for k in ("image", "track", "camera"):
        assert np.array_equal(np.asarray(batch[k]), source[9][k])
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
        _train(ds.train, _mesh(8), 0, 1, batch=12)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_stop(ds, capfd):
    """...and ignore the stop signals (Ctrl-C reaches a terminal's whole process group):
    the trainer decides when they stop, so no reader prints a traceback or dies early."""
    import multiprocessing
    import signal
    import time
    mesh = _mesh(2)
    threads = _train(ds.train, mesh, 3, 19)
    batches = train_batches(ds.train, RawFrames(ds.train.path, IMAGE_SIZE), global_batch=16,
                            seed=11, mesh=mesh, start_step=3, end_step=19,
                            loading=Loading(workers=2, prefetch=1))
    workers = [next(batches)]
    children = [p for p in multiprocessing.active_children() if p.is_alive()]
    assert len(children) == 2
    for p in children:
        os.kill(p.pid, signal.SIGINT)
        os.kill(p.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert [p.exitcode for p in children] == [None, None]
    workers += list(batches)
    assert "Traceback" not in capfd.readouterr().err
    for x, y in zip(threads, workers, strict=True):
        for k in ("image", "track", "camera"):
            assert np.array_equal(np.asarray(x[k]), np.asarray(y[k]))
    frames = RawFrames(ds.test.path, IMAGE_SIZE)
    ordered = [b["index"] for b in ordered_batches(frames, batch_size=16,
                                                   loading=Loading(workers=2, prefetch=1))]
    assert np.array_equal(np.concatenate(ordered)[:ds.test.num_frames],
                          np.arange(ds.test.num_frames))
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def test_resident_data_and_index_batches(ds):
    mesh = _mesh(4)
    res = load_resident(ds.train, RawFrames(ds.train.path, IMAGE_SIZE), mesh)
    assert res["image"].shape == (ds.train.num_frames, 32, 16, 3)
    assert res["image"].sharding.is_fully_replicated
    assert np.array_equal(np.asarray(res["track"]), ds.train.track)
    assert np.array_equal(np.asarray(res["camera"]), ds.train.camera)
    assert np.array_equal(np.asarray(res["image"]),
                          _reference(ds.train, np.arange(ds.train.num_frames), 32, 16))
    gen = resident_batches(ds.train.num_frames, global_batch=8, seed=4, mesh=mesh, start_step=3)
    idx = next(gen)["index"]
    assert idx.dtype == np.int32 and idx.sharding.spec == jax.sharding.PartitionSpec("data")
    assert np.array_equal(np.asarray(idx), batch_indices(4, 3, ds.train.num_frames, 8))
    streamed = _train(ds.train, mesh, 3, 4, seed=4, batch=8)[0]
    assert np.array_equal(np.asarray(res["image"])[np.asarray(idx)],
                          np.asarray(streamed["image"]))


def test_ordered_batches_cover_every_frame_once(ds):
    n = ds.test.num_frames
    frames = RawFrames(ds.test.path, IMAGE_SIZE)
    batches = list(ordered_batches(frames, batch_size=16))
    assert len(batches) == -(-n // 16)
    index = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert np.array_equal(index[valid], np.arange(n))
    assert valid.sum() == n and not valid[n:].any() and (index[~valid] == -1).all()
    last = batches[-1]
    assert last["image"].shape == (16, 32, 16, 3)
    assert (last["image"][~last["valid"]] == 0).all()
    image = np.concatenate([b["image"] for b in batches])[:n]
    assert np.array_equal(image, _reference(ds.test, np.arange(n), 32, 16))
    sharded = list(ordered_batches(frames, batch_size=16,
                                   sharding=NamedSharding(_mesh(4), PartitionSpec("data"))))
    assert np.array_equal(np.concatenate([b["index"] for b in sharded]), index)


def test_pipeline_names_a_corrupt_frame(ds, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    table = ds.train.select_tracklets(np.arange(ds.train.num_tracklets) == 0)
    table = dataclasses.replace(table, path=np.array([str(bad)] * table.num_frames))
    with pytest.raises(DatasetError, match="cannot decode image .*broken.png"):
        list(ordered_batches(RawFrames(table.path, IMAGE_SIZE), batch_size=4))
    with pytest.raises(DatasetError, match="cannot decode image .*broken.png"):
        _train(table, _mesh(1), 0, 1, batch=4)


def test_input_benchmark_records(tmp_path):
    from upm_jax.benchmark import input as input_bench
    decode = input_bench.decode_resize_throughput(num_images=4, min_seconds=0.01)
    assert [(r["format"], r["in_size"], r["out_size"]) for r in decode] == [
        ("png", [128, 64], [256, 128]), ("jpeg", [128, 64], [256, 128]),
        ("png", [256, 128], [224, 112]), ("jpeg", [256, 128], [224, 112])]
    assert all(r["frames_per_s"] > 0 for r in decode)
    pipeline = input_bench.pipeline_throughput(ids=2, image_size=64, batch=8,
                                               worker_counts=(0,), min_seconds=0.01,
                                               folder=str(tmp_path))
    assert [(r["source"], r["workers"]) for r in pipeline] == [("raw", 0), ("prepared", 0)]
    assert all(r["frames_per_s"] > 0 and r["out_size"] == [64, 32] for r in pipeline)
    assert os.listdir(tmp_path) == []
    needs = input_bench.config_needs([dict(pipeline[0], frames_per_cpu_s=1000.0),
                                      dict(pipeline[1], frames_per_cpu_s=10000.0)])
    mars = {r["target"]: r for r in needs if r["config"] == "mars"}
    h100 = mars["H100 bf16"]
    assert h100["frames_per_s_needed"] == pytest.approx(1000 / 2.7 * 64)
    assert h100["host_cores_raw"] == pytest.approx(h100["frames_per_s_needed"] / 1000)
    assert h100["host_cores_prepared"] == pytest.approx(h100["frames_per_s_needed"] / 10000)
    assert all(r["host_cores_raw"] == 0 for r in needs if r["resident"])
