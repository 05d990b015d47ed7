"""How a cached value is stored: framed bytes that say when they are damaged.

A frame is ``ENC1``, a CRC-32 of the payload, then the payload (zlib). A
value that fails any check — truncated, bit-flipped, another program's
bytes under our key — raises :class:`CorruptEntry`, and the cache drops it
instead of serving it.
"""

from __future__ import annotations

import json
import pickle
import struct
import zlib
from typing import Any

MAGIC = b"ENC1"
_HEADER = struct.Struct(">4sI")


class CorruptEntry(ValueError):
    """A stored value that cannot be read back as it was written."""


def frame(payload: bytes) -> bytes:
    body = zlib.compress(payload, 1)
    return _HEADER.pack(MAGIC, zlib.crc32(body)) + body


def unframe(blob: bytes) -> bytes:
    if not isinstance(blob, bytes | bytearray | memoryview) or len(blob) < _HEADER.size:
        raise CorruptEntry("shorter than a frame header")
    magic, crc = _HEADER.unpack_from(blob)
    body = bytes(blob[_HEADER.size:])
    if magic != MAGIC:
        raise CorruptEntry(f"unknown frame {magic!r}")
    if zlib.crc32(body) != crc:
        raise CorruptEntry("checksum mismatch")
    try:
        return zlib.decompress(body)
    except zlib.error as exc:
        raise CorruptEntry(f"cannot decompress: {exc}") from None


def encode_json(value: Any) -> bytes:
    return frame(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def decode_json(blob: bytes) -> Any:
    payload = unframe(blob)
    try:
        return json.loads(payload)
    except ValueError as exc:
        raise CorruptEntry(f"not JSON: {exc}") from None


def encode_pickle(value: Any) -> bytes:
    return frame(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def decode_pickle(blob: bytes) -> Any:
    payload = unframe(blob)
    try:
        return pickle.loads(payload)
    except Exception as exc:
        raise CorruptEntry(f"cannot unpickle: {exc}") from None
