"""Selecting implementations: named, auto, unavailable, unknown."""

from __future__ import annotations

import pytest

from enigma import Availability, NotAvailableError, NotFoundError, PluginError
from enigma.registry import Implementation, Registry


def add(registry: Registry, name: str, *, priority: int = 0, available=None, kind: str = "backend",
        factory=dict, plugin: str | None = None, devices=()) -> None:
    registry.add(Implementation(kind=kind, name=name, factory=factory, plugin=plugin or f"p-{name}",
                                distribution=f"dist-{name}", priority=priority, available_check=available,
                                devices=devices))


@pytest.fixture
def registry() -> Registry:
    registry = Registry()
    add(registry, "slow", priority=0)
    add(registry, "fast", priority=10, available=lambda: Availability.no("no CUDA device found"))
    add(registry, "medium", priority=5)
    return registry


def test_select_by_name_returns_that_one(registry):
    assert registry.select("backend", "slow").name == "slow"


def test_auto_takes_highest_priority_available(registry):
    assert registry.select("backend", "auto").name == "medium"
    assert registry.select("backend").name == "medium"


def test_a_named_device_narrows_auto_to_the_backends_for_it():
    # a GPU machine: the GPU backend is auto's choice, the CPU one only by name or by device
    registry = Registry()

    def made(name):
        return lambda **kwargs: (name, kwargs)

    add(registry, "reference", priority=0, factory=made("reference"))
    add(registry, "cpu-fast", priority=10, devices=("cpu",), factory=made("cpu-fast"),
        available=lambda: Availability.yes(auto=False, reason="a GPU is here"))
    add(registry, "gpu-fast", priority=100, devices=("cuda",), factory=made("gpu-fast"))
    assert registry.select("backend").name == "gpu-fast"
    assert registry.select("backend", device="cuda:1").name == "gpu-fast"
    assert registry.select("backend", device="cpu").name == "cpu-fast"
    assert registry.select("backend", device="mps").name == "reference"
    assert registry.select("backend", "gpu-fast", device="cpu").name == "gpu-fast"   # a name is a name
    assert registry.create("backend", device="cpu") == ("cpu-fast", {"device": "cpu"})
    assert registry.create("backend", device=None) == ("gpu-fast", {"device": None})


def test_unavailable_name_says_why_and_lists_others(registry):
    with pytest.raises(NotAvailableError) as info:
        registry.select("backend", "fast")
    message = str(info.value)
    assert "backend 'fast' (from dist-fast) is not available here: no CUDA device found" in message
    assert "slow (from dist-slow; available)" in message
    assert "medium (from dist-medium; available)" in message


def test_unknown_name_lists_what_exists(registry):
    with pytest.raises(NotFoundError) as info:
        registry.select("backend", "tpu")
    message = str(info.value)
    assert "no backend named 'tpu' is installed" in message
    assert "fast (from dist-fast; unavailable: no CUDA device found)" in message
    assert "enigma plugins" in message


def test_auto_with_nothing_available_explains_each():
    registry = Registry()
    add(registry, "cuda-paged", available=lambda: Availability.no("no CUDA device"))
    add(registry, "metal", available=lambda: False)
    with pytest.raises(NotAvailableError) as info:
        registry.select("backend")
    message = str(info.value)
    assert "no backend is available here" in message
    assert "cuda-paged (from dist-cuda-paged; unavailable: no CUDA device)" in message
    assert "metal (from dist-metal; unavailable: its availability check said no)" in message


def test_auto_with_nothing_installed():
    with pytest.raises(NotAvailableError, match="no retriever is installed at all"):
        Registry().select("retriever")


def test_unknown_kind_lists_kinds(registry):
    with pytest.raises(NotFoundError, match="unknown kind 'backends'; the kinds are: backend, scheduler"):
        registry.select("backends")
    with pytest.raises(NotFoundError):
        add(registry, "x", kind="gpu")


def test_a_raising_availability_check_means_unavailable(registry):
    def explode():
        raise OSError("driver crashed")

    add(registry, "flaky", priority=100, available=explode)
    assert registry.select("backend").name == "medium"
    with pytest.raises(NotAvailableError, match="availability check failed: OSError: driver crashed"):
        registry.select("backend", "flaky")


def test_string_factories_import_lazily():
    registry = Registry()
    add(registry, "od", factory="collections:OrderedDict")
    assert type(registry.create("backend", "od", a=1)).__name__ == "OrderedDict"
    add(registry, "missing", factory="enigma_no_such_module:Thing")
    with pytest.raises(PluginError, match="could not be imported from 'enigma_no_such_module:Thing'"):
        registry.create("backend", "missing")


@pytest.mark.parametrize("name", ["", "auto", "a,b"])
def test_invalid_names_are_refused(name):
    with pytest.raises(PluginError, match="invalid name"):
        add(Registry(), name)


def test_implementations_are_sorted_by_kind_then_priority(registry):
    add(registry, "sft", kind="trainer")
    assert [(impl.kind, impl.name) for impl in registry.implementations()] == [
        ("backend", "fast"), ("backend", "medium"), ("backend", "slow"), ("trainer", "sft")]


def test_remove_plugin_forgets_its_implementations(registry):
    registry.remove_plugin("p-slow")
    assert [impl.name for impl in registry.implementations("backend")] == ["fast", "medium"]
