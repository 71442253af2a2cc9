"""tools/bench_vs_tf1.py builds the bench driver's interleaving config it documents, and a
missing TF1 bench or Python is a clear exit 2 (the timings themselves come from running it)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))

import bench_vs_tf1  # noqa: E402


def test_config_pairs_each_upm_jax_worker_with_the_original(tmp_path):
    args = bench_vs_tf1.parse_args(["--bench-dir", str(tmp_path), "--tf1-python", "/venv/python",
                                    "--extract-batches", "64,256", "--extract-frames", "256",
                                    "--rounds", "3", "--work-dir", str(tmp_path / "w")])
    config = bench_vs_tf1.interleave_config(args, ["train", "extract"])
    assert config["rounds"] == 3
    assert config["pairs"] == [["jax_dal", "tf_dal"], ["jax_upm_local", "tf_upm_local"],
                               ["jax_extract_b1", "tf_extract_b1"],
                               ["jax_extract_b64", "tf_extract_b1"],
                               ["jax_extract_b256", "tf_extract_b1"]]
    workers = config["workers"]
    tf_local = workers["tf_upm_local"]["cmd"]
    assert tf_local[:2] == ["/venv/python", os.path.join(str(tmp_path), "tf_train_worker.py")]
    assert tf_local[tf_local.index("--method") + 1] == "upm_local"
    jax_local = workers["jax_upm_local"]["cmd"]
    assert jax_local[jax_local.index("--worker") + 1] == "train"
    assert jax_local[jax_local.index("--batch") + 1] == "64"
    assert workers["jax_upm_local"]["env"]["JAX_PLATFORMS"] == "cpu"
    # Every extraction worker gets the same number of frames per round.
    assert workers["tf_extract_b1"]["calls"] == 256
    assert workers["jax_extract_b64"]["calls"] == 4 and workers["jax_extract_b256"]["calls"] == 1


def test_missing_bench_dir_exits_2_naming_it(tmp_path, capsys):
    missing = str(tmp_path / "no_bench")
    assert bench_vs_tf1.main(["--bench-dir", missing, "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "--bench-dir" in err and missing in err
    assert not (tmp_path / "o.json").exists()
