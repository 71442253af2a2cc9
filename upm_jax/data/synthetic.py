"""Synthetic pedestrian videos written in the raw layouts of the four benchmarks.

Each identity has a fixed build and clothing (colours, pattern, sleeves, trousers, bag, hat);
each camera its own nuisance (colour cast, brightness, blur, noise, scene, viewpoint flip,
scale, position); each tracklet its own background clutter, occluder and walk; each frame a
gait phase, drift and sensor noise. Raw pixels therefore match poorly across cameras while
the identity is there to be learnt. Every random draw is seeded by (seed, role, ids...), so
a tree is byte-identical for a given seed whatever the thread schedule (PNG and JPEG encoder
settings are pinned; .mat headers carry no timestamp).

Layouts (ROOT = `out`):
  prid2011  ROOT/multi_shot/cam_{a,b}/person_0001/0001.png + ROOT/prid2011_splits.json
  ilidsvid  ROOT/sequences/cam{1,2}/person001/cam1_person001_00017.png + ROOT/ilidsvid_splits.json
  mars      ROOT/bbox_{train,test}/0001/0001C1T0001F001.jpg + ROOT/info/{train,test}_name.txt,
            tracks_{train,test}_info.mat, query_IDX.mat (used instead of the shipped protocol)
  dukev     ROOT/{train,query,gallery}/0001/0001/0001_C1_F0001_X12345.jpg
"""
from __future__ import annotations

import colorsys
import concurrent.futures
import functools
import io
import json
import os
import shutil
import tempfile

import numpy as np
import scipy.io
from PIL import Image
from scipy import ndimage

from upm_jax.files import TEMP_PREFIX

LAYOUTS = ("prid2011", "ilidsvid", "mars", "dukev")
NUM_CAMERAS = {"prid2011": 2, "ilidsvid": 2, "mars": 6, "dukev": 8}
PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}
JPEG_OPTIONS = {"format": "JPEG", "quality": 92, "subsampling": 2, "optimize": False,
                "progressive": False}
_MAT_HEADER = b"MATLAB 5.0 MAT-file, written by upm_jax.data.synthetic"


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _colour(rng, dull: float = 0.25) -> np.ndarray:
    """A clothing colour: saturated hues, with some greys/blacks/whites."""
    if rng.random() < dull:
        return np.full(3, rng.choice([0.08, 0.2, 0.45, 0.7, 0.92]) + rng.uniform(-0.04, 0.04))
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.45, 1.0),
                                        rng.uniform(0.35, 1.0)))


def identity(seed: int, key: int) -> dict:
    """Appearance fixed for one person: build and clothing."""
    rng = _rng(seed, 0, key)
    skin = np.array(colorsys.hsv_to_rgb(rng.uniform(0.03, 0.1), rng.uniform(0.25, 0.6),
                                        rng.uniform(0.35, 0.95)))
    return {"skin": skin, "hair": _colour(rng, 0.7) * 0.6, "shirt": _colour(rng),
            "accent": _colour(rng), "pants": _colour(rng, 0.4), "shoes": _colour(rng, 0.8) * 0.5,
            "pattern": int(rng.integers(0, 5)),  # plain, h-stripes, v-stripes, two-tone, sash
            "period": rng.uniform(0.03, 0.07), "short_sleeves": bool(rng.random() < 0.3),
            "shorts": bool(rng.random() < 0.15), "width": rng.uniform(0.8, 1.25),
            "height": rng.uniform(0.9, 1.0), "legs": rng.uniform(0.44, 0.52),
            "bag": bool(rng.random() < 0.45), "bag_colour": _colour(rng),
            "hat": bool(rng.random() < 0.2), "hat_colour": _colour(rng)}


def _boxes(rng, count, max_w, max_h):
    """Axis-aligned clutter boxes (x, y, width, height in frame units, colour)."""
    return [(rng.uniform(-0.2, 1.0), rng.uniform(-0.2, 1.0), rng.uniform(0.05, max_w),
             rng.uniform(0.05, max_h), rng.uniform(0.0, 1.0, 3)) for _ in range(count)]


def camera(seed: int, cam: int) -> dict:
    """Nuisance fixed for one camera, its scene included (shared by all its tracklets, so
    telling tracklets of a camera apart needs the person, as in real footage)."""
    rng = _rng(seed, 1, cam)
    return {"gain": rng.uniform(0.85, 1.15, 3), "bright": rng.uniform(-0.1, 0.1),
            "blur": rng.uniform(0.0, 1.2), "noise": rng.uniform(0.01, 0.05),
            "wall": rng.uniform(0.2, 0.8, 3), "floor": rng.uniform(0.1, 0.6, 3),
            "horizon": rng.uniform(0.45, 0.8), "flip": bool(cam % 2),
            "scale": rng.uniform(0.72, 0.95), "x": rng.uniform(-0.12, 0.12),
            "boxes": _boxes(rng, int(rng.integers(3, 7)), 0.6, 0.5)}


def tracklet(seed: int, key: tuple, num_frames: int) -> dict:
    """Small clutter, lighting, occluder and walk of one tracklet."""
    rng = _rng(seed, 2, *key)
    boxes = _boxes(rng, int(rng.integers(0, 3)), 0.25, 0.25)
    occluder = None
    if rng.random() < 0.3:
        occluder = (rng.uniform(0.0, 1.0), rng.uniform(0.12, 0.35), rng.uniform(0.5, 0.9),
                    rng.uniform(0.0, 1.0, 3))  # x, width, top, colour
    return {"boxes": boxes, "tint": rng.uniform(-0.05, 0.05, 3), "occluder": occluder,
            "bright": rng.uniform(-0.08, 0.08), "phase": rng.uniform(0, 2 * np.pi),
            "x0": rng.uniform(-0.1, 0.1), "vx": rng.uniform(-0.012, 0.012),
            "scale": rng.uniform(0.93, 1.05), "num_frames": num_frames}


@functools.lru_cache(maxsize=8)
def _grid(height: int, width: int):
    """Pixel row and column coordinates, float32 [height, width] each (read-only)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _fill_box(img, top, bottom, left, right, colour):
    """Paints the pixels with top <= y < bottom and left <= x < right (integer pixel grid)."""
    h, w = img.shape[:2]
    ys = slice(min(h, max(0, int(np.ceil(top)))), min(h, max(0, int(np.ceil(bottom)))))
    xs = slice(min(w, max(0, int(np.ceil(left)))), min(w, max(0, int(np.ceil(right)))))
    img[ys, xs] = colour


def render(height: int, width: int, person: dict, cam: dict, track: dict, f: int,
           noise_rng: np.random.Generator) -> np.ndarray:
    """One frame, uint8 [height, width, 3].

    Body parts are shapes in person coordinates (y down, dx = signed offset from the body
    axis, mirrored in flipped views); each is evaluated only inside its bounding window.
    """
    yy, xx = _grid(height, width)
    img = np.empty((height, width, 3), np.float32)
    horizon = cam["horizon"] * height
    img[:] = np.where((yy < horizon)[..., None], cam["wall"], cam["floor"]) + track["tint"]
    for bx, by, bw, bh, colour in cam["boxes"] + track["boxes"]:
        _fill_box(img, by * height, (by + bh) * height, bx * width, (bx + bw) * width, colour)

    ph = height * cam["scale"] * track["scale"] * person["height"]   # person height in pixels
    top = height - ph - 0.02 * height
    cx = width * (0.5 + cam["x"] + track["x0"] + track["vx"] * f)
    sign = -1.0 if cam["flip"] else 1.0
    wf = person["width"]
    swing = np.sin(track["phase"] + 0.7 * f) * 0.045 * ph

    def y(r):
        return top + r * ph

    def paint(y_lo, y_hi, d_lo, d_hi, inside, colour):
        """Colours pixels of the window where inside(Y, D) holds (Y rows, D signed offsets)."""
        x_lo, x_hi = sorted((cx + sign * d_lo, cx + sign * d_hi))
        ys = slice(max(0, int(np.floor(y_lo))), max(0, min(height, int(np.ceil(y_hi)) + 1)))
        xs = slice(max(0, int(np.floor(x_lo))), max(0, min(width, int(np.ceil(x_hi)) + 1)))
        win_y, win_d = yy[ys, xs], (xx[ys, xs] - cx) * sign
        img[ys, xs][inside(win_y, win_d)] = colour

    def box(y_lo, y_hi, d_lo, d_hi, colour, extra=None):
        def inside(wy, wd):
            m = (wy >= y_lo) & (wy < y_hi) & (wd >= d_lo) & (wd < d_hi)
            return m if extra is None else m & extra(wy, wd)
        paint(y_lo, y_hi, d_lo, d_hi, inside, colour)

    def ellipse(cy, cd, ry, rd, colour, extra=None):
        def inside(wy, wd):
            m = ((wy - cy) / ry) ** 2 + ((wd - cd) / rd) ** 2 <= 1.0
            return m if extra is None else m & extra(wy, wd)
        paint(cy - ry, cy + ry, cd - rd, cd + rd, inside, colour)

    hip = 1.0 - person["legs"]
    torso_w = 0.12 * ph * wf
    for side in (-1.0, 1.0):                                          # legs and shoes
        lx = side * 0.05 * ph * wf + side * swing
        leg = (y(hip), y(0.97), lx - 0.045 * ph * wf, lx + 0.045 * ph * wf)
        box(*leg, person["pants"])
        if person["shorts"]:
            box(*leg, person["skin"], extra=lambda wy, wd: wy > y(hip + 0.2))
        ellipse(y(0.975), lx + 0.02 * ph, 0.02 * ph, 0.05 * ph, person["shoes"])
    for side in (-1.0, 1.0):                                          # arms
        arm = (y(0.37) - side * swing * 0.3, side * (torso_w + 0.025 * ph) - side * swing * 0.4,
               0.17 * ph, 0.03 * ph * wf)
        ellipse(*arm, person["shirt"])
        if person["short_sleeves"]:
            ellipse(*arm, person["skin"], extra=lambda wy, wd: wy > y(0.3))
    torso = (y(0.16), y(hip + 0.02), -torso_w, torso_w)
    period, pattern = person["period"], person["pattern"]
    accents = {
        1: lambda wy, wd: ((wy - y(0.16)) / ph // period) % 2 == 1,
        2: lambda wy, wd: ((wd + torso_w) / ph // period) % 2 == 1,
        3: lambda wy, wd: (wy - y(0.16)) / ph > (hip - 0.16) / 2,
        4: lambda wy, wd: np.abs((wy - y(0.16)) / ph - (wd + torso_w) / ph) < 0.035,
    }
    box(*torso, person["shirt"])
    if pattern in accents:
        box(*torso, person["accent"], extra=accents[pattern])
    if person["bag"]:
        box(y(0.3), y(0.5), torso_w - 0.02 * ph, torso_w + 0.08 * ph, person["bag_colour"])
    box(y(0.12), y(0.17), -0.03 * ph, 0.03 * ph, person["skin"])             # neck
    ellipse(y(0.075), 0.0, 0.07 * ph, 0.052 * ph, person["skin"])           # head
    ellipse(y(0.06), -0.006 * ph, 0.065 * ph, 0.056 * ph,
            person["hat_colour"] if person["hat"] else person["hair"],
            extra=lambda wy, wd: wy < y(0.06))                              # hair or hat
    if track["occluder"] is not None:
        ox, ow, otop, colour = track["occluder"]
        _fill_box(img, otop * height, height, ox * width, (ox + ow) * width, colour)

    if cam["blur"] > 0.3:
        img = ndimage.gaussian_filter(img, sigma=(cam["blur"], cam["blur"], 0), truncate=2.0)
    img = img * cam["gain"] + cam["bright"] + track["bright"]
    img += noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(cam["noise"])
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _encode(image: np.ndarray, path: str) -> bytes:
    buf = io.BytesIO()
    opts = PNG_OPTIONS if path.endswith(".png") else JPEG_OPTIONS
    Image.fromarray(image).save(buf, **opts)
    return buf.getvalue()


def _write_tracklet(seed: int, size: tuple, job: tuple) -> int:
    """Renders and writes one tracklet; job = (identity key, camera, tracklet key, paths)."""
    height, width = size
    id_key, cam, track_key, paths = job
    person, cam_p = identity(seed, id_key), camera(seed, cam)
    track = tracklet(seed, track_key, len(paths))
    for f, path in enumerate(paths):
        image = render(height, width, person, cam_p, track, f, _rng(seed, 3, *track_key, f))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(_encode(image, path))
    return len(paths)


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _write_mat(path: str, name: str, array: np.ndarray) -> None:
    """A .mat file without the timestamp scipy puts in the header (byte-identical output)."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, {name: array})
    data = bytearray(buf.getvalue())
    data[:116] = _MAT_HEADER.ljust(116)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(bytes(data))


def _lengths(rng, frames, n):
    lo, hi = frames
    return rng.integers(lo, hi + 1, size=n)


def _split_json(name, persons, frames_of, num_splits, seed):
    """The official split schema for `persons` (both cameras), halves drawn per split."""
    rng = _rng(seed, 4)
    splits = []
    for k in range(num_splits):
        order = [persons[i] for i in rng.permutation(len(persons))]
        half = len(order) // 2
        entry = {"split": k + 1, "train": order[:half], "test": order[half:]}
        for part in ("train", "test"):
            entry[f"{part}_frames"] = {f"camera{c + 1}": int(sum(frames_of[p][c] for p in entry[part]))
                                       for c in (0, 1)}
        splits.append(entry)
    return {"dataset": f"synthetic {name}", "protocol": "halves of the persons, probe camera 1",
            "source": f"upm_jax.data.synthetic seed {seed}", "splits": splits,
            "cameras": "camera 1 and camera 2 folders of this tree",
            "order": "persons in tracklet-id order"}


def _plan_twocam(layout, root, ids, seed, frames, num_splits):
    """Jobs and the split JSON for PRID2011 / iLIDS-VID layouts."""
    rng = _rng(seed, 5)
    jobs, frames_of = [], {}
    if layout == "prid2011":
        cams = [os.path.join(root, "multi_shot", c) for c in ("cam_a", "cam_b")]
        extra = (max(1, ids // 10), max(2, ids // 5))  # persons seen by one camera only
        fmt = "person_{:04d}"
    else:
        cams = [os.path.join(root, "sequences", c) for c in ("cam1", "cam2")]
        extra = (0, 0)
        fmt = "person{:03d}"
    for c, cam_dir in enumerate(cams):
        lengths = _lengths(rng, frames, ids + extra[c])
        starts = rng.integers(1, 500, size=ids + extra[c])
        for i in range(ids + extra[c]):
            # as in the PRID2011 release, single-camera persons are numbered from 201
            person = fmt.format(i + 1 if i < ids else max(ids, 200) + i - ids + 1)
            id_key = i + 1 if i < ids else 100000 * (c + 1) + i + 1  # extras: other people
            if layout == "prid2011":
                names = [f"{f + 1:04d}.png" for f in range(lengths[i])]
            else:
                names = [f"cam{c + 1}_{person}_{starts[i] + f:05d}.png" for f in range(lengths[i])]
            paths = [os.path.join(cam_dir, person, n) for n in names]
            jobs.append((id_key, c, (c, i), paths))
            if i < ids:
                frames_of.setdefault(person, [0, 0])[c] = int(lengths[i])
    persons = [fmt.format(i + 1) for i in range(ids)]
    split = _split_json(layout, persons, frames_of, num_splits, seed)
    return jobs, {f"{layout}_splits.json": json.dumps(split, indent=1)}


def _camera_sets(rng, n_ids, num_cameras):
    """Cameras of each identity (2-4 of them); every camera gets someone."""
    sets = [sorted(rng.choice(num_cameras, size=int(rng.integers(2, min(4, num_cameras) + 1)),
                              replace=False).tolist()) for _ in range(n_ids)]
    for c in range(num_cameras):
        if not any(c in s for s in sets):
            sets[c % n_ids] = sorted(set(sets[c % n_ids]) | {c})
    return sets


def _plan_mars(root, ids, seed, frames):
    rng = _rng(seed, 6)
    n_cam = NUM_CAMERAS["mars"]
    n_train = ids // 2
    jobs, texts, mats = [], {}, {}
    for part, pids in (("train", list(range(1, n_train + 1))),
                       ("test", list(range(n_train + 1, ids + 1)))):
        folder = os.path.join(root, f"bbox_{part}")
        entries = []  # (folder tag, id key, camera, track number)
        if part == "test":
            for j in range(max(1, ids // 10)):
                entries.append(("00-1", 200000 + j, int(rng.integers(n_cam)), j + 1))
            for j in range(max(1, ids // 10)):
                entries.append(("0000", 300000 + j, int(rng.integers(n_cam)), j + 1))
        for pid, cams in zip(pids, _camera_sets(rng, len(pids), n_cam)):
            for c in cams:
                for t in range(int(rng.integers(1, 3))):
                    entries.append((f"{pid:04d}", pid, c, t + 1))
        entries.sort(key=lambda e: (e[0], e[2], e[3]))
        names, info = [], []
        lengths = _lengths(rng, (frames[0], min(frames[1], 999)), len(entries))
        for (tag, key, c, t), n in zip(entries, lengths):
            tnames = [f"{tag}C{c + 1}T{t:04d}F{f + 1:03d}.jpg" for f in range(n)]
            pid = -1 if tag == "00-1" else int(tag)
            info.append([len(names) + 1, len(names) + n, pid, c + 1])
            names.extend(tnames)
            jobs.append((key, c, (7, key, c, t), [os.path.join(folder, tag, nm) for nm in tnames]))
        texts[os.path.join("info", f"{part}_name.txt")] = "\n".join(names) + "\n"
        mats[f"tracks_{part}_info"] = (f"track_{part}_info", np.asarray(info, np.int32))
        if part == "test":
            info = np.asarray(info)
            query = []
            for pid in pids:
                rows = np.flatnonzero(info[:, 2] == pid)
                cams = np.unique(info[rows, 3])
                if cams.size >= 2:
                    query.extend(int(rows[info[rows, 3] == c][0]) + 1 for c in cams)
            mats["query_IDX"] = ("query_IDX", np.asarray([query], np.uint16 if max(query) < 65536
                                                         else np.uint32))
    return jobs, texts, mats


def _plan_dukev(root, ids, seed, frames, naming):
    rng = _rng(seed, 8)
    n_cam = NUM_CAMERAS["dukev"]
    n_train = ids // 2
    n_distract = max(1, ids // 5)
    jobs = []

    def tracklets(folder, pid, key, cams, first=1):
        for t, c in enumerate(cams, start=first):
            n = int(_lengths(rng, frames, 1)[0])
            start, x = int(rng.integers(1, 3000)), int(rng.integers(10000, 99999))
            sep = "_" if naming == "new" else ""
            names = [f"{pid:04d}{sep}C{c + 1}{sep}F{start + f:04d}{sep}X{x}.jpg" for f in range(n)]
            tdir = os.path.join(root, folder, f"{pid:04d}", f"{t:04d}")
            jobs.append((key, c, (9, key, c, t), [os.path.join(tdir, m) for m in names]))

    for pid, cams in zip(range(1, n_train + 1), _camera_sets(rng, n_train, n_cam)):
        tracklets("train", pid, pid, cams)
    test_sets = _camera_sets(rng, ids - n_train, n_cam)
    for pid, cams in zip(range(n_train + 1, ids + 1), test_sets):
        tracklets("query", pid, pid, cams[:1])
        tracklets("gallery", pid, pid, cams[1:], first=2)  # folder numbers unique per person
    for j in range(n_distract):
        pid = ids + j + 1
        tracklets("gallery", pid, 400000 + pid, [int(rng.integers(n_cam))])
    return jobs


def generate(layout: str, out: str, *, ids: int, seed: int = 0, frames=(8, 16),
             size=(128, 64), num_splits: int = 10, duke_naming: str = "new",
             num_threads: int | None = None) -> dict:
    """Writes a synthetic set in `layout` to `out` (created; must be absent or empty).

    ids: identities of the protocol (PRID/iLIDS: persons in both cameras, half train / half
    test per split; MARS/DukeV: half train ids, half test ids, plus distractors/junk).
    frames: (min, max) frames per tracklet. size: (height, width) of the frames.
    Returns {"root", "frames", "tracklets", "split_file" (PRID/iLIDS, else None)}.
    The tree is written in a temporary sibling folder and renamed into place (atomic).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if ids < 2:
        raise ValueError(f"ids must be >= 2 (train and test need one each), got {ids}")
    frames = (int(frames[0]), int(frames[1])) if np.ndim(frames) else (int(frames), int(frames))
    if not 1 <= frames[0] <= frames[1]:
        raise ValueError(f"frames must be 1 <= min <= max, got {frames}")
    if duke_naming not in ("new", "old"):
        raise ValueError(f"duke_naming must be 'new' or 'old', got {duke_naming!r}")
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an empty folder; refusing to overwrite")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    # a killed run's leftover is removed by the next run in the workdir (files.TEMP_PREFIX)
    tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.path.basename(out)}-", dir=parent)
    try:
        texts, mats = {}, {}
        if layout in ("prid2011", "ilidsvid"):
            jobs, texts = _plan_twocam(layout, tmp, ids, seed, frames, num_splits)
        elif layout == "mars":
            jobs, texts, mats = _plan_mars(tmp, ids, seed, frames)
        else:
            jobs = _plan_dukev(tmp, ids, seed, frames, duke_naming)
        threads = num_threads or (os.cpu_count() or 1)
        write = functools.partial(_write_tracklet, int(seed), (int(size[0]), int(size[1])))
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(write, jobs))
        for rel, text in texts.items():
            _write_text(os.path.join(tmp, rel), text)
        for stem, (name, array) in mats.items():
            _write_mat(os.path.join(tmp, "info", stem + ".mat"), name, array)
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"root": out, "frames": int(total), "tracklets": len(jobs),
            "split_file": split_file(out, layout)}


def split_file(root: str, layout: str | None = None) -> str | None:
    """The split JSON a generated PRID2011/iLIDS-VID-layout tree carries, else None."""
    for name in [layout] if layout else ["prid2011", "ilidsvid"]:
        path = os.path.join(root, f"{name}_splits.json")
        if name in ("prid2011", "ilidsvid") and os.path.isfile(path):
            return path
    return None


def raw_pixel_rank1(dataset) -> float:
    """Rank-1 (%) of queries matched by their tracklets' mean raw pixels, Euclidean.

    Candidates: gallery tracklets of other cameras, junk excluded. A no-learning baseline
    showing how hard the set is (frames must share one size).
    """
    from upm_jax.data import images
    test = dataset.test
    sums = None
    for i, path in enumerate(test.path):
        img = images.decode(path).astype(np.float64).reshape(-1)
        if sums is None:
            sums = np.zeros((test.num_tracklets, img.size))
        sums[test.tracklet[i]] += img
    feats = sums / test.frames_per_tracklet()[:, None]                       # [T, H*W*3]
    hits = []
    for q in dataset.query:
        gal = np.asarray([g for g in dataset.gallery
                          if test.tracklet_camera[g] != test.tracklet_camera[q]
                          and test.tracklet_pid[g] != -1])
        d = np.linalg.norm(feats[gal] - feats[q], axis=1)
        hits.append(test.tracklet_pid[gal[np.argmin(d)]] == test.tracklet_pid[q])
    return 100.0 * float(np.mean(hits))
