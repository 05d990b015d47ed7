"""A GGUF's tokenizer rebuilt from its metadata gives the original tokenizer's ids."""

from __future__ import annotations

from pathlib import Path

import pytest
from enigma_ggml.export import write_gguf
from enigma_ggml.tokenizer import tokenizer_from_gguf

from enigma.errors import NotAvailableError
from enigma.llm import resolve_model_path
from enigma.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

TEXT = ("def join(a, *p):\n    \"\"\"Join two or more pathname components.\"\"\"\n"
        "<|im_start|>user\nWhat does os.path.join do? Ünïcödé, tabs\tand  spaces.<|im_end|>\n")


def test_enigma_tiny_round_trip(tmp_path: Path) -> None:
    folder = resolve_model_path("enigma-tiny")
    write_gguf(folder, tmp_path / "tiny.gguf", "Q8_0")
    reader = gguf.GGUFReader(str(tmp_path / "tiny.gguf"))
    rebuilt = tokenizer_from_gguf(reader)
    original = Tokenizer(folder)
    for text in (TEXT, TEXT * 3, " leading space", "\n\n"):
        ids = original.encode(text, add_special_tokens=False)
        assert rebuilt.encode(text, add_special_tokens=False).ids == ids
        assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
    assert rebuilt.get_vocab_size() == original.vocab_size
    assert reader.get_field("tokenizer.chat_template").contents() == original.chat_template


def test_other_vocabularies_are_refused(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(NotAvailableError, match="tokenizer.ggml.model 'llama' is not rebuilt yet"):
        tokenizer_from_gguf(gguf.GGUFReader(str(tmp_path / "spm.gguf")), source="spm.gguf")
