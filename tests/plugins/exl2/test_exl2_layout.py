"""EXL2's tensors: every bit width packs and unpacks, scale codes round-trip, group tables are checked."""

from __future__ import annotations

import numpy as np
import pytest
from enigma_exl2.layout import (
    BIT_WIDTHS,
    pack_columns,
    pack_scales,
    packed_rows,
    read_groups,
    unpack_columns,
    unpack_scales,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from enigma.errors import BadRequestError


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BIT_WIDTHS), rows=st.integers(1, 200), columns=st.integers(1, 40),
       seed=st.integers(0, 2**31))
def test_every_width_round_trips(bits: int, rows: int, columns: int, seed: int) -> None:
    values = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, columns))
    packed = pack_columns(values, bits)
    assert packed.dtype == np.int32 and packed.shape == (packed_rows(rows, bits), columns)
    assert np.array_equal(unpack_columns(packed, bits, rows), values)


@pytest.mark.parametrize("bits, per_words", [(2, (16, 1)), (3, (32, 3)), (4, (8, 1)), (5, (32, 5)), (6, (16, 3)),
                                             (8, (4, 1))])
def test_values_per_word_are_exllamav2s(bits: int, per_words: tuple[int, int]) -> None:
    values, words = per_words
    assert packed_rows(values, bits) == words


def test_stream_is_lsb_first_down_each_column() -> None:
    values = np.array([[1], [2], [3], [0], [1], [2], [3], [0], [3], [3], [3], [3], [3], [3], [3], [3]])
    (word,) = pack_columns(values, 2)[:, 0].view(np.uint32)
    assert word == sum(int(v) << (2 * i) for i, v in enumerate(values[:, 0]))
    three = pack_columns(np.full((32, 1), 5), 3).view(np.uint32)[:, 0]   # 101 repeated: value 10 straddles
    stream = sum(5 << (3 * i) for i in range(32))
    assert [int(w) for w in three] == [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(3)]


def test_scales_pack_eight_nibbles_minus_one() -> None:
    codes = np.random.default_rng(1).integers(1, 17, size=(5, 64))
    packed = pack_scales(codes)
    assert packed.shape == (5, 8)
    assert int(packed.view(np.uint32)[0, 0]) == sum(int(c - 1) << (4 * i) for i, c in enumerate(codes[0, :8]))
    assert np.array_equal(unpack_scales(packed), codes)


def test_bad_values_are_refused() -> None:
    with pytest.raises(BadRequestError, match="does not fit 4 bits"):
        pack_columns(np.array([[16]]), 4)
    with pytest.raises(BadRequestError, match="not 7-bit"):
        pack_columns(np.array([[1]]), 7)
    with pytest.raises(BadRequestError, match="1..16"):
        pack_scales(np.zeros((1, 8), dtype=int))


def test_group_tables_are_read_and_checked() -> None:
    table = np.array([4, 0, 4, 4, 3, 8], dtype=np.int16)     # 32 + 32 rows at 4 bits (4 words each), 32 at 3 (3)
    groups = read_groups(table, 11, 96)
    assert [(g.bits, g.first_row, g.rows, g.first_qrow) for g in groups] == [(4, 0, 32, 0), (4, 32, 32, 4),
                                                                              (3, 64, 32, 8)]
    assert read_groups(table, 11, 90)[-1].rows == 26          # a last group shorter than its words hold
    with pytest.raises(BadRequestError, match="covers 96 rows of a Linear with 128"):
        read_groups(table, 11, 128)
    with pytest.raises(BadRequestError, match="consecutive"):
        read_groups(np.array([4, 4, 4, 8], dtype=np.int16), 12, 64)
    with pytest.raises(BadRequestError, match="7-bit group"):
        read_groups(np.array([7, 0], dtype=np.int16), 10, 32)
