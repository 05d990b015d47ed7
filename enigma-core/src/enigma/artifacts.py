"""Writing a model that a command makes (quantized, merged) into a folder or the store, atomically.

The maker fills a scratch folder; only a complete result is moved into place:
renamed to the ``output`` folder, or committed to the store with a manifest
(files, sizes, sha256 and the fields the caller adds). A failure leaves
nothing behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from enigma.errors import BadRequestError
from enigma.fsutil import default_dir_mode


def write_model(make: Callable[[Path], None], *, output: str | Path | None = None, name: Any = None,
                source: str, **manifest_fields: Any) -> Path:
    """Run ``make(scratch_folder)``, then publish the folder at ``output`` (which must not exist) or in the
    store as ``name`` (a :class:`enigma.store.ModelName`); returns the final folder."""
    if output is not None:
        target = Path(output)
        if target.exists():
            raise BadRequestError(f"output {target} exists; choose a new folder or remove it first")
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            make(staged)
            staged.chmod(default_dir_mode())
            staged.rename(target)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return target

    from enigma.store import FileEntry, Store, sha256_file

    store = Store()
    with store.lock(name), store.staging(name) as staged:
        make(staged)
        entries = [FileEntry(str(p.relative_to(staged)), p.stat().st_size, sha256_file(p))
                   for p in sorted(staged.rglob("*")) if p.is_file()]
        store.commit(staged, store.make_manifest(name, staged, entries, source=source, **manifest_fields))
    return store.path(name)
