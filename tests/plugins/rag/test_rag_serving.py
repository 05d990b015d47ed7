"""RAG behind a real `enigma serve`: /v1/rag with httpx, grounded chats with the openai SDK, and the CLI."""

from __future__ import annotations

import base64
import json
import os
import subprocess

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from rag_files import write_pdf
from serving import ENIGMA, launch, stop


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(base_url, env)`` of a server with a tiny chat model, its data dir shared with the CLI."""
    from tiny_models import make_model

    home = tmp_path_factory.mktemp("rag-serve-home")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ENIGMA_")}, "ENIGMA_HOME": str(home)}
    folder = make_model(tmp_path_factory.mktemp("rag-chat"), "llama-gqa", template="chatml")
    subprocess.run([str(ENIGMA), "pull", str(folder), "--name", "tiny"], env=env, check=True, capture_output=True)
    process, base = launch(env, "tiny", log_path=home / "server.log")
    yield base, env
    stop(process)


def cli(env, *args):
    return subprocess.run([str(ENIGMA), *args], capture_output=True, text=True, env=env, timeout=300)


def test_documents_in_search_out_over_http(served, tmp_path):
    base, _ = served
    pdf = write_pdf(tmp_path / "manual.pdf", [["Unpacking the widget."], ["The widget listens on port 8080."]])
    files = [{"name": "manual.pdf", "content": base64.b64encode(pdf.read_bytes()).decode()},
             {"name": "notes.md", "content": base64.b64encode(b"# Notes\n\nBackups run nightly at two.").decode()},
             {"name": "broken.pdf", "content": base64.b64encode(b"%PDF-1.4 nothing").decode()},
             {"name": "../../etc/evil.txt", "content": base64.b64encode(b"a path is not a name").decode()}]
    answer = httpx.post(f"{base}/v1/rag/web/documents", timeout=120, json={
        "files": files, "documents": [{"text": "The cafeteria opens at nine.", "source": "memo-1"}]})
    assert answer.status_code == 200, answer.text
    results = {item["source"]: item for item in answer.json()["files"]}
    assert results["manual.pdf"]["status"] == "added" and results["manual.pdf"]["chunks"] == 2
    assert results["broken.pdf"]["status"] == "failed" and "broken.pdf is" in results["broken.pdf"]["error"]
    assert "/tmp" not in results["broken.pdf"]["error"]  # the upload's temporary path is not shown
    assert results["evil.txt"]["status"] == "added" and results["memo-1"]["status"] == "added"
    again = httpx.post(f"{base}/v1/rag/web/documents", timeout=120, json={"files": files[:1]}).json()
    assert again["files"][0]["status"] == "unchanged"
    found = httpx.post(f"{base}/v1/rag/web/search", json={"query": "what port does the widget use", "top_k": 2})
    assert found.status_code == 200
    best = found.json()["data"][0]
    assert best["file"] == "manual.pdf" and best["page"] == 2 and "8080" in best["text"]
    assert httpx.get(f"{base}/v1/rag").json()["data"] == [{"collection": "web"}]
    shown = httpx.get(f"{base}/v1/rag/web").json()
    assert shown["embedding_model"] == "all-minilm-l6-v2" and len(shown["documents"]) == 4
    missing = httpx.post(f"{base}/v1/rag/nope/search", json={"query": "x"})
    assert missing.status_code == 404 and "collection 'nope' does not exist" in missing.json()["error"]["message"]
    bad = httpx.post(f"{base}/v1/rag/web/search", json={"query": "x", "top_k": 0})
    assert bad.status_code == 400 and "rag.top_k" in bad.json()["error"]["message"]


def test_chats_grounded_through_the_openai_sdk(served, tmp_path):
    base, env = served
    notes = tmp_path / "handbook.md"
    notes.write_text("# Handbook\n\n## Holidays\n\nEvery employee has 30 days of holiday a year.\n\n"
                     "## Parking\n\nThe car park is behind building C.\n")
    added = cli(env, "rag", "add", "handbook", str(notes))
    assert added.returncode == 0, added.stderr
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    question = [{"role": "user", "content": "How many days of holiday do I get?"}]
    completion = client.chat.completions.create(model="tiny", messages=question, max_tokens=8, temperature=0,
                                                extra_body={"rag": {"collection": "handbook", "top_k": 1}})
    sources = completion.model_extra["sources"]
    assert [s["heading"] for s in sources] == [["Handbook", "Holidays"]] and sources[0]["file"] == str(notes)
    stream = client.chat.completions.create(model="tiny", messages=question, max_tokens=8, temperature=0,
                                            stream=True, extra_body={"rag": "handbook"})
    chunks = list(stream)
    assert chunks[0].model_extra["sources"][0]["heading"] == ["Handbook", "Holidays"]
    assert all("sources" not in (chunk.model_extra or {}) for chunk in chunks[1:])
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    again = client.chat.completions.create(model="tiny", messages=question, max_tokens=8, temperature=0,
                                           extra_body={"rag": {"collection": "handbook"}})
    assert streamed == again.choices[0].message.content  # streaming and not: one answer
    plain = client.chat.completions.create(model="tiny", messages=question, max_tokens=8, temperature=0)
    assert "sources" not in (plain.model_extra or {})
    text = client.completions.create(model="tiny", prompt="Where is the car park?", max_tokens=4,
                                     extra_body={"rag": {"collection": "handbook", "top_k": 1}})
    assert text.model_extra["sources"][0]["heading"] == ["Handbook", "Parking"]
    with pytest.raises(NotFoundError, match="collection 'absent' does not exist"):
        client.chat.completions.create(model="tiny", messages=question, extra_body={"rag": "absent"})
    with pytest.raises(BadRequestError, match="unknown field 'rag.k'"):
        client.chat.completions.create(model="tiny", messages=question, extra_body={"rag": {"collection": "x", "k": 1}})


def test_the_rag_command(served, tmp_path):
    _, env = served
    (tmp_path / "a.md").write_text("# Tea\n\nGreen tea is steeped at 80 degrees for two minutes.\n")
    (tmp_path / "b.txt").write_text("Coffee beans are roasted before they are ground.\n")
    (tmp_path / "c.pdf").write_bytes(b"%PDF-1.4 broken")
    added = cli(env, "rag", "add", "drinks", str(tmp_path), "--metadata", "team=kitchen")
    assert added.returncode == 1  # one file failed; the others are in
    assert "added      " + str(tmp_path / "a.md") in added.stdout and "c.pdf is" in added.stderr
    assert "drinks: 2 added, 1 failed; 2 documents in all" in added.stdout
    listed = cli(env, "rag", "list")
    assert listed.returncode == 0 and "drinks" in listed.stdout and "all-minilm-l6-v2" in listed.stdout
    searched = cli(env, "rag", "search", "drinks", "how hot should the water be for tea", "--json", "--top-k", "1")
    hits = json.loads(searched.stdout)
    assert hits[0]["heading"] == ["Tea"] and "80 degrees" in hits[0]["text"]
    assert cli(env, "rag", "search", "drinks", "beans", "--where", "team=other").stdout == ""
    asked = cli(env, "rag", "query", "drinks", "How long is green tea steeped?", "--model", "tiny", "--max-tokens", "4")
    assert asked.returncode == 0, asked.stderr
    assert "Sources:\n  [1] a.md, Tea (score" in asked.stdout
    shown = cli(env, "rag", "show", "drinks")
    assert "all-minilm-l6-v2 (384 dimensions)" in shown.stdout and str(tmp_path / "b.txt") in shown.stdout
    assert cli(env, "rag", "rm", "drinks", str(tmp_path / "b.txt")).stdout.startswith("removed 1 of 1")
    assert cli(env, "rag", "rm", "drinks").returncode == 0
    missing = cli(env, "rag", "query", "drinks", "anything")
    assert missing.returncode == 1 and "collection 'drinks' does not exist" in missing.stderr


def test_hook_enigma_request_fields(served):
    """The plugin names ``rag``: the transports accept it, while a field nobody names is still refused."""
    base, _ = served
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    refused = httpx.post(f"{base}/v1/chat/completions", json={**chat, "rag": 3})
    assert refused.status_code == 400 and "'rag' must be a collection name or an object" in refused.text
    unknown = httpx.post(f"{base}/v1/chat/completions", json={**chat, "ragz": "docs"})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_parameter"
    assert httpx.post(f"{base}/v1/chat/completions", json={**chat, "rag": None}).status_code == 200
