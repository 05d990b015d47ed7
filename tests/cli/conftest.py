"""Run the installed ``enigma`` command as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENIGMA = Path(sys.executable).parent / "enigma"


@pytest.fixture
def enigma(enigma_home):
    """``enigma(*args, env=..., input=...)`` -> CompletedProcess (text)."""
    if not ENIGMA.exists():
        pytest.fail(f"the enigma command is not installed at {ENIGMA}; pip install -e ./enigma-cli")

    def run(*args: str, env: dict[str, str] | None = None, input: str | None = None):
        return subprocess.run([str(ENIGMA), *args], capture_output=True, text=True, input=input,
                              env={**os.environ, **(env or {})}, timeout=120)

    return run
