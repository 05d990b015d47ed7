"""``enigma train`` and ``enigma train-tokenizer`` driven as a user would, kill -9 included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import CORPUS, llama_config, write_tokenizer

ENIGMA = Path(sys.executable).parent / "enigma"
CONFIG = llama_config(hidden_size=128, intermediate_size=256, num_hidden_layers=4)


@pytest.fixture
def project(tmp_path):
    write_tokenizer(tmp_path / "tok", template="chatml")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "corpus.txt").write_text(CORPUS * 6)
    return tmp_path


def train_args(root: Path, out: str, *extra: str) -> list[str]:
    return ["train", "--data", str(root / "corpus.txt"), "--model", str(root / "config.json"),
            "--tokenizer", str(root / "tok"), "--out", str(root / out), "--seq-len", "64", "--batch-size", "4",
            "--max-steps", "60", "--save-interval", "5", "--eval-interval", "20", "--threads", "1",
            "--val-fraction", "0.1", *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_train_help_shows_examples(enigma):
    result = enigma("train", "--help")
    assert result.returncode == 0
    assert "Examples:" in result.stdout and "--gradient-checkpointing" in result.stdout
    assert "enigma train" in enigma("--help").stdout


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_weights_of_an_uninterrupted_run(enigma, project):
    full = enigma(*train_args(project, "full"))
    assert full.returncode == 0, full.stderr
    assert "validation loss" in full.stderr and "Model saved to" in full.stdout

    process = subprocess.Popen([str(ENIGMA), *train_args(project, "killed")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=os.environ.copy())
    latest = project / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 60
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (project / "killed" / "model.safetensors").exists()

    resumed = enigma(*train_args(project, "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    expected, actual = weights(project / "full"), weights(project / "killed")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_train_errors_exit_1_with_one_line(enigma, project):
    result = enigma("train", "--model", str(project / "config.json"), "--out", str(project / "o"))
    assert result.returncode == 1 and result.stderr.startswith("Error: training needs data")
    result = enigma(*train_args(project, "o2", "--resume"))
    assert result.returncode == 1 and "nothing to resume" in result.stderr
    bad = project / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"instruction": "x"}\n')
    result = enigma(*train_args(project, "o3")[:2], str(bad), *train_args(project, "o3")[3:])
    assert result.returncode == 1 and f"Error: {bad}:2: missing field 'output'" in result.stderr
    result = enigma(*train_args(project, "o4", "--gradient-checkpointing", "9"))
    assert result.returncode == 1 and "names layers [9], but the model has layers 0-3" in result.stderr


def test_train_from_a_config_file(enigma, project):
    (project / "train.toml").write_text(
        f'[train]\ndata = ["{project / "corpus.txt"}"]\nmodel = "{project / "config.json"}"\n'
        f'tokenizer = "{project / "tok"}"\nout = "{project / "run"}"\nseq_len = 32\nbatch_size = 2\n'
        'max_steps = 3\ngradient_checkpointing = "all"\ndtype = "bf16"\n')
    result = enigma("train", "--config", str(project / "train.toml"), "--max-steps", "4")
    assert result.returncode == 0, result.stderr
    assert json.loads((project / "run" / "enigma_training.json").read_text())["steps"] == 4


def test_train_tokenizer_command(enigma, tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    result = enigma("train-tokenizer", "--data", str(tmp_path / "corpus.txt"), "--vocab-size", "300",
                    "--out", str(tmp_path / "tok"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and "<|im_start|>" in config["chat_template"]
