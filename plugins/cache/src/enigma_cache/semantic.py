"""The semantic cache's index: prompt embeddings, and the exact keys of the answers they got."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np


class SemanticIndex:
    """Unit vectors per space (same model, tenant and options), searched exactly; the oldest entries go
    first once ``max_entries`` are held."""

    def __init__(self, embed: Callable[[str], Any], *, threshold: float, max_entries: int) -> None:
        self._embed = embed
        self.threshold = threshold
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        """(space, key) -> unit vector, oldest first."""
        self._spaces: dict[str, tuple[list[str], np.ndarray | None]] = {}
        """space -> (keys, stacked vectors): rebuilt when a space changes."""

    def embed(self, text: str) -> np.ndarray:
        vector = np.asarray(self._embed(text), dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector

    def nearest(self, space: str, vector: np.ndarray) -> tuple[str, float] | None:
        """The key of the most similar prompt in ``space`` at or above the threshold, and its similarity."""
        with self._lock:
            keys, matrix = self._matrix(space)
            if matrix is None:
                return None
            scores = matrix @ vector
            best = int(np.argmax(scores))
            score = float(scores[best])
        return (keys[best], score) if score >= self.threshold else None

    def add(self, space: str, key: str, vector: np.ndarray) -> None:
        with self._lock:
            self._entries.pop((space, key), None)
            self._entries[(space, key)] = vector
            self._spaces.pop(space, None)
            while len(self._entries) > self.max_entries:
                (old_space, _), _ = self._entries.popitem(last=False)
                self._spaces.pop(old_space, None)

    def forget(self, key: str) -> None:
        """Drop ``key`` (its answer expired or was evicted)."""
        with self._lock:
            for entry in [entry for entry in self._entries if entry[1] == key]:
                del self._entries[entry]
                self._spaces.pop(entry[0], None)

    def __len__(self) -> int:
        return len(self._entries)

    def _matrix(self, space: str) -> tuple[list[str], np.ndarray | None]:
        if space not in self._spaces:
            keys = [key for (entry_space, key) in self._entries if entry_space == space]
            vectors = [self._entries[(space, key)] for key in keys]
            self._spaces[space] = (keys, np.stack(vectors) if vectors else None)
        return self._spaces[space]
