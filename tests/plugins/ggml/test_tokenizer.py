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


CORPUS = [TEXT, "Hello world", "  two leading spaces", "numbers 1234567 and 3.14159", "émoji 🤖 and 中文",
          "tabs\tnew\nlines\r\n", "isn't it; we'll see (maybe) [x] {y} <z>", ""]


def spm_folder(folder: Path) -> Path:
    """A Llama-2-style tokenizer (SentencePiece BPE, byte fallback, '▁' spaces) trained here, in HF's format."""
    import json

    from tokenizers import Tokenizer as Rust
    from tokenizers import decoders, models, normalizers, trainers

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Rust(models.BPE())
    trained.normalizer = normalizer
    trained.train_from_iterator([TEXT * 3, *CORPUS] * 20, trainer=trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=list("abcdefghijklmnopqrstuvwxyz▁"), show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    # Llama's layout: <unk> <s> </s>, the 256 byte tokens, then the pieces
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)),
              *sorted(learned["vocab"], key=learned["vocab"].get)]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Rust(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>",
                                byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}')
    return folder


def test_sentencepiece_both_ways(tmp_path: Path) -> None:
    import json

    from enigma_ggml.tokenizer import sentencepiece_bpe, vocabulary_from_tokenizer_json

    folder = spm_folder(tmp_path / "spm")
    data = json.loads((folder / "tokenizer.json").read_text())
    size = len(data["model"]["vocab"])
    vocabulary = vocabulary_from_tokenizer_json(data, size, source="tokenizer.json")
    assert vocabulary.model == "llama" and vocabulary.add_space_prefix is True
    assert vocabulary.types[3] == 6 and vocabulary.types[0] == 2 and vocabulary.types[1] == 3  # byte, unk, control
    rebuilt = sentencepiece_bpe(vocabulary.tokens, vocabulary.types, vocabulary.scores)
    original = Tokenizer(folder)
    for text in CORPUS:
        ids = original.encode(text, add_special_tokens=False)
        assert rebuilt.encode(text, add_special_tokens=False).ids == ids, text
        assert rebuilt.decode(ids) == original.decode(ids)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "smollm", "default"])
def test_each_pre_tokenizer_splits_as_llama_cpp_says(pre: str) -> None:
    from enigma_ggml.tokenizer import byte_level_bpe

    alphabet = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    tokenizer = byte_level_bpe(alphabet, [1] * len(alphabet), [], pre)
    pieces = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str("it's 12345 ok!!  fine")]
    expected = {  # llama-vocab.cpp's regexes, applied in turn
        "gpt-2": ["it", "'s", "Ġ12345", "Ġok", "!!", "Ġ", "Ġfine"],
        "llama-bpe": ["it", "'s", "Ġ", "123", "45", "Ġok", "!!", "Ġ", "Ġfine"],
        "qwen2": ["it", "'s", "Ġ", "1", "2", "3", "4", "5", "Ġok", "!!", "Ġ", "Ġfine"],
        "smollm": ["it", "'s", "Ġ", "1", "2", "3", "4", "5", "Ġok", "!!", "Ġ", "Ġfine"],
        "default": ["it", "'", "s", "Ġ", "123", "45", "Ġok", "!!", "Ġ", "Ġfine"],
    }[pre]
    assert pieces == expected


def test_other_vocabularies_are_refused(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "wpm.gguf"), "llama")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[UNK]", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(NotAvailableError, match="tokenizer.ggml.model 'bert' is not rebuilt yet"):
        tokenizer_from_gguf(gguf.GGUFReader(str(tmp_path / "wpm.gguf")), source="wpm.gguf")
