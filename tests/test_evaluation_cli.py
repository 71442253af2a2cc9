"""CLI smoke tests, pictures, and the import-without-JAX guarantee."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from upm_jax.evaluation import load_features, plot_cmc, plot_montage, rank_lists, save_features
from upm_jax.evaluation.__main__ import main
from upm_jax.evaluation.plots import BAD_RGB, GOOD_RGB, MONTAGE_KEY, MONTAGE_LABELS, QUERY_RGB
from upm_jax.evaluation.synthetic import synthetic_mars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _small(tmp_path, name="small.npz", seed=0):
    f = synthetic_mars(parts=2, dim=16, seed=seed, tracklets=300, queries=60, ids=25,
                       distractors=60, junk=20, signal=2.0)
    path = tmp_path / name
    save_features(path, **f)
    return path


def test_import_does_not_pull_in_jax_or_tensorflow():
    code = ("import sys\n"
            "import upm_jax.evaluation, upm_jax.evaluation.__main__, upm_jax.evaluation.summary\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'tensorflow', 'keras', 'tensorflow_datasets'))\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), check=True)
    assert out.stdout.strip() == "[]"


def test_cli_table_json_and_plot(tmp_path, capsys):
    a, b = _small(tmp_path, "split1.npz", 0), _small(tmp_path, "split2.npz", 1)
    out_json, out_png = tmp_path / "r.json", tmp_path / "cmc.png"
    assert main([str(a), str(b), "--json", str(out_json), "--plot", str(out_png)]) == 0
    table = capsys.readouterr().out
    assert "split1.npz" in table and "split2.npz" in table and "mean of 2" in table
    result = json.loads(out_json.read_text())
    assert result["options"] == {"ap": "both", "distance": "euclidean", "pooling": None, "rerank": False}
    assert len(result["splits"]) == 2
    mean_r1 = np.mean([s["paper"]["rank1"] for s in result["splits"]])
    assert result["mean"]["paper"]["rank1"] == pytest.approx(mean_r1)
    assert len(result["splits"][0]["paper"]["cmc"]) == 300
    assert set(result["mean"]["standard"]) >= {"rank1", "rank5", "rank10", "rank20", "mAP", "mINP", "cmc"}
    assert out_png.read_bytes()[:8] == PNG_MAGIC


def test_cli_options_and_errors(tmp_path, capsys):
    a = _small(tmp_path)
    assert main([str(a), "--ap", "standard", "--distance", "cosine", "--rerank"]) == 0
    table = capsys.readouterr().out
    assert "standard" in table and "paper" not in table
    (tmp_path / "bad.npz").write_bytes(b"nope")
    assert main([str(tmp_path / "bad.npz")]) == 2
    assert "bad.npz: not a complete .npz archive" in capsys.readouterr().err


def test_cli_runs_as_module(tmp_path):
    a = _small(tmp_path)
    out = subprocess.run([sys.executable, "-m", "upm_jax.evaluation", str(a), "--ap", "paper"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    assert "paper" in out.stdout and "rank1" in out.stdout


def test_montage_and_rank_lists(tmp_path, capsys):
    path = _small(tmp_path)
    f = load_features(path)
    lines = []
    for t in range(f["pid"].shape[0]):
        img = tmp_path / f"t{t}.png"
        Image.new("RGB", (8, 16), (t % 256, 0, 0)).save(img)
        lines.append(img.name)
    (tmp_path / "paths.txt").write_text("\n".join(lines))
    ranked = rank_lists(f, [0, 3], k=5)
    assert len(ranked) == 2 and ranked[0][0] == int(f["query"][0])
    for q, gal, match in ranked:
        assert len(gal) == 5
        np.testing.assert_array_equal(match, f["pid"][gal] == f["pid"][q])
        junk = (f["pid"][gal] == -1) | ((f["pid"][gal] == f["pid"][q]) & (f["cam"][gal] == f["cam"][q]))
        assert not junk.any()
    out_png = tmp_path / "montage.png"
    assert main([str(path), "--montage", str(out_png), "--paths", str(tmp_path / "paths.txt"),
                 "--queries", "0,3", "--topk", "5"]) == 0
    capsys.readouterr()
    with Image.open(out_png) as im:
        assert im.size[0] > 6 * 64 and im.size[1] > 2 * 128
    direct = tmp_path / "direct.png"
    plot_montage([str(tmp_path / n) for n in lines], ranked, direct)
    assert direct.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="query positions"):
        rank_lists(f, [60])


def test_plot_cmc_several_runs(tmp_path):
    out = tmp_path / "c.png"
    plot_cmc({"a": [10.0, 50.0, 90.0], "b": [20.0, 30.0, 100.0]}, out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]


def test_outputs_into_a_missing_folder_and_a_damaged_file_are_one_line(tmp_path, capsys):
    a = _small(tmp_path)
    for flag in ("--json", "--plot", "--montage"):
        out = tmp_path / "nope" / "out"
        assert main([str(a), f"{flag}={out}", "--paths", str(a)]) == 2
        captured = capsys.readouterr()
        assert captured.err == (f"error: {flag} {out}: the folder {tmp_path / 'nope'} does not "
                                "exist\n")
        assert captured.out == ""   # refused before anything is computed
    data = bytearray(a.read_bytes())
    data[len(data) // 2] ^= 0x01
    a.write_bytes(bytes(data))
    assert main([str(a)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {a}: member '") and "CRC-32 check fails" in err


def test_a_stop_signal_while_writing_leaves_nothing_and_one_line(tmp_path, capsys, monkeypatch):
    """SIGTERM (or Ctrl-C) mid-write: the JSON file is not written, its temporary is removed,
    one line says so, and the status is 128 + the signal's number."""
    import signal

    from upm_jax import interrupts
    from upm_jax.evaluation import __main__ as cli

    a = _small(tmp_path)
    out = tmp_path / "r.json"

    def dump_and_stop(obj, f):
        f.write('{"options": ')
        os.kill(os.getpid(), signal.SIGTERM)   # the handler raises before the write ends
        f.write("never written")

    monkeypatch.setattr(cli.json, "dump", dump_and_stop)
    before = signal.getsignal(signal.SIGTERM)
    assert interrupts.command(lambda: cli.main([str(a), f"--json={out}"])) == 143
    assert capsys.readouterr().err == ("stopped by SIGTERM: no file was left half-written; run "
                                       "the same command again to continue\n")
    assert sorted(os.listdir(tmp_path)) == ["small.npz"]
    assert signal.getsignal(signal.SIGTERM) == before   # the handlers come back


def test_montage_has_a_key_to_its_frame_colours_and_labels(tmp_path):
    """The frames' colours and the `rank: tracklet` labels are explained in the picture: a key
    band above the rows holding a swatch of each colour and text, wide enough to show whole
    even for one short rank list."""
    paths = []
    for t in range(3):
        paths.append(str(tmp_path / f"t{t}.png"))
        Image.new("RGB", (8, 16), (128, 128, 128)).save(paths[-1])
    ranked = [(0, np.array([1, 2]), np.array([True, False]))]
    out = tmp_path / "m.png"
    plot_montage(paths, ranked, out, size=(16, 32))
    image = np.asarray(Image.open(out).convert("RGB"))
    label_h, cell_h = 14, 32 + 10
    key_h = 2 * label_h + 6
    assert image.shape[0] == key_h + cell_h + label_h
    assert image.shape[1] >= ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(MONTAGE_LABELS)

    def has(band, rgb):
        return bool(np.all(band == rgb, axis=-1).any())

    key, rows = image[:key_h], image[key_h:]
    for _, rgb in MONTAGE_KEY:
        assert has(key, rgb)
    assert (key[label_h + 2:].max(axis=-1) < 100).any()   # the labels line: dark text
    # the rows: the query framed blue, rank 1 green (same person), rank 2 red
    assert has(rows, QUERY_RGB) and has(rows, GOOD_RGB) and has(rows, BAD_RGB)
