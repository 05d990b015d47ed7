"""The command's tests; the ``enigma`` fixture (run the installed command) is in tests/conftest.py."""

from __future__ import annotations

import sys
from pathlib import Path

ENIGMA = Path(sys.executable).parent / "enigma"
