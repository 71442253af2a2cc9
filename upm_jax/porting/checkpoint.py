"""TF checkpoint reading without TensorFlow: V2 tensor bundles and V1 TensorSlice files.

- V2 (``PREFIX.index`` + ``PREFIX.data-SSSSS-of-NNNNN``): the index is a sorted string table
  whose "" key holds a BundleHeaderProto (num_shards, endianness) and whose other keys are
  tensor names holding a BundleEntryProto (dtype, shape, shard_id, offset, size); the raw
  little-endian tensor bytes sit in the data shard at [offset, offset + size).
- V1 (one file, e.g. ``resnet_v1_50.ckpt``): a sorted string table whose "" key holds a
  SavedTensorSlices with the metadata (name, shape, dtype, slices of every tensor) and whose
  other keys hold a SavedTensorSlices with one SavedSlice (name, slice, TensorProto data).

NumPy and the standard library only.
"""
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from upm_jax.porting import wire
from upm_jax.porting.sstable import TableFormatError, iter_table

# TF DataType enum -> numpy dtype (the types a model checkpoint can hold).
DTYPES: Dict[int, np.dtype] = {
    1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 4: np.dtype("u1"),
    5: np.dtype("<i2"), 6: np.dtype("i1"), 9: np.dtype("<i8"), 10: np.dtype("?"),
    17: np.dtype("<u2"), 19: np.dtype("<f2"), 22: np.dtype("<u4"), 23: np.dtype("<u8"),
}
DTYPE_NAMES = {7: "string", 8: "complex64", 14: "bfloat16", 18: "complex128", 20: "resource",
               21: "variant"}


class CheckpointFormatError(ValueError):
    """A checkpoint file is missing, corrupt, or holds something this reader cannot decode."""


class TensorInfo(NamedTuple):
    shape: Tuple[int, ...]
    dtype: np.dtype


def _dtype(code: int, name: str, where: str) -> np.dtype:
    if code not in DTYPES:
        kind = DTYPE_NAMES.get(code, f"DataType {code}")
        raise CheckpointFormatError(f"{where}: tensor {name!r} has unsupported dtype {kind}")
    return DTYPES[code]


def _shape(buf: Optional[bytes]) -> Tuple[int, ...]:
    if not buf:
        return ()
    fields = wire.parse(buf)
    if wire.first(fields, 3, 0):
        raise CheckpointFormatError("tensor shape of unknown rank")
    return tuple(wire.to_signed64(wire.first(wire.parse(d), 1, 0)) for _, d in fields.get(2, []))


def _slice(buf: bytes, shape: Tuple[int, ...]) -> Tuple[slice, ...]:
    """TensorSliceProto -> numpy index; an extent without length covers the whole dimension."""
    extents = [wire.parse(e) for _, e in wire.parse(buf).get(1, [])]
    if not extents:
        return tuple(slice(None) for _ in shape)
    if len(extents) != len(shape):
        raise CheckpointFormatError(f"slice of rank {len(extents)} for a tensor of shape {shape}")
    index = []
    for ext in extents:
        start = wire.to_signed64(wire.first(ext, 1, 0))
        length = wire.first(ext, 2)
        index.append(slice(start, None if length is None else start + wire.to_signed64(length)))
    return tuple(index)


def _tensor_proto_values(buf: bytes, dtype: np.dtype) -> np.ndarray:
    """The flat values of a TensorProto: ``tensor_content`` or the typed repeated field."""
    fields = wire.parse(buf)
    content = wire.first(fields, 4)
    if content is not None:
        return np.frombuffer(content, dtype=dtype)
    if dtype == np.float32:
        return wire.repeated_fixed(fields, 5, "<f4")
    if dtype == np.float64:
        return wire.repeated_fixed(fields, 6, "<f8")
    if dtype == np.float16:
        return np.asarray(wire.repeated_varints(fields, 13), np.uint16).view(np.float16)
    if dtype == np.int64:
        return np.asarray([wire.to_signed64(v) for v in wire.repeated_varints(fields, 10)],
                          np.int64)
    if dtype == np.uint64:
        return np.asarray(wire.repeated_varints(fields, 17), np.uint64)
    if dtype == np.uint32:
        return np.asarray(wire.repeated_varints(fields, 16), np.uint32)
    if dtype == np.bool_:
        return np.asarray(wire.repeated_varints(fields, 11), np.bool_)
    # int32, int16, int8, uint8, uint16 are all stored in int_val.
    return np.asarray([wire.to_signed64(v) for v in wire.repeated_varints(fields, 7)],
                      np.int64).astype(dtype)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CheckpointFormatError(f"cannot read checkpoint file {path}: {e}") from e


class CheckpointReader:
    """Read a TF checkpoint given its prefix (V2) or its file (V1).

    ``reader.format`` is 'v2' or 'v1'; ``reader.tensors`` maps name -> TensorInfo(shape, dtype);
    ``reader.read(name)`` returns the tensor as a numpy array.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        if os.path.isfile(prefix + ".index"):
            self.format = "v2"
            self._open_v2()
        elif os.path.isfile(prefix):
            self.format = "v1"
            self._open_v1()
        else:
            raise CheckpointFormatError(
                f"no TF checkpoint at {prefix!r}: expected a V2 bundle ({prefix}.index + "
                f"{prefix}.data-*) or a V1 checkpoint file {prefix}")

    # -- V2 tensor bundle ---------------------------------------------------------------
    def _open_v2(self) -> None:
        index_path = self.prefix + ".index"
        data = _read_bytes(index_path)
        self._entries: Dict[str, Tuple[int, int, int]] = {}
        self.tensors: Dict[str, TensorInfo] = {}
        num_shards = None
        try:
            for key, value in iter_table(data, index_path):
                fields = wire.parse(bytes(value))
                if key == b"":
                    num_shards = wire.first(fields, 1, 1)
                    if wire.first(fields, 2, 0) != 0:
                        raise CheckpointFormatError(
                            f"{index_path}: big-endian bundle; only little-endian is supported")
                    continue
                name = key.decode("utf-8")
                if fields.get(7):
                    raise CheckpointFormatError(
                        f"{index_path}: tensor {name!r} is saved as partitioned slices, which "
                        f"this reader does not assemble")
                dtype = _dtype(wire.first(fields, 1, 0), name, index_path)
                self.tensors[name] = TensorInfo(_shape(wire.first(fields, 2)), dtype)
                self._entries[name] = (wire.first(fields, 3, 0), wire.first(fields, 4, 0),
                                       wire.first(fields, 5, 0))
        except (TableFormatError, wire.WireFormatError) as e:
            raise CheckpointFormatError(f"corrupt checkpoint index: {e}") from e
        if num_shards is None:
            raise CheckpointFormatError(f"{index_path}: no bundle header (is it a V2 index?)")
        self._shards = [f"{self.prefix}.data-{i:05d}-of-{num_shards:05d}"
                        for i in range(num_shards)]
        for path in self._shards:
            if not os.path.isfile(path):
                raise CheckpointFormatError(f"checkpoint data shard missing: {path}")

    def _read_v2(self, name: str) -> np.ndarray:
        shard, offset, size = self._entries[name]
        info = self.tensors[name]
        expected = int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize
        if size != expected or not 0 <= shard < len(self._shards):
            raise CheckpointFormatError(
                f"{self.prefix}.index: entry {name!r} says {size} bytes in shard {shard}, but a "
                f"{info.dtype} tensor of shape {info.shape} needs {expected} bytes")
        path = self._shards[shard]
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(size)
        if len(raw) != size:
            raise CheckpointFormatError(f"{path}: truncated; tensor {name!r} needs bytes "
                                        f"[{offset}, {offset + size})")
        return np.frombuffer(raw, dtype=info.dtype).reshape(info.shape).copy()

    # -- V1 TensorSlice table -----------------------------------------------------------
    def _open_v1(self) -> None:
        path = self.prefix
        data = _read_bytes(path)
        self.tensors = {}
        self._slices: Dict[str, List[Tuple[bytes, bytes]]] = {}
        meta_seen = False
        try:
            for key, value in iter_table(data, path):
                fields = wire.parse(bytes(value))
                if key == b"":
                    meta_seen = True
                    meta = wire.parse(wire.first(fields, 1, b""))
                    for _, t in meta.get(1, []):
                        t = wire.parse(t)
                        name = wire.first(t, 1, b"").decode("utf-8")
                        dtype = _dtype(wire.first(t, 3, 0), name, path)
                        self.tensors[name] = TensorInfo(_shape(wire.first(t, 2)), dtype)
                    continue
                saved = wire.first(fields, 2)
                if saved is None:
                    raise CheckpointFormatError(f"{path}: table entry without slice data")
                saved = wire.parse(saved)
                name = wire.first(saved, 1, b"").decode("utf-8")
                self._slices.setdefault(name, []).append(
                    (wire.first(saved, 2, b""), wire.first(saved, 3, b"")))
        except (TableFormatError, wire.WireFormatError) as e:
            raise CheckpointFormatError(f"corrupt V1 checkpoint: {e}") from e
        if not meta_seen:
            raise CheckpointFormatError(f"{path}: no TensorSlice metadata (is it a V1 checkpoint?)")
        for name in self.tensors:
            if name not in self._slices:
                raise CheckpointFormatError(f"{path}: tensor {name!r} has metadata but no data")

    def _read_v1(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        out = np.zeros(info.shape, info.dtype)
        covered = np.zeros(info.shape, bool)
        for slice_buf, tensor_buf in self._slices[name]:
            index = _slice(slice_buf, info.shape)
            target_shape = out[index].shape
            values = _tensor_proto_values(tensor_buf, info.dtype)
            if values.size != int(np.prod(target_shape, dtype=np.int64)):
                raise CheckpointFormatError(
                    f"{self.prefix}: tensor {name!r}: a slice holds {values.size} values for a "
                    f"region of shape {target_shape}")
            out[index] = values.reshape(target_shape)
            covered[index] = True
        if not covered.all():
            raise CheckpointFormatError(f"{self.prefix}: tensor {name!r} is not fully covered "
                                        f"by its saved slices")
        return out

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array of its saved shape and dtype."""
        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.prefix}")
        return self._read_v2(name) if self.format == "v2" else self._read_v1(name)


def read_checkpoint(prefix: str) -> Dict[str, np.ndarray]:
    """Every tensor of a TF checkpoint (V1 or V2) as name -> numpy array."""
    reader = CheckpointReader(prefix)
    return {name: reader.read(name) for name in sorted(reader.tensors)}
