"""enigma-plugin-metal: enigma on Apple GPUs (torch's MPS device), backend ``metal``."""

from __future__ import annotations

__version__ = "0.1.0"
