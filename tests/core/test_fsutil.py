"""Atomic writes never leave half a file."""

from __future__ import annotations

import os
import stat

import pytest

from enigma.fsutil import atomic_open, atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_content(tmp_path):
    target = tmp_path / "a" / "file.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["file.txt"]


def test_failure_mid_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "weights.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_open(target, "wb") as handle:
        handle.write(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["weights.bin"]


def test_file_mode_is_set_before_content(tmp_path):
    target = tmp_path / "keys.json"
    atomic_write_text(target, "secret", file_mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
