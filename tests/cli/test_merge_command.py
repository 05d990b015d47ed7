"""``enigma merge`` as a user runs it: a mergekit YAML, models on the command line, the store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from enigma.testing import make_tiny_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("merge-cli")
    return make_tiny_llama(root / "a", seed=1), make_tiny_llama(root / "b", seed=2)


def test_yaml_config_into_a_folder_then_run_it(enigma, pair, tmp_path):
    a, b = pair
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": str(a), "dtype": "float32",
                                      "models": [{"model": str(a)}, {"model": str(b)}],
                                      "parameters": {"t": [0, 1]}}))
    done = enigma("merge", "-c", str(config), "--out", str(tmp_path / "ab"))
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'ab'}" in done.stdout
    merged = load_file(tmp_path / "ab" / "model.safetensors")
    # t = 0 at the first layer: the base's tensors; t = 1 at the last: the other model's
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"],
                       load_file(a / "model.safetensors")["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(merged["model.layers.1.mlp.up_proj.weight"],
                               load_file(b / "model.safetensors")["model.layers.1.mlp.up_proj.weight"])
    answer = enigma("run", str(tmp_path / "ab"), "Hello", "--max-tokens", "3", "--temperature", "0", "--local")
    assert answer.returncode == 0, answer.stderr


def test_models_on_the_command_line_into_the_store(enigma, pair):
    a, b = pair
    done = enigma("merge", str(a), str(b), "--method", "task_arithmetic", "--base", str(a), "--weights", "1,0.5",
                  "--set", "lambda=0.8", "--name", "blend:ta")
    assert done.returncode == 0, done.stderr
    assert "blend:ta" in enigma("list").stdout
    shown = enigma("show", "blend:ta")
    assert shown.returncode == 0 and "merge:task_arithmetic" in shown.stdout


def test_usage_and_input_errors(enigma, pair, tmp_path):
    a, b = pair
    assert "dare_ties" in enigma("merge", "--list").stdout
    assert "give either -c CONFIG or the MODELS" in enigma("merge", "--out", "x").stderr
    assert "exactly one of --out" in enigma("merge", str(a), str(b)).stderr
    assert "'abc' is not a size" in enigma("merge", str(a), "--out", "x", "--max-shard-size", "abc").stderr
    missing = enigma("merge", "-c", str(tmp_path / "nope.yml"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 1 and "nope.yml does not exist" in missing.stderr
    no_model = enigma("merge", str(a), str(tmp_path / "gone"), "--weights", "1,1", "--out", str(tmp_path / "o"))
    assert no_model.returncode == 1 and "gone' not found" in no_model.stderr
    no_t = enigma("merge", str(a), str(b), "--method", "slerp", "--set", "t=oops", "--out", str(tmp_path / "o"))
    assert no_t.returncode == 1 and "'oops' is not a float" in no_t.stderr
    assert not (tmp_path / "o").exists()
