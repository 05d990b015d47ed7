"""Builtin plugin ``safetensors``: weights from *.safetensors files (never pickle)."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_weight_sources(register):
    register("safetensors", "enigma.weights:SafetensorsSource", summary="*.safetensors files, sharded or not")
