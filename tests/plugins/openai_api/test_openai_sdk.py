"""The OpenAI API, driven by the real openai SDK against a real server."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from enigma import SamplingParams

MESSAGES = [{"role": "user", "content": "Say something about lists."}]


def test_models(client):
    assert {m.id for m in client.models.list().data} == {"tiny", "minilm"}
    model = client.models.retrieve("tiny")
    assert model.id == "tiny" and model.owned_by == "enigma"
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("nope")
    assert error.value.body["code"] == "model_not_found"


def test_chat_matches_the_engine_and_counts_usage(client, reference):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    expected = reference.chat(MESSAGES, SamplingParams(max_tokens=12, temperature=0))[0]
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_chat_streaming_adds_up_to_the_same_answer(client):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_n_seed_stop_and_logprobs(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, n=3, seed=7,
                                           temperature=1.0, logprobs=True, top_logprobs=2)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, n=3, seed=7,
                                           temperature=1.0)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    for choice in reply.choices:
        entries = choice.logprobs.content
        assert len(entries) == reply.usage.completion_tokens // 3 or choice.finish_reason == "stop"
        for entry in entries:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    text = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30,
                                          temperature=0).choices[0].message.content
    stop = text.split()[1] if len(text.split()) > 1 else text[:2]
    stopped = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0,
                                             stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].message.content


def test_vllm_sampling_extensions(client):
    reply = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=40, temperature=0.8,
                                      extra_body={"ignore_eos": True, "min_tokens": 40, "top_k": 5, "min_p": 0.01,
                                                  "repetition_penalty": 1.1})
    assert reply.usage.completion_tokens == 40 and reply.choices[0].finish_reason == "length"


def test_completions(client, reference):
    reply = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=10, temperature=0)
    expected = reference.generate("The quick brown", SamplingParams(max_tokens=10, temperature=0))[0]
    assert reply.choices[0].text == expected.outputs[0].text and reply.object == "text_completion"
    batch = client.completions.create(model="tiny", prompt=["one", "two"], max_tokens=4, n=2, temperature=0,
                                      logprobs=2, echo=True)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text.startswith("one") and batch.choices[2].text.startswith("two")
    prompt_tokens = batch.usage.prompt_tokens // 2
    echoed = batch.choices[0].logprobs  # echo scores the prompt too: one entry per prompt token, then the 4 new
    assert len(echoed.tokens) == len(echoed.token_logprobs) == prompt_tokens + 4
    assert echoed.token_logprobs[0] is None and echoed.top_logprobs[0] is None
    assert all(len(top) >= 2 for top in echoed.top_logprobs[1:])
    streamed = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_echo_scores_every_prompt_token_as_vllm_does(client, reference):
    """What lm-eval's loglikelihood reads: token ids in, a logprob per prompt token out (the first None)."""
    ids = reference.tokenizer.encode("Paged attention stores keys in blocks.")
    expected = reference.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    reply = client.completions.create(model="tiny", prompt=[ids], max_tokens=1, logprobs=1, echo=True, temperature=0)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    for position in range(1, len(ids)):
        assert logprobs.token_logprobs[position] == pytest.approx(expected.prompt_logprobs[position][ids[position]]
                                                                  .logprob, abs=1e-4)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert reply.choices[0].text.startswith(reference.tokenizer.decode(ids))

    scored = client.completions.create(model="tiny", prompt=[ids], max_tokens=0, logprobs=0, echo=True)
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(logprobs.token_logprobs[1:len(ids)])
    assert len(scored.choices[0].logprobs.tokens) == len(ids) and scored.usage.completion_tokens == 0
    assert scored.choices[0].text == reference.tokenizer.decode(ids) and scored.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="'max_tokens' 0 generates nothing"):
        client.completions.create(model="tiny", prompt=[ids], max_tokens=0)

    chunks = list(client.completions.create(model="tiny", prompt=[ids], max_tokens=3, logprobs=1, echo=True,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].text == reference.tokenizer.decode(ids)
    assert chunks[0].choices[0].logprobs.token_logprobs[1:] == pytest.approx(logprobs.token_logprobs[1:len(ids)])
    later = [offset for chunk in chunks[1:] if chunk.choices and chunk.choices[0].logprobs
             for offset in chunk.choices[0].logprobs.text_offset]
    assert later and min(later) >= max(chunks[0].choices[0].logprobs.text_offset)


def test_tokenizer_routes(server, reference):
    base = server[0]
    text = "The quick brown fox"
    tokens = httpx.post(f"{base}/tokenize", json={"model": "tiny", "prompt": text}).json()
    assert tokens["tokens"] == reference.tokenizer.encode(text) and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == reference.max_model_len
    chat = httpx.post(f"{base}/tokenize", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    expected = reference.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.json()["tokens"] == reference.tokenizer.encode(expected, add_special_tokens=False)
    back = httpx.post(f"{base}/detokenize", json={"model": "tiny", "tokens": tokens["tokens"]}).json()
    assert back == {"prompt": reference.tokenizer.decode(tokens["tokens"], skip_special_tokens=False)}  # vLLM's
    assert back["prompt"].endswith(text)
    info = httpx.get(f"{base}/tokenizer_info", params={"model": "tiny"}).json()
    assert info["eos_token"] == reference.tokenizer.special_tokens.get("eos_token") and info["chat_template"]
    several = httpx.post(f"{base}/tokenize", json={"prompt": text})  # two models served: which one?
    assert several.status_code == 400 and several.json()["error"]["param"] == "model"
    bad = httpx.post(f"{base}/detokenize", json={"model": "tiny", "tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_embeddings_match_the_engine(client, server):
    from tiny_models import minilm_path

    from enigma import LLM

    texts = ["A list is mutable.", "Tuples are not."]
    reply = client.embeddings.create(model="minilm", input=texts)  # the SDK asks for base64 by default
    expected = LLM(minilm_path()).embed(texts)
    for item, reference in zip(reply.data, expected):
        a, b = item.embedding, reference.outputs.embedding
        cosine = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
        assert cosine > 0.99999
    as_floats = client.embeddings.create(model="minilm", input="one", encoding_format="float")
    assert len(as_floats.data[0].embedding) == 384 and as_floats.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError, match="generates text"):
        client.embeddings.create(model="tiny", input="x")


@pytest.mark.parametrize(("kwargs", "param", "message"), [
    ({"temperature": -1}, "temperature", "temperature = -1"),
    ({"max_tokens": 100_000}, "max_tokens", "maximum context length is 8192 tokens"),
    ({"extra_body": {"mirostat": 2}}, "mirostat", "unknown parameter 'mirostat'"),
    ({"extra_body": {"tools": [{"type": "function"}]}}, "tools[0]", "must be {type: function, function"),
    ({"extra_body": {"logit_bias": {"1": 5}}}, "logit_bias", "not supported"),
    ({"n": "two"}, "n", "'n' must be an integer"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "must be system"),
])
def test_bad_requests_raise_the_sdk_error_naming_the_field(client, kwargs, param, message):
    arguments = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError, match=message) as error:
        client.chat.completions.create(**arguments)
    assert error.value.status_code == 400 and error.value.body["param"] == param
    assert error.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        client.chat.completions.create(model="nope", messages=MESSAGES)


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"", 400, "empty"),
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"model": "tiny", "messages": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b"{" + b" " * (2 * 2**20) + b"}", 413, "limit"),
])
def test_malformed_bodies(server, body, status, message):
    response = httpx.post(f"{server[0]}/v1/chat/completions", content=body,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status and message in response.json()["error"]["message"]
    assert httpx.get(f"{server[0]}/health").status_code == 200  # still serving


def test_health_routes(server):
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server[0]}/health/ready").json() == {"status": "ready"}
    full = httpx.get(f"{server[0]}/health/full").json()
    assert full["models"]["tiny"]["engine"]["kv_blocks_used"] == 0
    assert full["versions"]["plugins"]["openai-api"] == "0.1.0"
    assert httpx.get(f"{server[0]}/nowhere").json()["error"]["code"] == "not_found"


def test_langchain_chat_openai(server):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{server[0]}/v1", api_key="unused", model="tiny", temperature=0, max_tokens=8)
    answer = chat.invoke("Say something about lists.")
    assert isinstance(answer.content, str) and answer.content
    pieces = [piece.content for piece in chat.stream("Say something about lists.")]
    assert "".join(pieces) == answer.content


def test_clients_that_disconnect_mid_stream_leave_no_kv_blocks(server):
    import time

    # uninterrupted, these four would generate 32,000 tokens: tens of seconds here
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8000, "stream": True, "ignore_eos": True}
    started = time.monotonic()
    for _ in range(4):
        with httpx.stream("POST", f"{server[0]}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            next(lines)
        # leaving the block closes the connection mid-stream
    while True:
        engine = httpx.get(f"{server[0]}/health/full").json()["models"]["tiny"]["engine"]
        if engine["kv_blocks_used"] == 0 and engine["running"] == 0:
            break
        assert time.monotonic() - started < 5, engine
        time.sleep(0.05)


def test_openapi_document_matches_the_server(server):
    from enigma.server.openai_fields import CHAT_FIELDS, COMPLETION_FIELDS, EMBEDDING_FIELDS

    document = httpx.get(f"{server[0]}/openapi.json").json()
    assert document["openapi"].startswith("3.")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health/ready"):
        assert path in document["paths"], path
    schemas = document["components"]["schemas"]
    for name, fields in (("ChatCompletionRequest", CHAT_FIELDS), ("CompletionRequest", COMPLETION_FIELDS),
                         ("EmbeddingRequest", EMBEDDING_FIELDS)):
        assert set(schemas[name]["properties"]) == set(fields) and schemas[name]["additionalProperties"] is False
    # every documented path answers something other than "no such route"
    for path, operations in document["paths"].items():
        url = server[0] + path.replace("{model_id}", "tiny")
        for method in operations:
            response = httpx.request(method.upper(), url, json={} if method == "post" else None)
            assert response.status_code != 404 or response.json()["error"]["code"] != "not_found", path
