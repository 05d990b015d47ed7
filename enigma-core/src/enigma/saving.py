"""Writing model folders in Hugging Face format (the loader's inverse).

A saved folder holds config.json, model.safetensors, the tokenizer files and
generation_config.json, so transformers, enigma and anything else that reads
the Hub's format can load it. Every file is written atomically.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import attrs
import torch

from enigma.dtypes import dtype_name
from enigma.fsutil import atomic_write_text, default_file_mode

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")
SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")
"""What travels with a model's weights when a command makes a new model from it (quantize, merge)."""


def copy_side_files(source: str | Path, target: str | Path, names: tuple[str, ...] = SIDE_FILES) -> None:
    """Copy the files of ``names`` that ``source`` has into ``target``, each atomically."""
    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        return
    for name in names:
        if (source / name).is_file():
            with tempfile.NamedTemporaryFile(dir=target, prefix=f".{name}.", delete=False) as tmp:
                shutil.copyfile(source / name, tmp.name)
            os.chmod(tmp.name, default_file_mode())
            os.replace(tmp.name, target / name)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, *, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, default_file_mode())
    try:
        save_file({name: _own_storage(t.detach()) for name, t in tensors.items()}, tmp,
                  metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` contiguous and alone in its storage (safetensors refuses views of shared memory,
    such as projections a backend fused)."""
    tensor = tensor.contiguous()
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


def save_model_folder(model: Any, hf_config: dict[str, Any], out: str | Path, *,
                      tokenizer_folder: str | Path | None = None, dtype: torch.dtype | None = None,
                      generation_config: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (an enigma model with ``checkpoint_tensors()``) as a Hugging Face folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = model.checkpoint_tensors()
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    stored = next(iter(tensors.values())).dtype
    save_safetensors(tensors, out / "model.safetensors")
    config = {**hf_config, "torch_dtype": dtype_name(stored) if stored.is_floating_point else "float32"}
    config.pop("dtype", None)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer_folder is not None:
        copy_side_files(tokenizer_folder, out, TOKENIZER_FILES)
    if generation_config is not None:
        atomic_write_text(out / "generation_config.json", json.dumps(generation_config, indent=2) + "\n")
    return out


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
"""safetensors' dtype codes and the ``torch`` dtypes they name."""


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    for code, name in SAFETENSORS_DTYPES.items():
        if getattr(torch, name) == dtype:
            return code
    raise ValueError(f"safetensors cannot store dtype {dtype}")


@attrs.frozen
class TensorLayout:
    """One tensor a :class:`StreamingSafetensorsWriter` will write: known before its values are."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class StreamingSafetensorsWriter:
    """Write a model's tensors one at a time into safetensors shards, holding none of the others.

    The ``safetensors`` library writes a whole dict at once; a merge or a
    conversion of a model larger than memory needs each tensor written as it
    is made. Since every tensor's name, dtype and shape is known up front, each
    shard's header (the format's JSON table of offsets) is written first and
    the data appended in order. Shards are split at ``max_shard_bytes`` and
    indexed by ``model.safetensors.index.json`` as Hugging Face does; a single
    shard is ``model.safetensors``. Files appear under their names only when
    complete; a failure removes every partial file.
    """

    def __init__(self, folder: Path, layout: list[TensorLayout], *, max_shard_bytes: int = 5 * 2**30,
                 metadata: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[TensorLayout]] = [[]]
        size = 0
        for entry in layout:
            if shards[-1] and size + entry.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += entry.nbytes
        count = len(shards)
        self.files = (["model.safetensors"] if count == 1 else
                      [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._shards = shards
        self._order = [entry for shard in shards for entry in shard]
        self._next = 0
        self._shard = -1
        self._handle: Any = None
        self._tmp: str | None = None
        self._written: list[str] = []

    def __enter__(self) -> StreamingSafetensorsWriter:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; tensors come in the layout's order, with its dtype and shape."""
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name!r} is beyond the {len(self._order)} tensors of the layout")
        expected = self._order[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected.name, expected.dtype, expected.shape):
            raise ValueError(f"tensor {name!r} ({tensor.dtype}, {tuple(tensor.shape)}) is not the next in the "
                             f"layout: {expected.name!r} ({expected.dtype}, {expected.shape})")
        if self._handle is None or self._shard_done():
            self._open_next_shard()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self._next += 1

    def _shard_done(self) -> bool:
        return self._next == sum(len(shard) for shard in self._shards[:self._shard + 1])

    def _open_next_shard(self) -> None:
        self._close_shard()
        self._shard += 1
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for entry in self._shards[self._shard]:
            header[entry.name] = {"dtype": safetensors_code(entry.dtype), "shape": list(entry.shape),
                                  "data_offsets": [offset, offset + entry.nbytes]}
            offset += entry.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        target = self.folder / self.files[self._shard]
        fd, self._tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=self.folder)
        os.chmod(self._tmp, default_file_mode())
        self._handle = os.fdopen(fd, "wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)

    def _close_shard(self) -> None:
        if self._handle is None:
            return
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        os.replace(self._tmp, self.folder / self.files[self._shard])
        self._written.append(self.files[self._shard])
        self._tmp = None

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None and self._next != len(self._order):
            missing = self._order[self._next].name
            self._abort()
            raise ValueError(f"the writer was closed before tensor {missing!r}; "
                             f"{len(self._order) - self._next} tensors were never written")
        if exc_type is not None:
            self._abort()
            return
        if not self._order:
            self._open_next_shard()
        self._close_shard()
        if len(self.files) > 1:
            weight_map = {entry.name: self.files[i] for i, shard in enumerate(self._shards) for entry in shard}
            total = sum(entry.nbytes for entry in self._order)
            atomic_write_text(self.folder / "model.safetensors.index.json",
                              json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    def _abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)
        for name in self._written:
            (self.folder / name).unlink(missing_ok=True)
