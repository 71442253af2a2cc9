"""Minimal protobuf wire-format decoding (the few TF messages the checkpoint reader needs).

Protobuf encodes a message as (tag, value) pairs; tag = field_number << 3 | wire_type with
wire types 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32. NumPy/stdlib only.
"""
from typing import Dict, Iterator, List, Tuple, Union

import numpy as np

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
Value = Union[int, bytes]


class WireFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_varint(buf: bytes, pos: int) -> Tuple[int, int]:
    """Decode one base-128 varint at ``pos`` -> (value, new position)."""
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise WireFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireFormatError("varint longer than 10 bytes")


def to_signed64(value: int) -> int:
    """Reinterpret an unsigned 64-bit varint value as int64 (negative ints use 10 bytes)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def iter_fields(buf: bytes) -> Iterator[Tuple[int, int, Value]]:
    """Yield (field number, wire type, value): ints for varint/fixed, bytes for length-delimited."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == VARINT:
            value, pos = read_varint(buf, pos)
        elif wire == FIXED64:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == FIXED32:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wire == LENGTH:
            size, pos = read_varint(buf, pos)
            value, pos = bytes(buf[pos:pos + size]), pos + size
        else:
            raise WireFormatError(f"unsupported wire type {wire} (field {field})")
        if pos > end:
            raise WireFormatError(f"field {field} runs past the end of the message")
        yield field, wire, value


def parse(buf: bytes) -> Dict[int, List[Tuple[int, Value]]]:
    """Group a message's fields: field number -> list of (wire type, value), in order."""
    fields: Dict[int, List[Tuple[int, Value]]] = {}
    for field, wire, value in iter_fields(buf):
        fields.setdefault(field, []).append((wire, value))
    return fields


def first(fields, number: int, default=None):
    """Value of the last occurrence of a singular field (protobuf's last-one-wins), or default."""
    values = fields.get(number)
    return values[-1][1] if values else default


def repeated_varints(fields, number: int) -> List[int]:
    """A repeated integer field, packed (one LENGTH value) or not (many VARINT values)."""
    out: List[int] = []
    for wire, value in fields.get(number, []):
        if wire == LENGTH:
            pos = 0
            while pos < len(value):
                v, pos = read_varint(value, pos)
                out.append(v)
        elif wire == VARINT:
            out.append(value)
        else:
            raise WireFormatError(f"field {number}: expected varints, got wire type {wire}")
    return out


def repeated_fixed(fields, number: int, dtype: str) -> np.ndarray:
    """A repeated fixed-width field ('<f4', '<f8', ...), packed or not, as a 1-D array."""
    dtype = np.dtype(dtype)
    wire_single = FIXED32 if dtype.itemsize == 4 else FIXED64
    chunks = []
    for wire, value in fields.get(number, []):
        if wire == LENGTH:
            if len(value) % dtype.itemsize:
                raise WireFormatError(f"field {number}: packed length {len(value)} is not a "
                                      f"multiple of {dtype.itemsize}")
            chunks.append(np.frombuffer(value, dtype=dtype))
        elif wire == wire_single:
            chunks.append(np.frombuffer(value.to_bytes(dtype.itemsize, "little"), dtype=dtype))
        else:
            raise WireFormatError(f"field {number}: unexpected wire type {wire}")
    return np.concatenate(chunks) if chunks else np.zeros((0,), dtype)
