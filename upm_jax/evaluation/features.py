"""The features file: reading, writing and validating it.

A features file is an uncompressed ``.npz`` holding either per-frame features
(``frame_feat`` [N, P, D] with ``frame_track`` [N]) or per-tracklet features
(``track_feat`` [T, P, D]), plus ``pid`` [T], ``cam`` [T] (1-based), ``query`` [Q]
and ``gallery`` [G] (tracklet indices) and optionally ``pooling`` ("max"/"mean") and
``directions`` ("one"/"both": see `protocols`).
Large feature members are memory-mapped straight out of the zip archive, so
pooling 681,089 frames never holds them all in memory. Every member's CRC-32 (recorded by
the zip writer) is verified before anything is read from the file (`files.verify_npz`):
a damaged file is an error naming it, never a number.
"""
import os
import struct
import zipfile

import numpy as np

from upm_jax.files import DamagedFileError, atomic_write, verify_npz

FEATURE_KEYS = ("frame_feat", "track_feat")
REQUIRED_KEYS = ("pid", "cam", "query", "gallery")
OPTIONAL_KEYS = ("frame_feat", "frame_track", "track_feat", "pooling", "directions")
ALLOWED_KEYS = frozenset(REQUIRED_KEYS + OPTIONAL_KEYS)
POOLINGS = ("max", "mean")
DIRECTIONS = ("one", "both")
_FINITE_CHUNK_BYTES = 64 << 20


class FeaturesError(ValueError):
    """A features file or dict is malformed; the message names the array and the problem."""


def _fail(source, name, problem):
    where = f"{source}: " if source else ""
    raise FeaturesError(f"{where}array '{name}': {problem}")


def _check_int(source, name, a, ndim=1):
    if not isinstance(a, np.ndarray):
        _fail(source, name, f"expected a numpy array, got {type(a).__name__}")
    if a.ndim != ndim:
        _fail(source, name, f"expected {ndim} dimension(s), got shape {a.shape}")
    if a.dtype.kind not in "iu":
        _fail(source, name, f"expected an integer dtype, got {a.dtype}")


def _check_float(source, name, a):
    if not isinstance(a, np.ndarray):
        _fail(source, name, f"expected a numpy array, got {type(a).__name__}")
    if a.ndim != 3:
        _fail(source, name, f"expected shape [rows, P, D] (3 dimensions), got shape {a.shape}")
    if a.dtype.kind != "f":
        _fail(source, name, f"expected a floating dtype (float16/32/64), got {a.dtype}")
    if a.shape[1] < 1 or a.shape[2] < 1:
        _fail(source, name, f"expected P >= 1 and D >= 1, got shape {a.shape}")


def describe(value):
    """A short plain description of a value for an error message (no `np.str_(...)` reprs)."""
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return f"{value.item()!r} ({value.dtype.name})"
        return f"an array of shape {value.shape} ({value.dtype.name})"
    if isinstance(value, np.generic):
        return repr(value.item())
    return repr(value)


def first_nonfinite_row(chunk):
    """Index of the first row of `chunk` holding NaN or inf, or None."""
    finite = np.isfinite(chunk)
    if finite.all():
        return None
    return int(np.flatnonzero(~finite.reshape(chunk.shape[0], -1).all(axis=1))[0])


def check_finite(name, a, source=""):
    """Raise FeaturesError if `a` holds NaN or inf; scans in chunks (memmap friendly)."""
    rows = max(1, _FINITE_CHUNK_BYTES // max(1, a[0:1].nbytes)) if a.shape[0] else 1
    for start in range(0, a.shape[0], rows):
        bad = first_nonfinite_row(np.asarray(a[start:start + rows]))
        if bad is not None:
            _fail(source, name, f"contains NaN or inf (first at row {start + bad})")


def validate_features(arrays, source="", check_values=True):
    """Check keys, dtypes, ranks, lengths, index ranges and finiteness of a features dict.

    `check_values=False` skips the full passes over the feature arrays (NaN/inf scans and
    the frame_track range): pooling checks frames chunk by chunk as it streams them, and
    `tracklet_features` checks pooled features through their norms.
    Returns the number of tracklets T.
    """
    unknown = sorted(set(arrays) - ALLOWED_KEYS)
    if unknown:
        raise FeaturesError(f"{source + ': ' if source else ''}unknown key(s) {unknown}; "
                            f"allowed keys are {sorted(ALLOWED_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in arrays:
            _fail(source, key, "missing (required)")
    has_frame, has_track = "frame_feat" in arrays, "track_feat" in arrays
    if has_frame == has_track:
        raise FeaturesError(f"{source + ': ' if source else ''}expected exactly one of 'frame_feat' "
                            f"(with 'frame_track') or 'track_feat', got "
                            f"{'both' if has_frame else 'neither'}")
    if has_frame != ("frame_track" in arrays):
        _fail(source, "frame_track", "must be given together with 'frame_feat' (and only then)")
    pid, cam = arrays["pid"], arrays["cam"]
    _check_int(source, "pid", pid)
    _check_int(source, "cam", cam)
    t = pid.shape[0]
    if t == 0:
        _fail(source, "pid", "is empty (no tracklets)")
    if cam.shape[0] != t:
        _fail(source, "cam", f"length {cam.shape[0]} does not match 'pid' length {t}")
    if pid.min() < -1:
        _fail(source, "pid", f"values must be >= -1 (-1 junk, 0 distractor), found {pid.min()}")
    if cam.min() < 1:
        _fail(source, "cam", f"cameras are 1-based, found {cam.min()}")
    for key in ("query", "gallery"):
        idx = arrays[key]
        _check_int(source, key, idx)
        if idx.shape[0] == 0:
            _fail(source, key, "is empty")
        if idx.min() < 0 or idx.max() >= t:
            _fail(source, key, f"indices must lie in [0, {t}) (T = len(pid)), found range "
                               f"[{idx.min()}, {idx.max()}]")
        if np.unique(idx).shape[0] != idx.shape[0]:
            _fail(source, key, "contains duplicate tracklet indices")
    if has_track:
        feat = arrays["track_feat"]
        _check_float(source, "track_feat", feat)
        if feat.shape[0] != t:
            _fail(source, "track_feat", f"has {feat.shape[0]} rows but 'pid' has length {t}")
        if check_values:
            check_finite("track_feat", feat, source)
    else:
        feat, track = arrays["frame_feat"], arrays["frame_track"]
        _check_float(source, "frame_feat", feat)
        _check_int(source, "frame_track", track)
        if track.shape[0] != feat.shape[0]:
            _fail(source, "frame_track", f"length {track.shape[0]} does not match 'frame_feat' rows "
                                         f"{feat.shape[0]}")
        if feat.shape[0] == 0:
            _fail(source, "frame_feat", "has no frames")
        if check_values:
            if track.min() < 0 or track.max() >= t:
                _fail(source, "frame_track", f"indices must lie in [0, {t}), found range "
                                             f"[{track.min()}, {track.max()}]")
            check_finite("frame_feat", feat, source)
    if "pooling" in arrays:
        pooling = arrays["pooling"]
        if not (isinstance(pooling, (str, np.ndarray)) and np.ndim(pooling) == 0
                and str(pooling) in POOLINGS):
            _fail(source, "pooling", f"expected a scalar string in {POOLINGS}, got {describe(pooling)}")
    if "directions" in arrays:
        directions = arrays["directions"]
        if not (isinstance(directions, (str, np.ndarray)) and np.ndim(directions) == 0
                and str(directions) in DIRECTIONS):
            _fail(source, "directions", f"expected a scalar string in {DIRECTIONS}, got "
                                        f"{describe(directions)}")
        if str(directions) == "both" and np.intersect1d(arrays["query"], arrays["gallery"]).size:
            _fail(source, "directions", "'both' ranks each side with the other, so 'query' and "
                                        "'gallery' must not share tracklets")
    return t


def save_features(path, **arrays):
    """Validate `arrays` and write them as an uncompressed .npz, atomically (temp file + rename)."""
    arrays = {k: (np.asarray(v) if k in ("pooling", "directions") else v) for k, v in arrays.items()}
    validate_features(arrays, source=os.fspath(path))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_frame_features(path, chunks, *, shape, dtype=np.float32, **arrays):
    """Write a per-frame features file whose `frame_feat` [N, P, D] arrives in chunks.

    `chunks` yields [c, P, D] float arrays in frame order, N frames in all, stored as
    `dtype`; `arrays` are the other members (frame_track, pid, cam, query, gallery,
    optional pooling). The small arrays are validated before anything is written, each
    chunk (NaN/inf, also after the cast) as it arrives; the file appears atomically only
    when complete. Memory: one chunk. The result is what `save_features` writes and
    `load_features` memory-maps.
    """
    source = os.fspath(path)
    n, p, d = (int(v) for v in shape)
    dtype = np.dtype(dtype)
    arrays = {k: (np.asarray(v) if k == "pooling" else v) for k, v in arrays.items()}
    if "frame_feat" in arrays or "track_feat" in arrays:
        raise FeaturesError(f"{source}: save_frame_features takes the frame features as chunks, "
                            "not as an array")
    # a zero-stride stand-in with the final shape lets the usual checks run on the small arrays
    stand_in = np.broadcast_to(np.zeros((), dtype), (n, p, d))
    t = validate_features(dict(arrays, frame_feat=stand_in), source=source, check_values=False)
    track = arrays["frame_track"]
    if track.min() < 0 or track.max() >= t:
        _fail(source, "frame_track", f"indices must lie in [0, {t}), found range "
                                     f"[{track.min()}, {track.max()}]")

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("frame_feat.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, {
                    "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                    "shape": (n, p, d)})
                rows = 0
                for chunk in chunks:
                    with np.errstate(over="ignore"):  # an overflowing cast is reported below
                        chunk = np.ascontiguousarray(chunk, dtype=dtype)
                    if chunk.ndim != 3 or chunk.shape[1:] != (p, d) or rows + len(chunk) > n:
                        _fail(source, "frame_feat", f"chunk of shape {chunk.shape} at frame {rows} "
                                                    f"does not fit [{n}, {p}, {d}]")
                    bad = first_nonfinite_row(chunk)
                    if bad is not None:
                        _fail(source, "frame_feat", f"contains NaN or inf as {dtype.name} (first "
                                                    f"at row {rows + bad})")
                    member.write(memoryview(chunk.reshape(-1).view(np.uint8)))
                    rows += len(chunk)
                if rows != n:
                    _fail(source, "frame_feat", f"got {rows} frames, expected {n}")
            for name, value in arrays.items():
                with archive.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)

    atomic_write(path, write)


def montage_paths_file(features_path):
    """The paths file written next to a features file: `X.npz` -> `X.paths.txt`."""
    stem, _ = os.path.splitext(os.fspath(features_path))
    return stem + ".paths.txt"


def save_montage_paths(features_path, paths):
    """Write the montage paths file of `features_path`: line t = an image of tracklet t."""
    text = "".join(f"{os.fspath(p)}\n" for p in paths)
    atomic_write(montage_paths_file(features_path), lambda f: f.write(text), mode="w")


def _member_memmap(path, info):
    """Memory-map one uncompressed .npy member of a zip archive, or None if impossible."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        if dtype.hasobject or int(np.prod(shape)) == 0:
            return None
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran else "C")


def load_features(path, *, mmap=True):
    """Read and validate a features file; returns a dict of arrays.

    The archive is verified first (every member's CRC-32: one streaming pass over the
    file, skipped when this process verified the same unchanged file before). Uncompressed
    feature members (what `save_features` writes) come back memory-mapped; everything else
    is read normally, never with pickle. `track_feat` is scanned for NaN/inf here;
    per-frame NaN/inf and the frame_track range are checked by `pool_tracklets` while it
    streams the frames.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FeaturesError(f"{source}: no such features file")
    try:
        verify_npz(source, advice="extract the features again (--mode extract)")
    except DamagedFileError as e:
        raise FeaturesError(str(e)) from None
    except OSError as e:
        raise FeaturesError(f"{source}: cannot read ({e.strerror})") from None
    with zipfile.ZipFile(source) as archive:
        infos = {i.filename[:-4] if i.filename.endswith(".npy") else i.filename: i
                 for i in archive.infolist()}
    unknown = sorted(set(infos) - ALLOWED_KEYS)
    if unknown:
        raise FeaturesError(f"{source}: unknown key(s) {unknown}; allowed keys are "
                            f"{sorted(ALLOWED_KEYS)}")
    arrays = {}
    with np.load(source, allow_pickle=False) as npz:
        for name, info in infos.items():
            try:
                value = None
                if mmap and name in FEATURE_KEYS:
                    value = _member_memmap(source, info)
                if value is None:
                    value = npz[name]
            except ValueError as e:
                problem = ("holds Python objects, which are not read (no pickle)"
                           if "pickle" in str(e) else f"is not a readable .npy array ({e})")
                _fail(source, name, problem)
            arrays[name] = value
    for key in ("pooling", "directions"):
        if key in arrays:
            value = arrays[key]
            arrays[key] = str(value) if value.ndim == 0 and value.dtype.kind == "U" else value
    validate_features(arrays, source=source, check_values=False)
    if "track_feat" in arrays:
        check_finite("track_feat", arrays["track_feat"], source)
    return arrays
