"""A GGUF file's metadata and tensor directory, read in one pass over a memory map.

The ``gguf`` package's ``GGUFReader`` keeps a numpy view per array element:
on a Llama 3 vocabulary (128k tokens, 280k merges) it takes about 8 s to
open, on every load. This reads the same container (GGUF v2/v3, little
endian) with ``struct`` and ``numpy.frombuffer``: strings are decoded once,
numeric arrays are single views, and the tensors are views of the map — the
open takes a fraction of a second. The values come back as Python objects
(str, int, float, bool, lists) with their GGUF value types, which is what
``gguf.GGUFWriter.add_key_value`` takes to copy them.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import attrs
import numpy as np

MAGIC = b"GGUF"
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
         7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
VALUE_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
               "I32": np.int32, "I64": np.int64}
"""Tensor types whose data is plain values (the others are blocks, read as bytes)."""


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands (the message says where and why)."""


@attrs.frozen
class Field:
    """One metadata entry: its value and GGUF value type (``item_type`` for arrays)."""

    name: str
    value: Any
    value_type: int
    item_type: int | None = None

    def contents(self) -> Any:
        """The value (as ``gguf.ReaderField.contents`` gives it)."""
        return self.value


@attrs.frozen
class TensorEntry:
    """One tensor of the directory."""

    name: str
    type_id: int
    dims: tuple[int, ...]
    """ggml's order: the row length first."""
    offset: int
    """Absolute, in the file."""
    n_bytes: int
    data: np.ndarray = attrs.field(repr=False, eq=False)
    """uint8 ``[..., row_bytes]`` for block types, else the values, shaped in HF order (rows first)."""


class GGUFHeader:
    """The fields and tensors of a GGUF file, memory-mapped (``fields``: by name; ``tensors``: in file order)."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        with self.path.open("rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        buffer = self._map
        if buffer[:4] != MAGIC:
            raise GGUFFormatError(f"it starts with {bytes(buffer[:4])!r}, not b'GGUF'")
        self._at = 4
        version = self._scalar("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} (this reader takes 2 and 3; byte-swapped files read as "
                                  "huge versions)")
        tensor_count, kv_count = self._scalar("<Q"), self._scalar("<Q")
        self.fields: dict[str, Field] = {}
        for _ in range(kv_count):
            name = self._string()
            kind = self._scalar("<I")
            if kind == ARRAY:
                item, count = self._scalar("<I"), self._scalar("<Q")
                self.fields[name] = Field(name, self._array(item, count), kind, item)
            else:
                self.fields[name] = Field(name, self._value(kind), kind)
        entries = []
        for _ in range(tensor_count):
            name = self._string()
            dims = tuple(self._scalar("<Q") for _ in range(self._scalar("<I")))
            entries.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        alignment = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        start = -(-self._at // alignment) * alignment
        self.tensors: list[TensorEntry] = []
        size = len(buffer)
        for name, dims, type_id, offset in entries:
            try:
                kind = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise GGUFFormatError(f"tensor {name!r} has ggml type {type_id}, which the gguf package "
                                      "does not know") from None
            values, block = gguf.GGML_QUANT_SIZES[kind]
            count = int(np.prod(dims)) if dims else 1
            n_bytes = count * block // values
            begin = start + offset
            if begin + n_bytes > size:
                raise GGUFFormatError(f"truncated: tensor {name!r} needs bytes up to {begin + n_bytes}, the file "
                                      f"has {size}")
            shape = tuple(reversed(dims))
            if kind.name in VALUE_TYPES:
                data = np.frombuffer(buffer, dtype=VALUE_TYPES[kind.name], count=count, offset=begin).reshape(shape)
            else:
                row = shape[-1] // values * block
                data = np.frombuffer(buffer, dtype=np.uint8, count=n_bytes, offset=begin).reshape(*shape[:-1], row)
            self.tensors.append(TensorEntry(name, type_id, dims, begin, n_bytes, data))

    # ------------------------------------------------------------ reading the map

    def _scalar(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self._map, self._at)
        except struct.error:
            raise GGUFFormatError(f"truncated: the header ends at byte {len(self._map)}") from None
        self._at += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._scalar("<Q")
        end = self._at + length
        if end > len(self._map):
            raise GGUFFormatError(f"truncated: a string runs past the end, at byte {self._at}")
        text = self._map[self._at:end].decode("utf-8", errors="replace")
        self._at = end
        return text

    def _value(self, kind: int) -> Any:
        if kind == STRING:
            return self._string()
        if kind not in SCALARS:
            raise GGUFFormatError(f"unknown metadata value type {kind} at byte {self._at}")
        return self._scalar(SCALARS[kind])

    def _array(self, item: int, count: int) -> list[Any]:
        if item == STRING:
            return [self._string() for _ in range(count)]
        if item == ARRAY:
            raise GGUFFormatError("nested metadata arrays are not supported")
        if item not in NUMPY:
            raise GGUFFormatError(f"unknown metadata array type {item} at byte {self._at}")
        dtype = np.dtype(NUMPY[item])
        end = self._at + count * dtype.itemsize
        if end > len(self._map):
            raise GGUFFormatError(f"truncated: an array runs past the end, at byte {self._at}")
        values = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._at).tolist()
        self._at = end
        return values

    # ------------------------------------------------------------ gguf.GGUFReader's names, for shared callers

    def get_field(self, key: str) -> Field | None:
        return self.fields.get(key)
