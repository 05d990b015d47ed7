"""Bringing models into the store: from the Hugging Face Hub, a local folder, or a package.

Sources:

- ``hf:ORG/REPO[@REVISION]`` — through huggingface_hub (its repository API,
  URLs, auth headers and HTTP session; ``HF_ENDPOINT`` and ``HF_TOKEN`` are
  honoured), only the files a model needs, each checked against the hub's
  checksum (sha256 for LFS files, the git blob id for the rest). Files are
  written as ``<name>.part`` in a per-model folder under the cache and
  renamed when complete; a pull that is interrupted (even killed) resumes
  each file from its last byte with an HTTP ``Range`` request.
- ``hf:ORG/REPO --file NAME.gguf`` — one model file of a repository (GGUF
  repositories hold one file per quantization), then imported as below;
- a local folder in Hugging Face format (or one enigma wrote: a GGUF with its config);
- a local model file (``x.gguf``), made a folder by the plugin that reads it;
- a packaged model's name (``enigma-tiny``), copied from its package.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from enigma.errors import BadRequestError, EnigmaError, NotFoundError
from enigma.store import FileEntry, Manifest, ModelName, Store, StoreError, sha256_file

NEEDED_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "README.md", "LICENSE*", "training.json",
    # sentence-transformers folders (embedding models)
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "*_Pooling/config.json",
    "*_Normalize/*",
)
"""The files of a model folder that enigma uses (never pickled ``*.bin`` weights)."""
LOCAL_FILES = (*NEEDED_FILES, "*.gguf")
"""Those of a local folder: a GGUF beside its config.json (as enigma writes them) too. Hub repositories'
GGUF files are fetched one at a time, by ``--file``."""

Progress = Callable[[str, int], None]


class PullError(EnigmaError):
    """A pull failed: no network, unknown repository, corrupt download."""


def needed(path: str, *, local: bool = False) -> bool:
    """Whether a file of a model folder (a '/'-separated relative path) is one enigma uses."""
    depth = path.count("/")
    return any(fnmatch(path, pattern) for pattern in (LOCAL_FILES if local else NEEDED_FILES)
               if pattern.count("/") == depth)


def default_name(source: str) -> str:
    """The store name a source gets without ``--name``."""
    if source.startswith("hf:"):
        repo, _, revision = source[3:].partition("@")
        base = repo.rsplit("/", 1)[-1].lower()
        return f"{base}:{revision}" if revision and _is_tag(revision) else base
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve().name.lower()
    if path.is_file():
        return _name_from_file(path.stem)
    return source


def _name_from_file(stem: str) -> str:
    """A store name from a file name: ``TinyLlama-1.1B-Chat.Q4_K_M`` -> ``tinyllama-1.1b-chat.q4_k_m``."""
    import re

    cleaned = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return re.sub(r"\.\.+", ".", cleaned)[:80] or "model"


def _is_tag(text: str) -> bool:
    try:
        ModelName.parse(f"x:{text}")
        return True
    except BadRequestError:
        return False


def pull(source: str, *, name: str | None = None, store: Store | None = None,
         progress: Progress | None = None, file: str | None = None) -> Manifest:
    """Put the model ``source`` names into the store; return its manifest. ``file``: the one model file of
    a hub repository to fetch (``NAME.gguf``)."""
    store = store or Store()
    if file is not None and not source.startswith("hf:"):
        raise BadRequestError(f"--file picks a file of a hub repository (hf:ORG/REPO); {source!r} is not one — "
                              "give a local file as the source itself")
    if source.startswith("hf:") and file is not None:
        target = ModelName.parse(name or _name_from_file(Path(file).stem))
        return pull_hub_file(source, file, target, store)
    target = ModelName.parse(name or default_name(source))
    if source.startswith("hf:"):
        return pull_hub(source, target, store)
    path = Path(source).expanduser()
    if path.is_dir():
        return pull_folder(path, target, store, source=f"folder:{path.resolve()}", progress=progress)
    if path.is_file():
        return pull_model_file(path, target, store, source=f"file:{path.resolve()}", progress=progress)
    from enigma.plugins import get_host

    packaged = {impl.name: impl for impl in get_host().registry.implementations("model")}
    key = source.removesuffix(":latest")
    if key in packaged:
        folder = Path(packaged[key].create())
        return pull_folder(folder, target, store, source=f"package:{key}", progress=progress)
    known = ", ".join(sorted(packaged)) or "none installed"
    raise NotFoundError(f"cannot pull {source!r}: it is not hf:ORG/REPO[@REVISION], not a folder, and not a "
                        f"packaged model ({known}); for example `enigma pull hf:HuggingFaceTB/SmolLM2-135M`")


def repull_hint(manifest: Manifest) -> str:
    """The command that fetches a stored model again."""
    kind, _, rest = manifest.source.partition(":")
    if kind == "modelfile":
        return f"enigma create {manifest.name}:{manifest.tag} -f <its Modelfile>"
    if kind == "hf-file":
        repo_revision, _, file = rest.partition(":")
        return f"enigma pull hf:{repo_revision.split('@')[0]} --file {file} --name {manifest.name}:{manifest.tag}"
    source = {"hf": f"hf:{rest.split('@')[0]}", "folder": rest, "package": rest,
              "file": rest}.get(kind, manifest.source)
    return f"enigma pull {source} --name {manifest.name}:{manifest.tag}"


def pull_folder(folder: Path, target: ModelName, store: Store, *, source: str,
                progress: Progress | None = None) -> Manifest:
    if not (folder / "config.json").exists():
        raise BadRequestError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and needed(str(p.relative_to(folder)), local=True))
    if not any(f.endswith((".safetensors", ".gguf")) for f in files):
        raise BadRequestError(f"{folder} has no .safetensors weights; enigma never loads pickled weights "
                              "(convert them with transformers' save_pretrained(safe_serialization=True))")
    return store.add_folder(target, folder, files, source=source, progress=progress)


def pull_model_file(path: Path, target: ModelName, store: Store, *, source: str,
                    progress: Progress | None = None) -> Manifest:
    """A single-file model (``x.gguf``) into the store: made a folder by its plugin, the file copied in."""
    import tempfile

    from enigma.model_files import import_model_file

    with tempfile.TemporaryDirectory(prefix="enigma-import-") as scratch:
        import_model_file(path, scratch)
        files = sorted(str(p.relative_to(scratch)) for p in Path(scratch).rglob("*") if p.is_file())
        return store.add_folder(target, Path(scratch), files, source=source, progress=progress)


def git_blob_sha1(path: Path) -> str:
    """The id git gives a file's contents (what the hub reports for non-LFS files)."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_info(source: str) -> tuple[str, Any, str]:
    """``(repo, model info with file metadata, endpoint)`` of ``hf:ORG/REPO[@REVISION]``, with clear errors."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    repo, _, revision = source[3:].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise BadRequestError(f"{source!r}: expected hf:ORG/REPO or hf:ORG/REPO@REVISION")
    api = huggingface_hub.HfApi()
    endpoint = api.endpoint
    try:
        info = api.model_info(repo, revision=revision or None, files_metadata=True)
    except hub_errors.RepositoryNotFoundError:
        raise NotFoundError(f"{repo} does not exist on {endpoint} (or it is private: set HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise NotFoundError(f"{repo} has no revision {revision!r} on {endpoint}") from None
    except hub_errors.HfHubHTTPError as exc:
        raise PullError(f"the hub at {endpoint} refused {repo}: {exc}") from None
    except Exception as exc:  # connection errors come from the HTTP client huggingface_hub uses
        raise PullError(f"cannot reach {endpoint} to pull {repo} ({type(exc).__name__}: {exc}); check your "
                        "network, or HF_ENDPOINT for a mirror") from None
    return repo, info, endpoint


def _fetch(repo: str, info: Any, endpoint: str, sibling: Any, path: Path) -> FileEntry:
    """Download one file of a repository into ``path`` (resuming), verified against the hub's checksum."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    url = huggingface_hub.hf_hub_url(repo, sibling.rfilename, revision=info.sha, endpoint=endpoint)
    try:
        download(url, path, size=sibling.size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError("disk full while downloading; free some space and run the same "
                             "`enigma pull` again: it resumes") from None
        raise PullError(f"writing {sibling.rfilename} failed: {exc}") from None
    except hub_errors.HfHubHTTPError as exc:
        raise PullError(f"the hub at {endpoint} refused {sibling.rfilename}: {exc}") from None
    except Exception as exc:  # the HTTP client's connection and protocol errors
        raise PullError(f"downloading {sibling.rfilename} from {endpoint} failed ({type(exc).__name__}: "
                        f"{exc}); run the same `enigma pull` again to resume") from None
    return _verified(path, sibling)


def pull_hub_file(source: str, file: str, target: ModelName, store: Store) -> Manifest:
    """Download one model file (``NAME.gguf``) of ``hf:ORG/REPO[@REVISION]`` and import it into the store."""
    from enigma.paths import get_paths

    repo, info, endpoint = _hub_info(source)
    sibling = next((s for s in info.siblings or [] if s.rfilename == file), None)
    if sibling is None:
        models = sorted(s.rfilename for s in info.siblings or [] if s.rfilename.endswith(".gguf"))
        raise NotFoundError(f"{repo} has no file {file!r}; its model files: {', '.join(models) or 'none'}")
    downloads = get_paths().cache_dir / "pulls" / f"{target.name}@{target.tag}"
    path = downloads / Path(file).name
    _fetch(repo, info, endpoint, sibling, path)
    manifest = pull_model_file(path, target, store, source=f"hf-file:{repo}@{info.sha}:{file}")
    shutil.rmtree(downloads, ignore_errors=True)
    return manifest


def pull_hub(source: str, target: ModelName, store: Store) -> Manifest:
    """Download ``hf:ORG/REPO[@REVISION]`` (resumable, verified) into the store."""
    repo, info, endpoint = _hub_info(source)
    wanted = [s for s in info.siblings or [] if needed(s.rfilename)]
    if not any(s.rfilename.endswith(".safetensors") for s in wanted):
        ggufs = sorted(s.rfilename for s in info.siblings or [] if s.rfilename.endswith(".gguf"))
        if ggufs:
            raise PullError(f"{repo} holds GGUF files, one per quantization; pick one with --file, e.g. "
                            f"`enigma pull hf:{repo} --file {ggufs[0]}` (it has {', '.join(ggufs[:8])}"
                            f"{', ...' if len(ggufs) > 8 else ''})")
        raise PullError(f"{repo} has no .safetensors weights; enigma never loads pickled weights")
    from enigma.paths import get_paths

    downloads = get_paths().cache_dir / "pulls" / f"{target.name}@{target.tag}"
    with store.lock(target), store.staging(target) as staged:
        entries = []
        for sibling in wanted:
            path = downloads / sibling.rfilename
            entries.append(_fetch(repo, info, endpoint, sibling, path))
            (staged / sibling.rfilename).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, staged / sibling.rfilename)
        manifest = store.make_manifest(target, staged, entries, source=f"hf:{repo}@{info.sha}")
        store.commit(staged, manifest)
    shutil.rmtree(downloads, ignore_errors=True)
    return manifest


def download(url: str, path: Path, *, size: int | None) -> None:
    """Fetch ``url`` into ``path``, resuming a ``path.part`` left by an earlier try."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, tqdm

    if path.exists() and (size is None or path.stat().st_size == size):
        return
    part = path.with_name(path.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # not a prefix of this file: start over
        part.unlink()
        have = 0
    headers = build_hf_headers()
    if have:
        headers["Range"] = f"bytes={have}-"
    with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=30) as response:
        if response.status_code == 416 and size is not None and have == size:  # already complete
            part.rename(path)
            return
        hf_raise_for_status(response)
        if response.status_code != 206:  # the server ignored the range: start over
            have = 0
        with part.open("ab" if have else "wb") as handle, tqdm(
                total=size, initial=have, unit="B", unit_scale=True, desc=path.name,
                name="huggingface_hub.http_get") as bar:
            for chunk in response.iter_bytes():
                handle.write(chunk)
                handle.flush()  # what arrived survives a kill
                bar.update(len(chunk))
            os.fsync(handle.fileno())
    part.rename(path)


def _verified(path: Path, sibling: Any) -> FileEntry:
    size = path.stat().st_size
    digest = sha256_file(path)
    lfs = sibling.lfs
    expected_sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
    if expected_sha is not None:
        ok = digest == expected_sha
    elif sibling.blob_id:
        ok = git_blob_sha1(path) == sibling.blob_id
    else:
        ok = sibling.size is None or size == sibling.size
    if not ok:
        path.unlink(missing_ok=True)
        raise PullError(f"{sibling.rfilename} is corrupt (its checksum does not match the hub's); the bad copy "
                        "was deleted — run the same `enigma pull` again to download it afresh")
    return FileEntry(sibling.rfilename, size, digest)
