"""Weight sources: where the loader reads tensors from, by file format.

Each format is a ``weight_source`` implementation (:class:`enigma.kinds.WeightSource`);
the loader opens a folder with the highest-priority source that matches it.
The builtin reads safetensors — single file or sharded with
``model.safetensors.index.json`` — memory-mapped, and never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from enigma.errors import NotFoundError
from enigma.kinds import Weights


class SafetensorsWeights:
    """The tensors of a folder's safetensors files, opened memory-mapped."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(path.name for path in folder.glob("*.safetensors"))
        if not files:
            raise NotFoundError(f"model folder {folder} has no *.safetensors weights")
        missing = [name for name in files if not (folder / name).exists()]
        if missing:
            raise NotFoundError(f"model folder {folder} lacks shard(s) {', '.join(missing)} named by "
                                "model.safetensors.index.json; re-download the model")
        self.folder = folder
        self.files = files
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self._location: dict[str, str] = {}
        from safetensors import safe_open

        for name in files:
            handle = self._stack.enter_context(safe_open(str(folder / name), framework="pt"))
            self._handles[name] = handle
            for key in handle.keys():
                self._location[key] = name

    def __enter__(self) -> SafetensorsWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def keys(self) -> Iterator[str]:
        return iter(self._location)

    def __contains__(self, key: object) -> bool:
        return key in self._location

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._location[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> Any:
        """A tensor's ``torch.dtype``, without reading it."""
        import torch

        from enigma.saving import SAFETENSORS_DTYPES

        return getattr(torch, SAFETENSORS_DTYPES[self._handles[self._location[key]].get_slice(key).get_dtype()])

    def get(self, key: str) -> Any:
        return self._handles[self._location[key]].get_tensor(key)


class SafetensorsSource:
    """The builtin ``safetensors`` weight source."""

    description = "*.safetensors files"

    def matches(self, folder: Path) -> bool:
        return any(folder.glob("*.safetensors"))

    def open(self, folder: Path) -> SafetensorsWeights:
        return SafetensorsWeights(folder)


def open_weights(folder: Path, *, host: Any) -> Weights:
    """The folder's weights, through the first weight source (by priority) that reads them."""
    sources = [impl for impl in host.registry.implementations("weight_source") if impl.availability()]
    for implementation in sources:
        source = implementation.create()
        if source.matches(folder):
            return source.open(folder)
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = (f" It has {', '.join(pickles)}: pickle files are never loaded (they can run code); "
            "convert them to safetensors first.") if pickles else ""
    readable = "; ".join(f"{impl.name}: {impl.create().description}" for impl in sources) or "none installed"
    raise NotFoundError(f"model folder {folder} has no weights that an installed weight source reads "
                        f"({readable}).{hint}")
