"""``enigma quantize`` as a user runs it: with no quantizer installed, and with the int8 fixture plugin."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import make_model

WITHOUT_QUANTIZERS = {"ENIGMA_DISABLE_PLUGINS": "ggml,exl2"}


def test_without_quantizers_it_says_what_to_install(enigma):
    listed = enigma("quantize", "--list", env=WITHOUT_QUANTIZERS)
    assert listed.returncode == 0 and "No quantizer is installed" in listed.stdout
    assert "enigma-plugin-ggml" in listed.stdout
    failed = enigma("quantize", "enigma-tiny", "--bits", "4", env=WITHOUT_QUANTIZERS)
    assert failed.returncode == 1
    assert "no quantizer is installed, so type 'Q4_K_M' cannot be made; install one" in failed.stderr


def test_usage_errors(enigma):
    assert enigma("quantize").returncode == 2
    assert "exactly one of --type and --bits" in enigma("quantize", "x", "--type", "A", "--bits", "4").stderr


def test_quantize_into_the_store_and_run_it(enigma, installed_plugins, tmp_path):
    folder = make_model(tmp_path / "model", "llama-gqa")
    assert re.search(r"^INT8 +int8 \(enigma-plugin-int8\)", enigma("quantize", "--list").stdout, re.M)
    done = enigma("quantize", str(folder), "--type", "int8", "--name", "mine:int8")
    assert done.returncode == 0, done.stderr
    listed = enigma("list").stdout
    assert "mine:int8" in listed and "INT8" in listed
    answer = enigma("run", "mine:int8", "Hello", "--max-tokens", "3", "--temperature", "0", "--local")
    assert answer.returncode == 0, answer.stderr
    unknown = enigma("quantize", str(folder), "--type", "Q9_X")
    assert unknown.returncode == 1 and "installed types: " in unknown.stderr and "INT8 (int8)" in unknown.stderr
    assert "Q4_K_M (ggml)" in unknown.stderr
