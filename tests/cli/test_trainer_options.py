"""A trainer's own options: registered with it, passed by `enigma train --method NAME --<option> VALUE`."""

from __future__ import annotations

import json
import types
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

from enigma import hookimpl
from enigma.config import setting
from enigma.errors import ConfigError
from enigma_cli.commands.train import method_flags, train


@attrs.define
class EchoOptions:
    rank: int = setting(8, allowed="an integer of at least 1", check=lambda v: v >= 1, doc="a rank")
    dora: bool = False
    target: str = "q_proj,v_proj"


class EchoTrainer:
    """Writes the options it was given; enough to see them arrive typed."""

    def train(self, config, *, progress=None):
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "options.json").write_text(json.dumps(attrs.asdict(config.options)))
        return out


@pytest.fixture
def echo_host(make_plugin_host):
    @hookimpl
    def enigma_register_trainers(register):
        register("echo", EchoTrainer, options=EchoOptions, summary="writes its options")

    plugin = types.ModuleType("echo_plugin")
    plugin.enigma_register_trainers = enigma_register_trainers
    return make_plugin_host(plugin, install=True)


def run_train(tmp_path, *args):
    base = ["--data", str(tmp_path), "--model", str(tmp_path), "--out", str(tmp_path / "out")]
    return CliRunner().invoke(train, [*base, *args], catch_exceptions=False)


def test_method_options_arrive_typed(echo_host, tmp_path):
    result = run_train(tmp_path, "--method", "echo", "--echo-rank", "16", "--dora", "--target=all-linear")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "options.json").read_text()) == {
        "rank": 16, "dora": True, "target": "all-linear"}
    run_train(tmp_path, "--method", "echo")
    assert json.loads((tmp_path / "out" / "options.json").read_text())["rank"] == 8  # the defaults


def test_options_from_the_toml_file(echo_host, tmp_path):
    (tmp_path / "train.toml").write_text(f'[train]\ntrainer = "echo"\ndata = ["{tmp_path}"]\n'
                                         f'model = "{tmp_path}"\nout = "{tmp_path / "out"}"\n'
                                         '[train.options]\nrank = 4\n')
    result = CliRunner().invoke(train, ["--config", str(tmp_path / "train.toml"), "--rank", "5"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "options.json").read_text())["rank"] == 5  # flags win


def test_bad_options_name_the_trainer_and_its_options(echo_host, tmp_path):
    with pytest.raises(ConfigError, match="trainer 'echo' has no option alpha; its options are: rank, dora, target"):
        run_train(tmp_path, "--method", "echo", "--alpha", "3")
    with pytest.raises(ConfigError, match=r"echo.rank = '0' .* expected an integer of at least 1"):
        run_train(tmp_path, "--method", "echo", "--rank", "0")
    with pytest.raises(ConfigError, match="trainer 'sft' takes no options; got rank"):
        run_train(tmp_path, "--rank", "3")


def test_method_flags_parse():
    assert method_flags(["--lora-rank", "8", "--use-dora", "--alpha=16"]) == {
        "lora_rank": "8", "use_dora": True, "alpha": "16"}
    from click import UsageError

    with pytest.raises(UsageError, match="unexpected argument 'stray'"):
        method_flags(["stray"])


def test_hook_enigma_register_trainers(enigma, installed_plugins, tmp_path):
    """enigma-plugin-freeze (pip-installed): its own option reaches it from the command line."""
    import sys

    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_models import CORPUS, make_model

    base = make_model(tmp_path / "base", "llama-gqa", layers=3)
    (tmp_path / "notes.txt").write_text(CORPUS * 4)
    result = enigma("train", "--method", "freeze", "--train-last", "1", "--data", str(tmp_path / "notes.txt"),
                    "--model", str(base), "--out", str(tmp_path / "out"), "--seq-len", "32", "--batch-size", "2",
                    "--max-steps", "3", "--lr", "1e-2", "--threads", "1", "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    first = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(before[first], after[first])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(before["model.layers.2.mlp.up_proj.weight"], after["model.layers.2.mlp.up_proj.weight"])

    wrong = enigma("train", "--method", "freeze", "--train-last", "9", "--data", str(tmp_path / "notes.txt"),
                   "--model", str(base), "--out", str(tmp_path / "out2"), "--max-steps", "1")
    assert wrong.returncode == 1 and "--train-last 9: the model has only 3 layers" in wrong.stderr
