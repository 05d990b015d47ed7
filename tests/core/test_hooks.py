"""Each hook spec, exercised through a plugin registered with a real host.

docs/plugins.md has a section per hook and this suite a ``test_hook_<name>``
per hook; tests/test_docs.py fails when either is missing.
"""

from __future__ import annotations

import time
import types

import pytest

from enigma import Availability, hookimpl
from enigma.events import RequestFinished, RequestStarted
from enigma.kinds import PROTOCOLS, SchedulerOutput


class PingTransport:
    def routes(self, context):
        return [("GET", "/ping")]


def check_registration(make_plugin_host, kind, hook_name, factory, exercise):
    """A plugin registers an implementation of ``kind``; selection finds it; it works."""

    def register_hook(register):
        register(f"test-{kind}", factory, priority=1000, summary=f"a test {kind}")
        register(f"unavailable-{kind}", factory, priority=2000,
                 available=lambda: Availability.no("needs hardware this machine lacks"))

    plugin = types.ModuleType(f"test_{kind}_plugin")
    setattr(plugin, hook_name, hookimpl(register_hook))
    host = make_plugin_host(plugin)
    assert host.records[plugin.__name__].status == "loaded"
    chosen = host.select(kind)  # auto skips the unavailable, higher-priority one
    assert (chosen.name, chosen.plugin) == (f"test-{kind}", plugin.__name__)
    assert chosen.summary == f"a test {kind}"
    instance = host.create(kind, f"test-{kind}")
    assert isinstance(instance, PROTOCOLS[kind])
    exercise(instance)


def test_hook_enigma_register_backends(make_plugin_host):
    from enigma.backends.torch_backend import TorchBackend

    def exercise(backend):
        assert backend.device.type in ("cpu", "cuda")

    check_registration(make_plugin_host, "backend", "enigma_register_backends", TorchBackend, exercise)


def test_builtin_cache_and_scheduler_run_an_engine_step(make_plugin_host):
    host = make_plugin_host()
    cache = host.create("cache", "paged", num_blocks=8, block_size=4, max_model_len=32, enable_prefix_caching=True)
    scheduler = host.create("scheduler", "continuous", cache=cache, max_num_seqs=4, max_num_batched_tokens=16)
    assert isinstance(cache, PROTOCOLS["cache"]) and isinstance(scheduler, PROTOCOLS["scheduler"])
    assert host.select("cache").name == "paged" and host.select("scheduler").name == "continuous"
    assert host.select("cache", "contiguous").plugin == "paged"


@pytest.fixture
def fifo(installed_plugins):
    """The enigma-plugin-fifo fixture package (a scheduler and a cache written from their contracts)."""
    import enigma_fifo

    return enigma_fifo


def test_hook_enigma_register_schedulers(make_plugin_host, run_engine, fifo):
    from enigma_fifo.kinds import FifoScheduler

    check_registration(make_plugin_host, "scheduler", "enigma_register_schedulers", FifoScheduler,
                       lambda scheduler: None)
    run = run_engine(make_plugin_host(fifo), scheduler="fifo")
    assert isinstance(run.engine.scheduler, FifoScheduler)


def test_hook_enigma_register_caches(make_plugin_host, run_engine, fifo):
    from enigma_fifo.kinds import FreeListCache

    check_registration(make_plugin_host, "cache", "enigma_register_caches", FreeListCache, lambda cache: None)
    host = make_plugin_host(fifo)
    assert host.select("cache").name == "paged"  # a third party at the builtin's priority does not displace it
    run = run_engine(host, cache="free-list")
    assert isinstance(run.engine.cache, FreeListCache)
    tight = run_engine(host, cache="free-list", scheduler="continuous", num_kv_blocks=16)
    assert tight.engine.stats()["preemptions_total"] > 0  # the builtin scheduler preempted on it


def broken_scheduler(kind):
    """A FifoScheduler broken one way."""
    from enigma_fifo.kinds import FifoScheduler

    class Broken(FifoScheduler):
        def schedule(self):
            if kind == "tuples":  # what an older draft of the docs described: (request, num_tokens) pairs
                return [(request, request.num_tokens) for request in self.queue]
            if kind == "idle":
                return SchedulerOutput(scheduled=[])
            return super().schedule()

        def update_from_output(self, output, runner_output):
            if kind != "stuck":  # "stuck" schedules work but never advances computed tokens
                super().update_from_output(output, runner_output)

    return Broken


@pytest.mark.parametrize(("kind", "rule"), [
    ("tuples", "schedule.. returned a list; it must return an enigma.kinds.SchedulerOutput"),
    ("stuck", "update_from_output left request '0' at 0 computed tokens"),
    ("idle", "it scheduled nothing for 3 steps while has_unfinished.. was true"),
])
def test_a_scheduler_breaking_the_contract_gets_an_error_not_a_hang(make_plugin_host, tiny_llama, fifo, kind,
                                                                      rule):
    from enigma import LLM, PluginError, SamplingParams

    @hookimpl
    def enigma_register_schedulers(register):
        register("broken", broken_scheduler(kind))

    plugin = types.ModuleType("broken_plugin")
    plugin.enigma_register_schedulers = enigma_register_schedulers
    make_plugin_host(plugin, install=True)
    llm = LLM(tiny_llama, scheduler="broken", num_kv_blocks=16)
    with pytest.raises(PluginError, match=rf"scheduler 'broken' \(from broken_plugin\) broke its contract: {rule}"):
        llm.generate("Hello", SamplingParams(max_tokens=4))
    assert llm.engine.stats()["kv_blocks_used"] == 0  # the failed request was aborted


def test_hook_enigma_register_transports(make_plugin_host):
    def exercise(transport):
        assert transport.routes(None) == [("GET", "/ping")]

    check_registration(make_plugin_host, "transport", "enigma_register_transports", PingTransport, exercise)


class FakeEngine:
    model_name = "enigma-tiny"

    def stats(self):
        return {"running": 0}


@pytest.fixture
def observed(make_plugin_host):
    """A host with an observer plugin recording every lifecycle event."""
    events = []
    plugin = types.ModuleType("observer")
    for name in ("enigma_engine_started", "enigma_engine_stopped"):
        setattr(plugin, name, hookimpl(specname=name)(
            lambda engine, _name=name: events.append((_name, engine.model_name, engine.stats()))))
    for name in ("enigma_request_started", "enigma_request_finished"):
        setattr(plugin, name, hookimpl(specname=name)(
            lambda event, _name=name: events.append((_name, event))))
    return make_plugin_host(plugin), events


def test_hook_enigma_engine_started(observed):
    host, events = observed
    host.broadcast("enigma_engine_started", engine=FakeEngine())
    assert events == [("enigma_engine_started", "enigma-tiny", {"running": 0})]


def test_hook_enigma_engine_stopped(observed):
    host, events = observed
    host.broadcast("enigma_engine_stopped", engine=FakeEngine())
    assert events == [("enigma_engine_stopped", "enigma-tiny", {"running": 0})]


def test_hook_enigma_request_started(observed):
    host, events = observed
    event = RequestStarted(request_id="r1", model="enigma-tiny", prompt_tokens=12, arrival_time=time.time())
    host.broadcast("enigma_request_started", event=event)
    assert events == [("enigma_request_started", event)]


def test_hook_enigma_request_finished(observed):
    host, events = observed
    event = RequestFinished(request_id="r1", model="enigma-tiny", finish_reason="length",
                            prompt_tokens=12, generation_tokens=5, arrival_time=100.0,
                            first_token_time=100.5, finished_time=102.5)
    host.broadcast("enigma_request_finished", event=event)
    assert events == [("enigma_request_finished", event)]
    assert event.time_to_first_token == 0.5
    assert event.e2e_latency == 2.5
    assert event.mean_inter_token_latency == 0.5
    with pytest.raises(AttributeError):
        event.prompt_tokens = 3  # observers cannot change what others see


def test_hook_enigma_register_models(make_plugin_host, tiny_model, monkeypatch):
    import enigma.plugins
    from enigma import LLM, SamplingParams
    from enigma.errors import NotFoundError
    from enigma.llm import resolve_model_path

    folder = tiny_model("llama-gqa")

    @hookimpl
    def enigma_register_models(register):
        register("packaged-tiny", lambda: folder, summary="a model shipped inside a package")

    plugin = types.ModuleType("test_model_plugin")
    plugin.enigma_register_models = enigma_register_models
    host = make_plugin_host(plugin)
    assert host.records["test_model_plugin"].status == "loaded"
    monkeypatch.setattr(enigma.plugins, "_host", host)
    assert resolve_model_path("packaged-tiny") == folder
    assert resolve_model_path("packaged-tiny:latest") == folder
    with pytest.raises(NotFoundError, match=r"packaged: .*packaged-tiny"):
        resolve_model_path("packaged-tiny:other-tag")
    output = LLM("packaged-tiny").generate("Hello", SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(output.outputs[0].token_ids) == 3
