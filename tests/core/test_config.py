"""Configuration: precedence, formats, errors that name key, value and source."""

from __future__ import annotations

import json
import os

import pytest

from enigma import ConfigError
from enigma.config import load_config, set_value
from enigma.paths import get_paths


@pytest.fixture
def config_dir(enigma_home):
    path = enigma_home / "config"
    path.mkdir()
    return path


def test_defaults_when_nothing_is_set(enigma_home):
    loaded = load_config()
    assert loaded.get("server.port") == 11500
    assert loaded.get("engine.backend") == "auto"
    assert str(loaded.sources["server.port"]) == "the default"


def test_precedence_default_file_env(config_dir, monkeypatch):
    (config_dir / "config.toml").write_text('[server]\nport = 8000\nhost = "0.0.0.0"\n')
    loaded = load_config()
    assert loaded.get("server.port") == 8000
    assert loaded.sources["server.port"].kind == "file"
    assert loaded.get("engine.dtype") == "auto"

    monkeypatch.setenv("ENIGMA_SERVER__PORT", "9000")
    loaded = load_config()
    assert loaded.get("server.port") == 9000
    assert str(loaded.sources["server.port"]) == "environment variable ENIGMA_SERVER__PORT"
    assert loaded.get("server.host") == "0.0.0.0"


@pytest.mark.parametrize("name,text", [
    ("config.toml", '[engine]\ndtype = "bfloat16"\n[server]\nport = 8001\n'),
    ("config.json", json.dumps({"engine": {"dtype": "bfloat16"}, "server": {"port": 8001}})),
    ("config.yaml", "engine:\n  dtype: bfloat16\nserver:\n  port: 8001\n"),
    ("config.yml", "engine:\n  dtype: bfloat16\nserver:\n  port: 8001\n"),
])
def test_every_file_format_is_read(config_dir, name, text):
    (config_dir / name).write_text(text)
    loaded = load_config()
    assert loaded.file == config_dir / name
    assert (loaded.get("engine.dtype"), loaded.get("server.port")) == ("bfloat16", 8001)


@pytest.mark.parametrize("name,text,line", [
    ("config.toml", '[server]\nhost = "h"\n\nport = "eighty"\n', 4),
    ("config.json", '{\n  "server": {\n    "host": "h",\n    "port": "eighty"\n  }\n}\n', 4),
    ("config.yaml", "server:\n  host: h\n  port: eighty\n", 3),
])
def test_bad_file_value_names_key_value_file_line_and_allowed(config_dir, name, text, line):
    (config_dir / name).write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(info.value) == (
        f"server.port = 'eighty' (from config file {config_dir / name}, line {line}) is invalid: "
        "expected an integer from 1 to 65535"
    )


def test_out_of_range_and_wrong_type_values(config_dir):
    (config_dir / "config.toml").write_text("[server]\nport = 70000\n")
    with pytest.raises(ConfigError, match=r"server.port = 70000 .* expected an integer from 1 to 65535"):
        load_config()
    (config_dir / "config.toml").write_text("[server]\nport = true\n")
    with pytest.raises(ConfigError, match="server.port = True"):
        load_config()
    (config_dir / "config.toml").write_text('[engine]\ndtype = ["float16"]\n')
    with pytest.raises(ConfigError, match=r"engine.dtype = \['float16'\] .* one of auto, float32"):
        load_config()


def test_bad_env_value_names_the_variable(enigma_home, monkeypatch):
    monkeypatch.setenv("ENIGMA_ENGINE__DTYPE", "float8")
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(info.value) == (
        "engine.dtype = 'float8' (from environment variable ENIGMA_ENGINE__DTYPE) is invalid: "
        "expected one of auto, float32, float16, bfloat16"
    )


def test_env_variable_naming_no_key_is_an_error(enigma_home, monkeypatch):
    monkeypatch.setenv("ENIGMA_SERVER__PROT", "80")
    with pytest.raises(ConfigError, match="ENIGMA_SERVER__PROT names no config key .*server.port"):
        load_config()


def test_unknown_section_and_key_in_file(config_dir):
    (config_dir / "config.toml").write_text("[serve]\nport = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config section 'serve' in config file .*line 1.*server"):
        load_config()
    (config_dir / "config.toml").write_text("[server]\nhost = 'h'\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'server.prot' in config file .*line 3"):
        load_config()


def test_unparseable_file_names_the_file(config_dir):
    (config_dir / "config.toml").write_text("[server\nport = 1\n")
    with pytest.raises(ConfigError, match=r"config file .*config.toml is not valid TOML: .*line 1"):
        load_config()
    (config_dir / "config.toml").write_text("server = 1\n")
    with pytest.raises(ConfigError, match="config section 'server' in config file .* must be a table"):
        load_config()


def test_enigma_home_holds_every_path(enigma_home):
    paths = get_paths()
    for path in (paths.config_dir, paths.data_dir, paths.cache_dir, paths.models_dir):
        assert enigma_home in path.parents
    assert paths.config_file == enigma_home / "config" / "config.toml"


def test_enigma_config_points_at_a_file(enigma_home, monkeypatch, tmp_path):
    custom = tmp_path / "mine.yaml"
    custom.write_text("models:\n  default: qwen2:0.5b\n")
    monkeypatch.setenv("ENIGMA_CONFIG", str(custom))
    assert load_config().get("models.default") == "qwen2:0.5b"
    monkeypatch.setenv("ENIGMA_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="missing.toml .from ENIGMA_CONFIG. does not exist"):
        load_config()


def test_set_value_writes_atomically_and_keeps_other_settings(config_dir):
    (config_dir / "config.toml").write_text('[server]\nhost = "0.0.0.0"\n')
    written = set_value("server.port", "8080")
    assert written == config_dir / "config.toml"
    assert load_config().get("server.port") == 8080
    assert load_config().get("server.host") == "0.0.0.0"
    assert sorted(os.listdir(config_dir)) == ["config.toml"]


@pytest.mark.parametrize("name", ["config.json", "config.yaml"])
def test_set_value_keeps_the_file_format(config_dir, name):
    (config_dir / name).write_text("{}" if name.endswith("json") else "")
    set_value("engine.dtype", "float16")
    assert load_config().get("engine.dtype") == "float16"
    if name.endswith("json"):
        assert json.loads((config_dir / name).read_text()) == {"engine": {"dtype": "float16"}}


def test_set_bad_value_leaves_the_file_untouched(config_dir):
    original = '[server]\nport = 8000\n'
    (config_dir / "config.toml").write_text(original)
    with pytest.raises(ConfigError, match=r"server.port = 'abc' \(from the command line\)"):
        set_value("server.port", "abc")
    with pytest.raises(ConfigError, match="unknown config key 'server.nope'; the keys are: engine.backend"):
        set_value("server.nope", "1")
    assert (config_dir / "config.toml").read_text() == original
    assert sorted(os.listdir(config_dir)) == ["config.toml"]


def test_set_creates_the_file_when_missing(enigma_home):
    set_value("models.default", "smollm:135m")
    assert (enigma_home / "config" / "config.toml").read_text() == '[models]\ndefault = "smollm:135m"\n'
