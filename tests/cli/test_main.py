"""The ``enigma`` command: version, plugins, config, errors, plugin subcommands."""

from __future__ import annotations

import json
import time

import enigma_cli
from enigma import __version__ as core_version


def test_version(enigma):
    result = enigma("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == (
        f"enigma {core_version} (enigma-core {core_version}, enigma-cli {enigma_cli.__version__})")


def test_plugins_lists_builtins(enigma):
    result = enigma("plugins", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    torch_plugin = next(p for p in data["plugins"] if p["name"] == "torch")
    assert torch_plugin["builtin"] and torch_plugin["distribution"] == "enigma-core"
    assert torch_plugin["provides"] == ["backend:torch"]
    backend = next(i for i in data["implementations"] if i["name"] == "torch")
    assert backend["available"] and backend["kind"] == "backend"


def test_plugins_table_shows_installed_and_broken(enigma, installed_plugins):
    result = enigma("plugins")
    assert result.returncode == 0, result.stderr
    assert "enigma-plugin-exact" in result.stdout and "backend:exact" in result.stdout
    assert "failed" in result.stdout and "libbroken.so" in result.stdout
    assert "Warning: plugin 'broken' (enigma-plugin-broken) failed to load" in result.stderr
    data = json.loads(enigma("plugins", "--json").stdout)
    broken = next(p for p in data["plugins"] if p["name"] == "broken")
    assert (broken["status"], broken["version"]) == ("failed", "0.0.1")
    assert "ImportError" in broken["errors"][0]


def test_hook_enigma_commands(enigma, installed_plugins):
    help_text = enigma("--help").stdout
    assert "exact-check" in help_text and "Compare a backend's attention" in help_text
    result = enigma("exact-check", "--backend", "torch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("max |torch - exact| = ")
    assert float(result.stdout.rsplit("=", 1)[1]) < 1e-5


def test_plugin_subcommand_gone_when_plugin_disabled(enigma, installed_plugins):
    result = enigma("--help", env={"ENIGMA_DISABLE_PLUGINS": "exact,broken"})
    assert "exact-check" not in result.stdout
    assert result.stderr == ""


def test_a_raising_commands_hook_spares_the_rest(enigma, tmp_path):
    plugin = tmp_path / "site"
    (plugin / "raiser-1.0.dist-info").mkdir(parents=True)
    dist_info = plugin / "raiser-1.0.dist-info"
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: raiser\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[enigma]\nraiser = raiser_plugin\n")
    (plugin / "raiser_plugin.py").write_text(
        "from enigma import hookimpl\n\n@hookimpl\n"
        "def enigma_commands(cli):\n    raise RuntimeError('no click here')\n")
    env = {"PYTHONPATH": str(plugin)}
    result = enigma("config", "get", "server.port", env=env)
    assert result.returncode == 0 and result.stdout.strip() == "11500"
    assert "enigma_commands raised RuntimeError: no click here" in result.stderr
    data = json.loads(enigma("plugins", "--json", env=env).stdout)
    raiser = next(p for p in data["plugins"] if p["name"] == "raiser")
    assert raiser["errors"] == ["enigma_commands raised RuntimeError: no click here"]


def test_config_set_get_show_path(enigma, enigma_home):
    path = enigma("config", "path")
    assert path.stdout.strip() == str(enigma_home / "config" / "config.toml")
    result = enigma("config", "set", "server.port", "8088")
    assert result.returncode == 0, result.stderr
    assert enigma("config", "get", "server.port").stdout.strip() == "8088"
    shown = json.loads(enigma("config", "show", "--json").stdout)
    assert shown["server.port"]["value"] == 8088
    assert shown["server.port"]["source"].startswith(f"config file {enigma_home}")
    assert shown["engine.dtype"] == {"value": "auto", "source": "the default"}
    overridden = enigma("config", "get", "server.port", env={"ENIGMA_SERVER__PORT": "9999"})
    assert overridden.stdout.strip() == "9999"
    table = enigma("config", "show")
    assert "server.port" in table.stdout and "8088" in table.stdout


def test_user_errors_are_one_line_and_exit_1(enigma):
    result = enigma("config", "set", "server.port", "http")
    assert result.returncode == 1
    assert result.stderr == ("Error: server.port = 'http' (from the command line) is invalid: "
                             "expected an integer from 1 to 65535\n")
    result = enigma("config", "get", "engine.colour")
    assert result.returncode == 1 and result.stderr.startswith("Error: unknown config key 'engine.colour'")
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(enigma):
    result = enigma("--debug", "config", "get", "engine.colour")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_usage_errors_exit_2(enigma):
    assert enigma("no-such-command").returncode == 2
    assert enigma("config", "set", "server.port").returncode == 2


def test_loading_every_installed_plugin_imports_no_torch():
    """What keeps --help fast: plugin modules import only enigma (torch costs ~1.5 s here)."""
    import subprocess
    import sys

    code = ("import sys; from enigma.plugins import get_host; host = get_host(); "
            "failed = [r.name for r in host.records.values() if r.status == 'failed']; "
            "assert not failed, failed; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch" not in result.stdout, "a plugin imports torch while plugins load"


def test_help_is_fast_and_shows_examples(enigma):
    enigma("--help")  # warm the OS file cache
    start = time.perf_counter()
    result = enigma("--help")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0 and "Examples:" in result.stdout
    assert elapsed < 2.0, f"enigma --help took {elapsed:.2f}s"
    for sub in (("plugins",), ("config",), ("config", "set")):
        assert enigma(*sub, "--help").returncode == 0


def test_every_command_shows_examples_in_help(enigma):
    from enigma_cli.main import cli

    for name, command in cli.commands.items():
        result = enigma(name, "--help")
        assert result.returncode == 0, name
        assert "Examples:" in result.stdout, f"`enigma {name} --help` shows no examples"
        subcommands = getattr(command, "commands", {})
        for sub in subcommands:
            assert "Examples:" in enigma(name, sub, "--help").stdout, f"`enigma {name} {sub} --help`"
