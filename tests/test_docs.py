"""The docs stay true: every hook documented and tested; the example is the fixture."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from enigma import hookspecs

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DOC = ROOT / "docs" / "plugins.md"

HOOKS = sorted(name for name in vars(hookspecs) if name.startswith("enigma_")
               and callable(getattr(hookspecs, name)))


def test_hookspecs_are_found():
    assert "enigma_register_backends" in HOOKS and "enigma_commands" in HOOKS
    assert len(HOOKS) == 24


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_docs_section(hook):
    headings = re.findall(r"^### (\w+)$", PLUGINS_DOC.read_text(), flags=re.MULTILINE)
    assert hook in headings, f"docs/plugins.md has no '### {hook}' section"


def _test_function_names() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                names.add(node.name)
    return names


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test_of_its_own(hook):
    assert f"test_hook_{hook}" in _test_function_names(), f"no test named test_hook_{hook}"


def test_every_hook_spec_has_a_docstring():
    for hook in HOOKS:
        assert (getattr(hookspecs, hook).__doc__ or "").strip(), hook


def test_docs_example_is_the_tested_fixture():
    text = PLUGINS_DOC.read_text()
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```\n", text, flags=re.DOTALL)
    assert len(blocks) == 4
    for path, content in blocks:
        assert (ROOT / path).read_text() == content, f"docs/plugins.md's copy of {path} is stale"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_documented_signature_is_the_spec(hook):
    import inspect

    text = PLUGINS_DOC.read_text()
    section = text.split(f"### {hook}\n", 1)[1]
    documented = re.match(rf"\s*`{hook}\(([^)]*)\)`", section)
    assert documented, f"docs/plugins.md's {hook} section does not open with `{hook}(...)`"
    arguments = [a.strip() for a in documented.group(1).split(",") if a.strip()]
    assert arguments == list(inspect.signature(getattr(hookspecs, hook)).parameters), hook
