"""Writing model folders in Hugging Face format (the loader's inverse).

A saved folder holds config.json, model.safetensors, the tokenizer files and
generation_config.json, so transformers, enigma and anything else that reads
the Hub's format can load it. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from enigma.dtypes import dtype_name
from enigma.fsutil import atomic_write_text, default_file_mode

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


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
    if tokenizer_folder is not None and Path(tokenizer_folder).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_folder) / name
            if source.exists():
                with tempfile.NamedTemporaryFile(dir=out, prefix=f".{name}.", delete=False) as tmp:
                    shutil.copyfile(source, tmp.name)
                os.chmod(tmp.name, default_file_mode())
                os.replace(tmp.name, out / name)
    if generation_config is not None:
        atomic_write_text(out / "generation_config.json", json.dumps(generation_config, indent=2) + "\n")
    return out
