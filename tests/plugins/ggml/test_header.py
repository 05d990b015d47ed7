"""The fast GGUF header reader gives what gguf's GGUFReader gives, field for field and tensor for tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from enigma_ggml.export import write_gguf
from enigma_ggml.header import GGUFFormatError, GGUFHeader

from enigma.llm import resolve_model_path

gguf = pytest.importorskip("gguf")


def every_value_type(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000)
    writer.add_float32("t.f32", 0.125)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "Ünïcödé ✓")
    writer.add_array("t.strings", ["a", "", "ß" * 3])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.5])
    writer.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("b", np.arange(6, dtype=np.float16).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("source", ["every-type", "enigma-tiny-Q4_K_M"])
def test_the_same_as_ggufs_reader(source: str, tmp_path: Path) -> None:
    if source == "every-type":
        path = every_value_type(tmp_path / "types.gguf")
    else:
        path = tmp_path / "tiny.gguf"
        write_gguf(resolve_model_path("enigma-tiny"), path, "Q4_K_M")
    ours, theirs = GGUFHeader(path), gguf.GGUFReader(str(path))
    expected = {name: field for name, field in theirs.fields.items() if not name.startswith("GGUF.")}
    assert list(ours.fields) == list(expected)
    for name, field in expected.items():
        value = field.contents()
        assert ours.fields[name].value == (pytest.approx(value) if isinstance(value, float) else value), name
        assert ours.fields[name].value_type == field.types[0]
        assert ours.fields[name].item_type == (field.types[-1] if len(field.types) > 1 else None)
    assert [(t.name, t.type_id, t.dims) for t in ours.tensors] == [
        (t.name, int(t.tensor_type), tuple(int(d) for d in t.shape)) for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.data.dtype == reference.data.dtype and np.array_equal(mine.data, reference.data), mine.name


def test_damage_is_named(tmp_path: Path) -> None:
    path = every_value_type(tmp_path / "types.gguf")
    data = path.read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[:60])
    with pytest.raises(GGUFFormatError, match="truncated"):
        GGUFHeader(tmp_path / "short.gguf")
    (tmp_path / "v9.gguf").write_bytes(b"GGUF" + (9).to_bytes(4, "little") + data[8:])
    with pytest.raises(GGUFFormatError, match="GGUF version 9"):
        GGUFHeader(tmp_path / "v9.gguf")
