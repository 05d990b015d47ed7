"""Single-file models (``x.gguf``) as model folders, through the ``enigma_import_model_file`` hook.

The loader and the store work with Hugging Face-style folders. A model that
comes as one file is turned into such a folder by the plugin that reads its
format (:func:`import_model_file`). ``LLM("x.gguf")`` and ``enigma run
x.gguf`` use :func:`model_file_folder`: a folder in the cache, keyed by the
file's path, size and modification time, that links to the file instead of
copying it; ``enigma pull x.gguf`` copies it into the store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from enigma.errors import NotAvailableError

PLUGIN_HINTS = {".gguf": "enigma-plugin-ggml"}
"""The plugin that reads each single-file format, for the error when none is installed."""


def import_model_file(path: str | Path, folder: str | Path, *, host: Any = None) -> None:
    """Fill the empty ``folder`` with a model folder for the model file ``path`` (the file itself may be linked)."""
    if host is None:
        from enigma.plugins import get_host

        host = get_host()
    path = Path(path).expanduser().resolve()
    handled = host.hook.enigma_import_model_file(path=path, folder=Path(folder))
    if not handled:
        hint = PLUGIN_HINTS.get(path.suffix.lower())
        advice = f"install {hint} (pip install {hint})" if hint else "give a Hugging Face model folder instead"
        raise NotAvailableError(f"{path}: no installed plugin reads {path.suffix or 'such'} model files; {advice}")


def model_file_folder(path: str | Path, *, host: Any = None) -> Path:
    """A model folder for ``path`` in the cache (made once per version of the file), linking to the file."""
    from enigma.paths import get_paths

    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = get_paths().cache_dir / "model-files"
    folder = root / f"{path.stem[:60]}-{key}"
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        import_model_file(path, staged, host=host)
        try:
            os.rename(staged, folder)
        except OSError:  # another process made it first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return folder
