"""Builtin plugin ``bert``: BERT encoders for embedding models (sentence-transformers)."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_architectures(register):
    register("BertModel", "enigma.models.bert:BertModel", summary="BERT encoder for embedding models")
