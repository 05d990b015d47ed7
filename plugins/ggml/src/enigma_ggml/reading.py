"""Reading a GGUF file as a model: its config, tokenizer and tensors under Hugging Face names.

:class:`GGUFModelFile` opens the file
(:mod:`enigma_ggml.header`, memory-mapped: nothing is read until a tensor is
asked for; the ``gguf`` package's reader takes seconds on a large vocabulary) and says, with
the file's name, what is wrong when it is not a GGUF file, is cut short, or
holds an architecture or layout enigma does not run. From its metadata it
derives the config.json a Hugging Face folder would have (llama → Llama,
qwen2 → Qwen2; the key names are llama.cpp's), and every tensor is offered
under its HF name with its logical shape and ggml type.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from enigma.errors import BadRequestError, NotAvailableError
from enigma_ggml.names import ROPE_FREQS, hf_name

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""The GGUF architectures enigma runs, and the HF architecture each becomes."""


@attrs.frozen
class GGUFTensor:
    """One tensor of a GGUF file, named and shaped as the HF checkpoint would have it."""

    name: str
    """Its GGUF name (``blk.0.attn_q.weight``)."""
    hf_name: str
    type_name: str
    """ggml's type (``Q4_K``, ``F32``...)."""
    shape: tuple[int, ...]
    """Logical shape, HF order (``[out_features, in_features]``)."""
    data: Any = attrs.field(repr=False, eq=False)
    """The reader's memory-mapped array: uint8 ``[..., row_bytes]`` for block types, else the values."""

    @property
    def packed(self) -> bool:
        """Whether it stays in its GGUF bytes when loaded (a 2-D tensor of a type other than F32)."""
        return len(self.shape) == 2 and self.type_name != "F32"


def open_reader(path: Path) -> Any:
    """The :class:`enigma_ggml.header.GGUFHeader` of ``path``, with errors that name the file and what is wrong."""
    from enigma_ggml.header import GGUFFormatError, GGUFHeader

    if not path.is_file():
        raise BadRequestError(f"GGUF file {path} does not exist")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise BadRequestError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); give a .gguf "
                              "model file, or a Hugging Face model folder")
    try:
        return GGUFHeader(path)
    except GGUFFormatError as exc:
        if str(exc).startswith("truncated"):
            raise BadRequestError(f"{path} is truncated ({str(exc).removeprefix('truncated: ')}); download it "
                                  "again") from None
        raise BadRequestError(f"{path}: {exc}; the file is damaged, or newer than this install reads "
                              f"(gguf {_gguf_version()}: pip install -U gguf)") from None


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(version unknown)"


class GGUFModelFile:
    """A GGUF model file enigma can run (architecture llama or qwen2)."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        self.reader = open_reader(self.path)
        self.architecture = str(self.field("general.architecture", ""))
        if self.architecture not in ARCHITECTURES:
            raise NotAvailableError(f"{self.path}: architecture {self.architecture!r} is not supported; enigma runs "
                                    f"GGUF files of {', '.join(ARCHITECTURES)}")
        self.tensors: dict[str, GGUFTensor] = {}
        self.rope_freqs: np.ndarray | None = None
        for tensor in self.reader.tensors:
            if tensor.name == ROPE_FREQS:
                self.rope_freqs = np.asarray(tensor.data, dtype=np.float32)
                continue
            name = hf_name(tensor.name)
            if name is None:
                raise NotAvailableError(f"{self.path}: tensor {tensor.name!r} is not one of the {self.architecture} "
                                        "layout enigma runs (dense attention and MLP)")
            shape = tuple(int(d) for d in reversed(tensor.dims))
            self.tensors[name] = GGUFTensor(tensor.name, name, gguf.GGMLQuantizationType(tensor.type_id).name, shape,
                                            tensor.data)

    def field(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.value

    def arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.architecture}.{key}", default)

    @property
    def file_type(self) -> str:
        """llama.cpp's file type (``Q4_K_M``), from ``general.file_type``; without one, the type most of the
        matrices have."""
        import collections

        import gguf

        value = self.field("general.file_type")
        try:
            return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (TypeError, ValueError):
            counts = collections.Counter(t.type_name for t in self.tensors.values() if len(t.shape) == 2)
            return counts.most_common(1)[0][0] if counts else "F32"

    def heads(self) -> tuple[int, int]:
        heads = self.arch_field("attention.head_count")
        kv_heads = self.arch_field("attention.head_count_kv", heads)
        if isinstance(heads, list) or isinstance(kv_heads, list):
            raise NotAvailableError(f"{self.path}: head counts that vary per layer are not supported")
        return int(heads), int(kv_heads)

    def hf_config(self) -> dict[str, Any]:
        """The config.json of the model, from the metadata (the key names llama.cpp reads)."""
        missing = [key for key in ("embedding_length", "block_count", "feed_forward_length",
                                   "attention.head_count") if self.arch_field(key) is None]
        if missing:
            raise BadRequestError(f"{self.path} lacks metadata {', '.join(f'{self.architecture}.{k}' for k in missing)}"
                                  "; it is not a complete model file")
        hidden = int(self.arch_field("embedding_length"))
        heads, kv_heads = self.heads()
        head_dim = int(self.arch_field("attention.key_length", hidden // heads))
        rotary = int(self.arch_field("rope.dimension_count", head_dim))
        if rotary != head_dim:
            raise NotAvailableError(f"{self.path}: rotary embedding over {rotary} of {head_dim} head dimensions "
                                    "(partial rotary) is not supported")
        embedding = self.tensors.get("model.embed_tokens.weight")
        if embedding is None:
            raise BadRequestError(f"{self.path} has no token_embd.weight; it is not a complete model file")
        config: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "hidden_size": hidden,
            "intermediate_size": int(self.arch_field("feed_forward_length")),
            "num_hidden_layers": int(self.arch_field("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": int(self.arch_field("context_length", 2048)),
            "rms_norm_eps": float(self.arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self.arch_field("rope.freq_base", 10000.0)),
            "vocab_size": embedding.shape[0],
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "torch_dtype": "float32",
        }
        for key in ("bos", "eos", "pad"):
            value = self.field(f"tokenizer.ggml.{key}_token_id")
            if value is not None:
                config[f"{key}_token_id"] = int(value)
        config.update(self._rope_scaling())
        return config

    def _rope_scaling(self) -> dict[str, Any]:
        kind = self.arch_field("rope.scaling.type")
        if self.rope_freqs is not None:
            return {"rope_scaling": {"rope_type": "freq_factors", "factors": [float(f) for f in self.rope_freqs]}}
        if kind in (None, "none"):
            return {}
        if kind == "linear":
            return {"rope_scaling": {"rope_type": "linear", "factor": float(self.arch_field("rope.scaling.factor"))}}
        raise NotAvailableError(f"{self.path}: rope scaling {kind!r} is not supported (linear and Llama 3's "
                                "frequency factors are)")

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every tensor the model built from the metadata has, present at that shape (errors name the tensor)."""
        for name, shape in expected.items():
            tensor = self.tensors.get(name)
            if tensor is None:
                if name == "lm_head.weight":  # a tied head reads the embedding
                    continue
                raise BadRequestError(f"{self.path} lacks tensor {_gguf(name)} ({name}), which its metadata implies; "
                                      "the file is incomplete")
            if tensor.shape != shape:
                raise BadRequestError(f"{self.path}: tensor {tensor.name} has shape {list(tensor.shape)} but the "
                                      f"metadata ({self.architecture}.*) implies {list(shape)}; the file is damaged "
                                      "or its metadata wrong")
        extra = sorted(set(self.tensors) - set(expected))
        if extra:
            raise BadRequestError(f"{self.path}: tensor {self.tensors[extra[0]].name} does not belong to the model "
                                  "its metadata describes")

    def __iter__(self) -> Iterator[GGUFTensor]:
        return iter(self.tensors.values())


def _gguf(name: str) -> str:
    from enigma_ggml.names import gguf_name

    return gguf_name(name) or name
