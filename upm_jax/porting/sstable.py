"""Reader for TensorFlow's sorted string table (``tensorflow/core/lib/io/table``, LevelDB's format).

Layout: data blocks, a meta-index block, an index block, then a 48-byte footer (two block
handles, zero padding, the 8-byte magic). A block handle is two varints (offset, size); each
block is followed by a 5-byte trailer (1 byte compression type, 4 bytes crc, not checked).
A block holds entries (shared key bytes, unshared key bytes, value length as varints, then
the unshared key suffix and the value; keys are prefix-compressed against the previous key),
then a uint32 array of restart offsets and its uint32 length. The index block maps a separator
key to the handle of each data block. NumPy/stdlib only; compressed blocks are refused.
"""
import struct
from typing import Iterator, Tuple

from upm_jax.porting.wire import read_varint

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
NO_COMPRESSION = 0
COMPRESSION_NAMES = {1: "snappy", 2: "zlib"}


class TableFormatError(ValueError):
    """The bytes are not a readable (uncompressed) TF sorted string table."""


def _handle(buf: bytes, pos: int) -> Tuple[int, int, int]:
    offset, pos = read_varint(buf, pos)
    size, pos = read_varint(buf, pos)
    return offset, size, pos


def _block(data: bytes, offset: int, size: int, where: str) -> memoryview:
    end = offset + size
    if offset < 0 or end + BLOCK_TRAILER_SIZE > len(data):
        raise TableFormatError(f"{where}: block [{offset}, {end}) lies outside the file "
                               f"({len(data)} bytes); the file is truncated or corrupt")
    kind = data[end]
    if kind != NO_COMPRESSION:
        raise TableFormatError(
            f"{where}: block at offset {offset} is {COMPRESSION_NAMES.get(kind, f'type-{kind}')}"
            f"-compressed; only uncompressed tables (as TF writes checkpoints) are supported")
    return memoryview(data)[offset:end]


def _block_entries(block: memoryview, where: str) -> Iterator[Tuple[bytes, memoryview]]:
    if len(block) < 4:
        raise TableFormatError(f"{where}: block of {len(block)} bytes is too small")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise TableFormatError(f"{where}: block restart array ({num_restarts}) is corrupt")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        value_len, pos = read_varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise TableFormatError(f"{where}: corrupt block entry at byte {pos}")
        key = key[:shared] + bytes(block[pos:pos + unshared])
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


def iter_table(data: bytes, where: str) -> Iterator[Tuple[bytes, memoryview]]:
    """Yield every (key, value) of the table held in ``data``, in key order.

    ``where`` names the file in error messages.
    """
    if len(data) < FOOTER_SIZE:
        raise TableFormatError(f"{where}: {len(data)} bytes is too short for a TF table "
                               f"(footer alone is {FOOTER_SIZE})")
    footer = data[-FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)
    if magic != TABLE_MAGIC:
        raise TableFormatError(f"{where}: not a TF sorted string table (bad magic number "
                               f"{magic:#018x}, expected {TABLE_MAGIC:#018x})")
    _, _, pos = _handle(footer, 0)  # meta-index handle: unused by TF checkpoints
    index_offset, index_size, _ = _handle(footer, pos)
    index = _block(data, index_offset, index_size, where)
    for _, handle in _block_entries(index, where):
        offset, size, _ = _handle(bytes(handle), 0)
        yield from _block_entries(_block(data, offset, size, where), where)
