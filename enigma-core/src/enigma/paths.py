"""Where enigma keeps its files: platformdirs, or everything under ENIGMA_HOME."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import attrs
import platformdirs

APP_NAME = "enigma"
CONFIG_NAMES = ("config.toml", "config.json", "config.yaml", "config.yml")


@attrs.frozen
class Paths:
    """The directories enigma reads and writes."""

    config_dir: Path
    data_dir: Path
    cache_dir: Path
    config_file_override: Path | None = None

    @property
    def models_dir(self) -> Path:
        """The model store."""
        return self.data_dir / "models"

    @property
    def config_file(self) -> Path:
        """The configuration file: ``ENIGMA_CONFIG``, else the first existing
        ``config.{toml,json,yaml,yml}`` in the config dir, else ``config.toml``
        there (created by ``enigma config set``)."""
        if self.config_file_override is not None:
            return self.config_file_override
        for name in CONFIG_NAMES:
            candidate = self.config_dir / name
            if candidate.exists():
                return candidate
        return self.config_dir / CONFIG_NAMES[0]


def get_paths(environ: Mapping[str, str] | None = None) -> Paths:
    """Paths for this process: ``ENIGMA_HOME`` puts all of them under one folder."""
    env = os.environ if environ is None else environ
    override = Path(env["ENIGMA_CONFIG"]).expanduser() if env.get("ENIGMA_CONFIG") else None
    home = env.get("ENIGMA_HOME")
    if home:
        root = Path(home).expanduser()
        return Paths(root / "config", root / "data", root / "cache", override)
    return Paths(
        Path(platformdirs.user_config_dir(APP_NAME)),
        Path(platformdirs.user_data_dir(APP_NAME)),
        Path(platformdirs.user_cache_dir(APP_NAME)),
        override,
    )
