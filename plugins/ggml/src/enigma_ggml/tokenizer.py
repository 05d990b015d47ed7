"""A GGUF file's tokenizer, rebuilt as a ``tokenizers.Tokenizer`` (byte-level BPE, ``tokenizer.ggml.model = gpt2``).

The vocabulary is ``tokenizer.ggml.tokens`` (ids in order), the merges
``tokenizer.ggml.merges``, and tokens typed CONTROL (3) become special tokens,
USER_DEFINED (4) added ones. The pre-tokenizer is GPT-2's byte-level split,
which is llama.cpp's ``default``; files that name another ``tokenizer.ggml.pre``
are refused until their split is ported. SentencePiece vocabularies
(``llama``) are not rebuilt yet.
"""

from __future__ import annotations

from typing import Any

from enigma.errors import NotAvailableError

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def tokenizer_from_gguf(reader: Any, *, source: str = "GGUF file") -> Any:
    """The tokenizer of an open ``gguf.GGUFReader``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise NotAvailableError(f"{source}: tokenizer.ggml.model {model!r} is not rebuilt yet; byte-level BPE "
                                "(gpt2) is")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre != "default":
        raise NotAvailableError(f"{source}: pre-tokenizer {pre!r} is not ported yet; 'default' (GPT-2's) is")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", []))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges", [])]
    added = {i for i, kind in enumerate(types) if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)}
    vocab = {token: index for index, token in enumerate(tokens)}  # added ones too: they keep their ids
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    for index in sorted(added):  # in id order, so each gets its own id back
        token = AddedToken(tokens[index], special=types[index] == TOKEN_CONTROL, normalized=False)
        if types[index] == TOKEN_CONTROL:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    return tokenizer
