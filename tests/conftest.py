"""Shared fixtures: the fixture plugins, really pip-installed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_PLUGINS = ("enigma-plugin-exact", "enigma-plugin-broken", "enigma-plugin-int8", "enigma-plugin-grounding",
                   "enigma-plugin-fifo", "enigma-plugin-memo", "enigma-plugin-freeze", "enigma-plugin-npz")
FIXTURE_MODULES = ("enigma_exact", "enigma_broken", "enigma_int8", "enigma_grounding", "enigma_memo", "enigma_fifo",
                   "enigma_freeze", "enigma_npz")

pytest_plugins = ["pytester"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--enigma-backend", metavar="NAME", default=None,
                     help="make 'auto' choose this backend wherever a test leaves the backend and device to it "
                          "(cuda-paged: the engine, parity and sampling tests against it; on a CPU only under "
                          "TRITON_INTERPRET=1)")


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("--enigma-backend")
    if name:
        from enigma.registry import Registry

        select = Registry.select

        def select_named(self, kind, implementation="auto", *, device=None):
            if (kind == "backend" and implementation == "auto" and device is None
                    and any(impl.name == name for impl in self.implementations(kind))):  # not a bare test host
                implementation = name
            return select(self, kind, implementation, device=device)

        Registry.select = select_named


@pytest.fixture(scope="session", autouse=True)
def native_kernels_built_apart(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Compile enigma's native CPU kernels once for the session, outside the user's cache."""
    from enigma import native

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENIGMA_HOME", str(tmp_path_factory.mktemp("native-kernels-home")))
        native.kernels()


@pytest.fixture(scope="session")
def fixture_plugins_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture plugins installed by pip into a folder of their own.

    A real install (dist-info with entry points, found by importlib.metadata),
    kept out of the test environment's site-packages so it cannot leak into
    other runs; tests put the folder on sys.path / PYTHONPATH.
    """
    target = tmp_path_factory.mktemp("installed-plugins")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), *(str(FIXTURES / name) for name in FIXTURE_PLUGINS)],
        check=True,
    )
    return target


@pytest.fixture
def installed_plugins(fixture_plugins_dir: Path, enigma_home: Path,
                      monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The fixture plugins visible to this process and its subprocesses."""
    monkeypatch.syspath_prepend(str(fixture_plugins_dir))
    paths = [str(fixture_plugins_dir), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    yield fixture_plugins_dir
    for name in [m for m in sys.modules if m.split(".")[0] in FIXTURE_MODULES]:
        del sys.modules[name]


ENIGMA = Path(sys.executable).parent / "enigma"


@pytest.fixture
def enigma(enigma_home):
    """``enigma(*args, env=..., input=...)`` -> CompletedProcess (text)."""
    if not ENIGMA.exists():
        pytest.fail(f"the enigma command is not installed at {ENIGMA}; pip install -e ./enigma-cli")

    def run(*args: str, env: dict[str, str] | None = None, input: str | None = None):
        return subprocess.run([str(ENIGMA), *args], capture_output=True, text=True, input=input,
                              env={**os.environ, **(env or {})}, timeout=120)

    return run
