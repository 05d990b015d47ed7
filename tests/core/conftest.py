"""Fixtures for the runtime tests: tiny model folders, made once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import make_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(name, **options)`` -> folder, cached per distinct arguments."""
    made: dict[tuple, Path] = {}

    def make(name: str = "llama-gqa", **options) -> Path:
        key = (name, tuple(sorted(options.items(), key=str)))
        if key not in made:
            made[key] = make_model(tmp_path_factory.mktemp(name), name, **options)
        return made[key]

    return make
