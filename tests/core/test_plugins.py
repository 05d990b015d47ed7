"""Discovery, failure isolation, disabling and hook calling."""

from __future__ import annotations

import types

import pytest

import enigma
from enigma import Availability, PluginError, hookimpl
from enigma.plugins import PluginHost, load_plugins


def make_module(name: str, **functions) -> types.ModuleType:
    module = types.ModuleType(name)
    for attr, function in functions.items():
        setattr(module, attr, function)
    return module


def test_builtins_are_discovered_through_entry_points(plugin_host):
    record = plugin_host.records["torch"]
    assert record.status == "loaded"
    assert record.distribution == "enigma-core"
    assert record.builtin
    assert record.version == enigma.__version__
    impl = plugin_host.registry.get("backend", "torch")
    assert impl.plugin == "torch" and impl.distribution == "enigma-core"
    builtins = {(impl.kind, impl.name): impl.plugin for impl in plugin_host.registry.implementations()
                if impl.distribution == "enigma-core"}
    assert builtins == {("backend", "torch"): "torch", ("backend", "torch-cpu"): "torch-cpu",
                        ("cache", "paged"): "paged",
                        ("cache", "contiguous"): "paged", ("scheduler", "continuous"): "continuous",
                        ("trainer", "sft"): "sft", ("architecture", "LlamaForCausalLM"): "llama",
                        ("architecture", "MistralForCausalLM"): "llama", ("architecture", "Qwen2ForCausalLM"): "llama",
                        ("architecture", "BertModel"): "bert", ("weight_source", "safetensors"): "safetensors",
                        ("executor", "local"): "local"}


def test_installed_plugin_is_found_with_its_distribution(installed_plugins):
    host = load_plugins()
    record = host.records["exact"]
    assert (record.status, record.distribution, record.version) == ("loaded", "enigma-plugin-exact", "1.0.0")
    assert not record.builtin
    assert host.select("backend", "exact").distribution == "enigma-plugin-exact"


def test_plugin_failing_at_import_is_recorded_and_the_rest_load(installed_plugins, caplog):
    host = load_plugins()
    broken = host.records["broken"]
    assert broken.status == "failed"
    assert broken.distribution == "enigma-plugin-broken" and broken.version == "0.0.1"
    assert "ImportError: enigma_broken needs libbroken.so" in broken.errors[0]
    assert host.records["exact"].status == "loaded"
    assert host.records["torch"].status == "loaded"
    assert any("'broken'" in message and "failed to load" in message for message in caplog.messages)


def test_strict_mode_reraises_plugin_failures(installed_plugins, monkeypatch):
    monkeypatch.setenv("ENIGMA_STRICT_PLUGINS", "1")
    with pytest.raises(ImportError, match="libbroken"):
        load_plugins()


def test_disable_plugins_skips_them_without_importing(installed_plugins, monkeypatch):
    monkeypatch.setenv("ENIGMA_DISABLE_PLUGINS", "broken, exact")
    host = load_plugins()
    assert host.records["broken"].status == "disabled"
    assert host.records["exact"].status == "disabled"
    assert host.records["broken"].errors == []
    names = [impl.name for impl in host.registry.implementations("backend")]
    assert "exact" not in names and names[-2:] == ["torch-cpu", "torch"]   # GPU backends' plugins rank above


def test_load_plugins_allow_list(installed_plugins, monkeypatch):
    monkeypatch.setenv("ENIGMA_LOAD_PLUGINS", "exact")
    host = load_plugins()
    assert host.records["exact"].status == "loaded"
    assert host.records["torch"].status == "disabled"
    assert host.records["broken"].status == "disabled"


def test_misspelled_hook_fails_that_plugin_only(make_plugin_host):
    @hookimpl
    def enigma_register_backend(register):  # missing the final "s"
        register("typo", object)

    host = make_plugin_host(make_module("typo_plugin", enigma_register_backend=enigma_register_backend))
    record = host.records["typo_plugin"]
    assert record.status == "failed"
    assert "enigma_register_backend" in record.errors[0]
    assert host.records["torch"].status == "loaded"
    assert host.manager.get_plugin("typo_plugin") is None


def test_plugin_raising_while_registering_leaves_nothing_behind(make_plugin_host):
    @hookimpl
    def enigma_register_backends(register):
        register("half", object)
        raise RuntimeError("boom after registering one")

    host = make_plugin_host(make_module("half_plugin", enigma_register_backends=enigma_register_backends))
    assert host.records["half_plugin"].status == "failed"
    assert "RuntimeError: boom after registering one" in host.records["half_plugin"].errors[0]
    with pytest.raises(enigma.NotFoundError):
        host.registry.get("backend", "half")


def test_duplicate_implementation_names_both_origins(make_plugin_host):
    @hookimpl
    def enigma_register_backends(register):
        register("torch", object)

    host = make_plugin_host(make_module("copycat", enigma_register_backends=enigma_register_backends))
    record = host.records["copycat"]
    assert record.status == "failed"
    assert "backend 'torch' is registered twice" in record.errors[0]
    assert "enigma-core" in record.errors[0] and "copycat" in record.errors[0]
    assert host.select("backend", "torch").plugin == "torch"


def test_broadcast_isolates_a_failing_observer(make_plugin_host):
    seen = []

    @hookimpl
    def enigma_engine_stopped(engine):
        raise ValueError("observer bug")

    @hookimpl
    def enigma_engine_started(engine):
        seen.append(engine)

    def good_stopped(engine):
        seen.append(("stopped", engine))

    good = make_module("good", enigma_engine_stopped=hookimpl(good_stopped),
                       enigma_engine_started=enigma_engine_started)
    bad = make_module("bad", enigma_engine_stopped=enigma_engine_stopped)
    host = make_plugin_host(good, bad, builtins=False)
    host.broadcast("enigma_engine_stopped", engine="E")
    assert seen == [("stopped", "E")]
    assert host.records["bad"].errors == ["enigma_engine_stopped raised ValueError: observer bug"]
    assert host.records["bad"].status == "loaded"


def test_broadcast_in_strict_mode_raises(make_plugin_host, monkeypatch):
    monkeypatch.setenv("ENIGMA_STRICT_PLUGINS", "1")

    @hookimpl
    def enigma_engine_stopped(engine):
        raise ValueError("observer bug")

    host = make_plugin_host(make_module("bad", enigma_engine_stopped=enigma_engine_stopped), builtins=False)
    with pytest.raises(ValueError, match="observer bug"):
        host.broadcast("enigma_engine_stopped", engine=None)


def test_hook_implementations_may_take_a_subset_of_arguments(make_plugin_host):
    calls = []

    @hookimpl
    def enigma_register_backends():
        calls.append("called without register")

    host = make_plugin_host(make_module("noargs", enigma_register_backends=enigma_register_backends))
    assert calls == ["called without register"]
    assert host.records["noargs"].status == "loaded"


def test_trace_plugins_writes_hook_calls(make_plugin_host, monkeypatch, capsys):
    monkeypatch.setenv("ENIGMA_TRACE_PLUGINS", "1")

    @hookimpl
    def enigma_engine_started(engine):
        return None

    traced = make_module("traced", enigma_engine_started=enigma_engine_started)
    host = make_plugin_host(traced, builtins=False)
    host.broadcast("enigma_engine_started", engine=None)
    host.hook.enigma_engine_stopped(engine=None)
    err = capsys.readouterr().err
    assert "enigma_engine_started -> plugin traced" in err
    assert "enigma_engine_stopped" in err


def test_registering_the_same_plugin_name_twice_is_refused():
    host = PluginHost()
    host.register_module(make_module("one"), name="one")
    with pytest.raises(PluginError, match="already registered"):
        host.register_module(make_module("one-again"), name="one")


def test_availability_is_truthy_only_when_ok():
    assert Availability.yes()
    assert not Availability.no("no CUDA device")
    assert Availability.no("no CUDA device").reason == "no CUDA device"
