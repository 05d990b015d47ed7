"""A GGUF file as an enigma model folder: what ``enigma pull x.gguf``, ``FROM x.gguf`` and ``LLM("x.gguf")`` use.

The folder holds the GGUF file itself (``model.gguf``, a link to the
original until the store copies it) and what the rest of enigma reads from a
Hugging Face folder, all derived from the file's metadata: config.json (with
``quantization_config``: quant method ``ggml``, the file type, the file, its
tensor types and parameter count), tokenizer.json rebuilt from
``tokenizer.ggml.*``, tokenizer_config.json (special tokens, ``add_bos``),
generation_config.json (bos, eos and end-of-turn ids) and the chat template
from ``tokenizer.chat_template``. The file is checked first — magic,
truncation, architecture, every tensor's shape against the metadata — so a
bad file is refused before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from enigma_ggml.reading import GGUFModelFile
from enigma_ggml.weights import GGUF_FILE


def import_gguf(path: str | Path, folder: str | Path) -> dict[str, Any]:
    """Fill the empty ``folder`` with a model folder for the GGUF file ``path``; returns its config.json."""
    import torch

    from enigma.loader import skip_weight_init
    from enigma.models import architecture_class
    from enigma.plugins import get_host
    from enigma_ggml.tokenizer import tokenizer_from_gguf

    path, folder = Path(path).resolve(), Path(folder)
    file = GGUFModelFile(path)
    config = file.hf_config()
    _, cls = architecture_class(config, source=str(path), host=get_host())
    with torch.device("meta"), skip_weight_init():
        model = cls.from_hf_config(config)
    file.check_shapes({name: tuple(t.shape) for name, t in model.state_dict().items()})
    tokenizer = tokenizer_from_gguf(file.reader, source=str(path))
    parameters = sum(int(_count(t.shape)) for t in file)
    config["quantization_config"] = {"quant_method": "ggml", "type": file.file_type, "file": GGUF_FILE,
                                     "tensor_types": sorted({t.type_name for t in file}),
                                     "parameters": parameters}
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", _tokenizer_config(file))
    _write_json(folder / "generation_config.json", _generation_config(file))
    template = file.field("tokenizer.chat_template")
    if template:
        (folder / "chat_template.jinja").write_text(str(template), encoding="utf-8")
    _write_json(folder / "config.json", config)
    (folder / GGUF_FILE).symlink_to(path)
    return config


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _token(file: GGUFModelFile, key: str) -> str | None:
    index = file.field(f"tokenizer.ggml.{key}_token_id")
    tokens = file.field("tokenizer.ggml.tokens") or []
    return str(tokens[int(index)]) if index is not None and 0 <= int(index) < len(tokens) else None


def _tokenizer_config(file: GGUFModelFile) -> dict[str, Any]:
    model = file.field("tokenizer.ggml.model")
    pre = file.field("tokenizer.ggml.pre", "default")
    default_bos = model == "llama" or pre in ("llama-bpe", "llama3", "llama-v3")  # llama.cpp's defaults
    config: dict[str, Any] = {"add_bos_token": bool(file.field("tokenizer.ggml.add_bos_token", default_bos)),
                              "add_eos_token": bool(file.field("tokenizer.ggml.add_eos_token", False)),
                              "model_max_length": int(file.arch_field("context_length", 2048))}
    for key in ("bos", "eos", "unknown", "padding"):
        token = _token(file, key)
        if token is not None:
            config[{"unknown": "unk_token", "padding": "pad_token"}.get(key, f"{key}_token")] = token
    return config


def _generation_config(file: GGUFModelFile) -> dict[str, Any]:
    config: dict[str, Any] = {}
    bos = file.field("tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)
    stops = [file.field(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    stops = list(dict.fromkeys(int(s) for s in stops if s is not None))
    if stops:
        config["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
