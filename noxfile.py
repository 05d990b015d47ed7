"""Development sessions. `nox -l` lists them; each installs what it needs.

- tests: the whole suite (what README's test command and .ci/run run)
- lint:  ruff over the workspace
- core:  tests/core against enigma-core alone
- cli:   tests/cli against enigma-core + enigma-cli
- cuda_paged_engine: the engine, parity, sampling and speculative tests against the cuda-paged backend
  (a GPU's, or on a CPU Triton's interpreter: about 40 minutes)
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run every test."""
    session.install("-r", "requirements-dev.txt")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check over every package and the tests."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session(python=PYTHON)
def core(session: nox.Session) -> None:
    """The kernel's tests, with only enigma-core installed."""
    session.install("torch==2.13.0", "pytest>=8", "hypothesis>=6.100", "setuptools>=77")
    session.install("-e", "./enigma-core")
    session.run("pytest", "tests/core", *session.posargs)


@nox.session(python=PYTHON)
def cli(session: nox.Session) -> None:
    """The command's tests."""
    session.install("torch==2.13.0", "pytest>=8", "hypothesis>=6.100", "setuptools>=77")
    session.install("-e", "./enigma-core", "-e", "./enigma-cli")
    session.run("pytest", "tests/cli", *session.posargs)


@nox.session(python=PYTHON)
def cuda_paged_engine(session: nox.Session) -> None:
    """The engine, parity, sampling and speculative tests with 'auto' choosing cuda-paged."""
    session.install("-r", "requirements-dev.txt")
    env = {} if session.posargs and "--gpu" in session.posargs else {"TRITON_INTERPRET": "1"}
    session.run("pytest", "--enigma-backend", "cuda-paged", "-k", "not minilm", "tests/core/test_engine.py",
                "tests/core/test_model_parity.py", "tests/core/test_sampling.py", "tests/core/test_speculative.py",
                *[arg for arg in session.posargs if arg != "--gpu"], env=env)
