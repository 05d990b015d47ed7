"""Request-level plugins, pip-installed, behind a real `enigma serve` and the openai SDK.

``enigma-plugin-grounding`` (a retriever + ``enigma_before_generation``) and
``enigma-plugin-memo`` (settings + both request hooks + ``enigma_asgi_wrapper``)
are fixture packages in tests/fixtures, installed as separate distributions.
"""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest
from openai import OpenAI
from serving import ENIGMA, launch, stop

from enigma import LLM, SamplingParams
from enigma.kinds import Document

QUESTION = [{"role": "user", "content": "How does paged attention store keys?"}]


@pytest.fixture
def serve(installed_plugins, enigma_home, tmp_path, tiny_model_folder):
    """``serve(**env)`` -> an openai client of a fresh server with the fixture plugins installed."""
    started = []

    def start(**extra_env):
        env = {**os.environ, **extra_env}
        subprocess.run([str(ENIGMA), "pull", str(tiny_model_folder), "--name", "tiny"], env=env, check=True,
                       capture_output=True)
        process, base = launch(env, "tiny", log_path=tmp_path / f"server{len(started)}.log")
        started.append(process)
        return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), base

    yield start
    for process in started:
        stop(process)


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    from tiny_models import make_model

    return make_model(tmp_path_factory.mktemp("hooks-model"), "llama-gqa", template="chatml")


def test_hook_enigma_register_retrievers(installed_plugins):
    from enigma.retrieval import open_retriever

    retriever = open_retriever("keyword", collection="notes")
    ids = retriever.add([Document(text="Paged attention stores keys and values in blocks.", id="paging",
                                  metadata={"source": "engine.md"}),
                         Document(text="Continuous batching lets requests join while others decode.",
                                  metadata={"source": "scheduler.md"})])
    assert ids[0] == "paging" and len(ids[1]) == 32
    hits = retriever.search("where are keys stored in paged attention", k=4)
    assert [hit.id for hit in hits] == ["paging"] and hits[0].metadata == {"source": "engine.md"}
    assert retriever.search("requests decode", where={"source": "engine.md"}) == []
    assert open_retriever("keyword", collection="notes").count() == 2  # persisted in its storage
    assert retriever.delete(["paging", "nope"]) == 1 and retriever.count() == 1
    with pytest.raises(enigma_errors().BadRequestError, match="collection name '../x' is not valid"):
        open_retriever("keyword", collection="../x")


def enigma_errors():
    import enigma.errors

    return enigma.errors


def test_hook_enigma_before_generation(serve, tiny_model_folder):
    from enigma.retrieval import open_retriever

    passage = "Paged attention stores keys and values in fixed-size blocks."
    open_retriever("keyword", collection="manual").add([Document(text=passage, id="p1",
                                                                 metadata={"source": "manual.md"})])
    client, _ = serve(ENIGMA_PLUGINS__GROUNDING__COLLECTION="manual", ENIGMA_PLUGINS__GROUNDING__K="1")
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=QUESTION, max_tokens=4,
                                                           temperature=0.7)
    reply = raw.parse()
    assert raw.headers["x-grounding-sources"] == "p1"

    reference = LLM(tiny_model_folder)
    grounded = [{"role": "system", "content": f"Answer from these passages:\n[1] {passage} (manual.md)"},
                *QUESTION]
    expected = reference.chat(grounded, SamplingParams(max_tokens=1))[0]
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)  # the model saw the passage
    assert reply.usage.prompt_tokens > len(reference.chat(QUESTION, SamplingParams(max_tokens=1))[0]
                                           .prompt_token_ids)

    off_topic = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "zzz"}], max_tokens=2)
    assert "x-grounding-sources" not in off_topic.headers


def test_hook_enigma_generation_finished(serve, enigma_home):
    (enigma_home / "config").mkdir(exist_ok=True)
    (enigma_home / "config" / "config.toml").write_text("[plugins.memo]\nheader = \"x-answer\"\n")
    client, _ = serve()
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Name a list method."}], max_tokens=10,
               temperature=0)
    first = client.chat.completions.with_raw_response.create(**ask)
    second = client.chat.completions.with_raw_response.create(**ask)
    assert (first.headers["x-answer"], second.headers["x-answer"]) == ("miss", "hit")
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert second.parse().choices[0].finish_reason == first.parse().choices[0].finish_reason

    chunks = list(client.chat.completions.create(**ask, stream=True))  # a hit replays as SSE chunks
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == first.parse().choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == first.parse().choices[0].finish_reason

    sampled = client.chat.completions.with_raw_response.create(**{**ask, "temperature": 0.8})
    assert "x-answer" not in sampled.headers  # only greedy requests are remembered

    completion = dict(model="tiny", prompt="Lists are", max_tokens=5, temperature=0)
    assert client.completions.with_raw_response.create(**completion).headers["x-answer"] == "miss"
    hit = client.completions.with_raw_response.create(**completion)
    assert hit.headers["x-answer"] == "hit"


def test_hook_enigma_asgi_wrapper(serve):
    _, base = serve()
    counts = [int(httpx.get(f"{base}/health").headers["x-memo-served"]) for _ in range(3)]
    assert counts[1] == counts[0] + 1 and counts[2] == counts[1] + 1
    assert httpx.get(f"{base}/nowhere").headers["x-memo-served"]  # wraps every response, errors too


def test_hook_enigma_plugin_settings(installed_plugins, enigma, enigma_home):
    shown = enigma("config", "show", "--json", env={"ENIGMA_PLUGINS__MEMO__MAX_ENTRIES": "7"})
    assert shown.returncode == 0, shown.stderr
    import json

    settings = json.loads(shown.stdout)
    assert settings["plugins.memo.max_entries"] == {"value": 7,
                                                    "source": "environment variable ENIGMA_PLUGINS__MEMO__MAX_ENTRIES"}
    assert settings["plugins.grounding.k"]["value"] == 2
    assert enigma("config", "set", "plugins.memo.header", "x-cache").returncode == 0
    assert "[plugins.memo]" in (enigma_home / "config" / "config.toml").read_text()
    assert enigma("config", "get", "plugins.memo.header").stdout.strip() == "x-cache"
    wrong = enigma("config", "set", "plugins.memo.size", "3")
    assert wrong.returncode == 1
    assert "plugin 'memo' has no setting 'size'; its settings are: max_entries, header" in wrong.stderr
    bad = enigma("config", "get", "plugins.memo.max_entries", env={"ENIGMA_PLUGINS__MEMO__MAX_ENTRIES": "0"})
    assert "plugins.memo.max_entries = '0' (from environment variable ENIGMA_PLUGINS__MEMO__MAX_ENTRIES) is " \
           "invalid: expected an integer of at least 1" in bad.stderr
