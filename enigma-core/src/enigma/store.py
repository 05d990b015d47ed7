"""The model store: named models on disk that are never half-written.

Each model is a folder ``<models_dir>/<name>/<tag>/`` holding a Hugging Face
model folder and ``manifest.json`` (name, tag, source, every file with its
size and sha256, architecture, parameters, quantization, created...). Names
follow Ollama's ``name[:tag]`` (tag ``latest`` by default).

Writes go to a staging folder first and are renamed into place under a
per-model lock (``fcntl.flock``), so two pulls of one model do not collide,
readers see the old model or the new one, and a crash leaves no half model
(stale staging folders are swept on the next write).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs

from enigma.errors import BadRequestError, EnigmaError, NotFoundError
from enigma.fsutil import atomic_write_text, default_dir_mode

DEFAULT_TAG = "latest"
MANIFEST = "manifest.json"
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_COPY_CHUNK = 1 << 20


class StoreError(EnigmaError):
    """The store could not be read or written (disk full, corrupt files...)."""


@attrs.frozen(order=True)
class ModelName:
    """A validated ``name:tag``."""

    name: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """Parse ``name`` or ``name:tag``; refuse anything that could escape the store."""
        name, colon, tag = str(text).strip().partition(":")
        tag = tag if colon else DEFAULT_TAG
        for what, value, limit in (("name", name, 80), ("tag", tag, 128)):
            if not value or len(value) > limit or not _PART.match(value) or ".." in value:
                raise BadRequestError(
                    f"model {what} {value!r} in {text!r} is not valid: use letters, digits, '.', '_' and '-' "
                    f"(at most {limit}, starting with a letter or digit, no '..'), as in 'llama3:8b'")
        return cls(name.lower(), tag)


@attrs.frozen
class FileEntry:
    """One file of a stored model."""

    path: str
    """Relative to the model folder, '/'-separated."""
    size: int
    sha256: str


@attrs.frozen(kw_only=True)
class Manifest:
    """What the store knows about one model."""

    name: str
    tag: str
    source: str
    files: tuple[FileEntry, ...]
    created: str
    architecture: str | None = None
    parameters: int | None = None
    context_length: int | None = None
    dtype: str | None = None
    quantization: str | None = None
    license: str | None = None
    system: str | None = None
    """A default system prompt (Modelfile ``SYSTEM``)."""
    template: str | None = None
    """A chat template overriding the tokenizer's (Modelfile ``TEMPLATE``)."""
    defaults: dict[str, Any] = attrs.field(factory=dict)
    """Default sampling parameters (Modelfile ``PARAMETER``)."""
    adapter: str | None = None
    speculative: dict[str, Any] = attrs.field(factory=dict)
    """Speculative decoding the model is served with (Modelfile ``PARAMETER draft``): SpeculativeConfig fields."""

    @property
    def model_name(self) -> ModelName:
        return ModelName(self.name, self.tag)

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files)

    @property
    def id(self) -> str:
        """A short digest of the files' contents: equal ids, identical weights."""
        digest = hashlib.sha256()
        for entry in sorted(self.files, key=lambda e: e.path):
            digest.update(f"{entry.path}\0{entry.sha256}\n".encode())
        return digest.hexdigest()[:12]

    def to_json(self) -> str:
        return json.dumps(cattrs.unstructure(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["files"] = tuple(FileEntry(**entry) for entry in data["files"])
        return cls(**data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_hashing(source: Path, target: Path) -> str:
    digest = hashlib.sha256()
    with source.open("rb") as reader, target.open("wb") as writer:
        while chunk := reader.read(_COPY_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def describe_folder(folder: Path) -> dict[str, Any]:
    """Architecture, parameter count, context length, dtype, quantization and licence of a model folder."""
    info: dict[str, Any] = {}
    config_path = folder / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        info["architecture"] = (config.get("architectures") or [None])[0]
        info["context_length"] = config.get("max_position_embeddings")
        info["dtype"] = config.get("torch_dtype") or config.get("dtype")
        from enigma.quantize import quantization_type

        info["quantization"] = quantization_type(config)
    info["parameters"] = _count_parameters(folder)
    if info["parameters"] is None and config_path.exists():  # weights a plugin reads (GGUF) count themselves
        info["parameters"] = (config.get("quantization_config") or {}).get("parameters")
    info["license"] = _license_of(folder)
    return info


def _count_parameters(folder: Path) -> int | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def _license_of(folder: Path) -> str | None:
    readme = folder / "README.md"
    if readme.exists():
        match = re.search(r"^license:\s*(\S+)", readme.read_text(encoding="utf-8", errors="replace"), re.M)
        if match:
            return match.group(1)
    return None


class Store:
    """Models by name on local disk."""

    def __init__(self, root: str | Path | None = None) -> None:
        if root is None:
            from enigma.paths import get_paths

            root = get_paths().models_dir
        self.root = Path(root)

    # ---------------------------------------------------------------- reading

    def folder(self, name: ModelName) -> Path:
        return self.root / name.name / name.tag

    def get(self, model: str | ModelName) -> Manifest:
        """The manifest of a stored model; a clear error when it is not there."""
        name = model if isinstance(model, ModelName) else ModelName.parse(model)
        path = self.folder(name) / MANIFEST
        try:
            return Manifest.from_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NotFoundError(f"model {str(model)!r} not found in the store; see `enigma list` for the models "
                                f"you have, or `enigma pull {name.name}` to fetch it") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"the manifest of {name} ({path}) is corrupt ({exc}); remove the model with "
                             f"`enigma rm {name}` and pull it again") from exc

    def exists(self, model: str | ModelName) -> bool:
        name = model if isinstance(model, ModelName) else ModelName.parse(model)
        return (self.folder(name) / MANIFEST).exists()

    def path(self, model: str | ModelName) -> Path:
        """The folder of a stored model, ready for the loader."""
        manifest = self.get(model)
        return self.folder(manifest.model_name)

    def manifest_for(self, model: str, folder: Path) -> Manifest | None:
        """The manifest of the store model ``model`` names, if ``folder`` (what
        :func:`enigma.llm.resolve_model_path` found for it) is that model's folder;
        None for plain folders and packaged models."""
        try:
            name = ModelName.parse(model)
        except BadRequestError:
            return None
        if not self.exists(name) or Path(folder) != self.folder(name):
            return None
        return self.get(name)

    def list(self) -> list[Manifest]:
        """Every stored model, by name."""
        manifests = []
        if self.root.is_dir():
            for path in sorted(self.root.glob(f"*/*/{MANIFEST}")):
                with contextlib.suppress(ValueError, TypeError, KeyError, OSError):
                    manifests.append(Manifest.from_json(path.read_text(encoding="utf-8")))
        return sorted(manifests, key=lambda m: (m.name, m.tag))

    def verify(self, model: str | ModelName) -> list[str]:
        """Problems with a stored model's files (missing, wrong size, wrong checksum); empty if none."""
        manifest = self.get(model)
        folder = self.folder(manifest.model_name)
        problems = []
        for entry in manifest.files:
            path = folder / entry.path
            if not path.exists():
                problems.append(f"{entry.path} is missing")
            elif path.stat().st_size != entry.size:
                problems.append(f"{entry.path} has {path.stat().st_size} bytes, expected {entry.size}")
            elif sha256_file(path) != entry.sha256:
                problems.append(f"{entry.path} does not match its sha256")
        return problems

    # ---------------------------------------------------------------- writing

    @contextlib.contextmanager
    def lock(self, name: ModelName) -> Iterator[None]:
        """Hold the model's write lock (blocking) for the duration."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with (locks / f"{name.name}@{name.tag}.lock").open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def staging(self, name: ModelName) -> Iterator[Path]:
        """A fresh folder to fill; removed if the block fails. Hold :meth:`lock` around it."""
        root = self.root / ".staging"
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{name.name}@{name.tag}.*"):  # left by a crash; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{name.name}@{name.tag}.", dir=root))
        folder.chmod(default_dir_mode())
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def commit(self, staged: Path, manifest: Manifest) -> Manifest:
        """Write the manifest into ``staged`` and move it into place, replacing any older version."""
        atomic_write_text(staged / MANIFEST, manifest.to_json())
        final = self.folder(manifest.model_name)
        final.parent.mkdir(parents=True, exist_ok=True)
        trash = None
        if final.exists():
            trash = self.root / ".staging" / f"old.{uuid.uuid4().hex}"
            final.rename(trash)
        staged.rename(final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return manifest

    def add_folder(self, model: str | ModelName, source_folder: Path, files: Iterable[str], *, source: str,
                   progress: Callable[[str, int], None] | None = None,
                   extra_files: Mapping[str, Path] | None = None, **fields: Any) -> Manifest:
        """Copy ``files`` (relative paths) of ``source_folder`` into the store as ``model``, and
        ``extra_files`` (relative path in the model -> a file anywhere) beside them."""
        name = model if isinstance(model, ModelName) else ModelName.parse(model)
        sources = [(relative, source_folder / relative) for relative in files]
        sources += [(relative, Path(path)) for relative, path in (extra_files or {}).items()]
        with self.lock(name), self.staging(name) as staged:
            entries = []
            for relative, origin in sources:
                target = staged / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    digest = _copy_hashing(origin, target)
                except OSError as exc:
                    raise _io_error(exc, origin) from exc
                entries.append(FileEntry(relative, target.stat().st_size, digest))
                if progress:
                    progress(relative, target.stat().st_size)
            manifest = self.make_manifest(name, staged, entries, source=source, **fields)
            return self.commit(staged, manifest)

    @staticmethod
    def make_manifest(name: ModelName, folder: Path, entries: list[FileEntry], *, source: str,
                      **fields: Any) -> Manifest:
        described = {key: value for key, value in describe_folder(folder).items() if value is not None}
        return Manifest(name=name.name, tag=name.tag, source=source, files=tuple(entries),
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        **{**described, **fields})

    def remove(self, model: str | ModelName) -> Manifest:
        manifest = self.get(model)
        name = manifest.model_name
        with self.lock(name):
            folder = self.folder(name)
            trash = self.root / ".staging" / f"rm.{uuid.uuid4().hex}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(trash)  # atomic: the model vanishes at once
            shutil.rmtree(trash, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.parent.rmdir()
        return manifest

    def copy(self, source: str | ModelName, destination: str | ModelName) -> Manifest:
        original = self.get(source)
        target = destination if isinstance(destination, ModelName) else ModelName.parse(destination)
        if target == original.model_name:
            raise BadRequestError(f"cannot copy {target} onto itself")
        folder = self.folder(original.model_name)
        with self.lock(target), self.staging(target) as staged:
            for entry in original.files:
                (staged / entry.path).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(folder / entry.path, staged / entry.path)  # same bytes, no extra space
                except OSError:
                    shutil.copyfile(folder / entry.path, staged / entry.path)
            manifest = attrs.evolve(original, name=target.name, tag=target.tag,
                                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            return self.commit(staged, manifest)


def _io_error(exc: OSError, path: Path) -> EnigmaError:
    import errno

    if exc.errno == errno.ENOSPC:
        return StoreError(f"disk full while writing {path.name}; free some space (`enigma rm` old models) "
                          "and try again — nothing was half-written")
    return StoreError(f"cannot copy {path}: {exc.strerror or exc}")
