"""API keys and rate limits, with the openai SDK against a real server."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import httpx
import openai
import pytest
from serving import ENIGMA, launch, stop

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def guarded(server, tmp_path_factory):
    """A server with keys: alice and carol (default limits), bob (3 requests/min), dave (30 tokens/min)."""
    home = tmp_path_factory.mktemp("auth-home")
    env = {**server[1], "ENIGMA_HOME": str(home)}
    subprocess.run([str(ENIGMA), "pull", str(server[2]), "--name", "tiny"], env=env, check=True, capture_output=True)
    keys = {}
    for name, extra in (("alice", []), ("bob", ["--rate-limit", "3/min"]), ("carol", []),
                        ("dave", ["--token-limit", "30/min"])):
        result = subprocess.run([str(ENIGMA), "keys", "create", name, *extra], env=env, check=True,
                                capture_output=True, text=True)
        keys[name] = result.stdout.strip()
    process, base = launch(env, "tiny", log_path=home / "server.log")
    yield base, env, keys, home
    stop(process)


def client(base, key):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def test_keys_are_stored_as_hashes_only(guarded):
    _, env, keys, home = guarded
    path = home / "config" / "api_keys.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    stored = path.read_text()
    assert all(key not in stored for key in keys.values())
    listed = json.loads(subprocess.run([str(ENIGMA), "keys", "list", "--json"], env=env, capture_output=True,
                                       text=True).stdout)
    assert [entry["name"] for entry in listed] == ["alice", "bob", "carol", "dave"]
    assert listed[1]["rate_limit"] == 3 and listed[3]["token_limit"] == 30


def test_requests_need_a_valid_key(guarded):
    base, _, keys, _ = guarded
    reply = client(base, keys["alice"]).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].message.role == "assistant"
    missing = httpx.get(f"{base}/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key provided") as wrong:
        client(base, "sk-enigma-not-a-key").models.list()
    assert wrong.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/health").status_code == 200  # health stays public
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {keys['alice']}"}).status_code == 200


def test_a_revoked_key_gets_the_same_401_as_an_unknown_one(guarded):
    base, env, keys, _ = guarded
    subprocess.run([str(ENIGMA), "keys", "revoke", "carol"], env=env, check=True, capture_output=True)
    revoked = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {keys['carol']}"})
    unknown = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer sk-enigma-never-existed"})
    assert revoked.status_code == unknown.status_code == 401
    assert revoked.json() == unknown.json()


def test_a_key_over_its_rate_limit_gets_429_while_others_are_served(guarded):
    base, _, keys, _ = guarded
    bob = client(base, keys["bob"])
    for _ in range(3):
        bob.models.list()
    with pytest.raises(openai.RateLimitError) as limited:
        bob.models.list()
    assert limited.value.status_code == 429 and int(limited.value.response.headers["Retry-After"]) >= 1
    assert limited.value.body["code"] == "rate_limit_exceeded"
    assert client(base, keys["alice"]).models.list().data[0].id == "tiny"


def test_websockets_authenticate_with_a_query_parameter(guarded):
    import asyncio

    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    base, _, keys, _ = guarded
    url = base.replace("http://", "ws://") + "/v1/ws"

    async def main():
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url):
                pass
        assert refused.value.response.status_code == 401
        async with connect(f"{url}?api_key={keys['alice']}") as socket:
            await socket.send(json.dumps({"type": "completion", "id": "1", "model": "tiny", "prompt": "Hi",
                                          "max_tokens": 2}))
            while (message := json.loads(await socket.recv()))["type"] != "done":
                assert message["type"] == "delta"

    asyncio.run(main())


def test_a_key_over_its_token_budget_gets_429(guarded):
    base, _, keys, _ = guarded
    dave = client(base, keys["dave"])
    reply = dave.completions.create(model="tiny", prompt="Hello there", max_tokens=28,
                                    extra_body={"ignore_eos": True})
    assert reply.usage.total_tokens > 30  # the request that crosses the budget still completes
    with pytest.raises(openai.RateLimitError, match="tokens per minute") as limited:
        dave.completions.create(model="tiny", prompt="Hello", max_tokens=2)
    assert limited.value.body["type"] == "tokens"
    assert client(base, keys["alice"]).completions.create(model="tiny", prompt="Hi", max_tokens=2).choices


def test_no_auth_and_per_address_limits(server, tmp_path):
    env = {**server[1], "ENIGMA_HOME": str(tmp_path), "ENIGMA_SERVER__IP_RATE_LIMIT": "4"}
    subprocess.run([str(ENIGMA), "pull", str(server[2]), "--name", "tiny"], env=env, check=True, capture_output=True)
    subprocess.run([str(ENIGMA), "keys", "create", "someone"], env=env, check=True, capture_output=True)
    process, base = launch(env, "tiny", "--no-auth", log_path=tmp_path / "server.log")
    try:
        statuses = [httpx.get(f"{base}/v1/models").status_code for _ in range(6)]
    finally:
        stop(process)
    assert statuses[:4] == [200] * 4 and statuses[4:] == [429, 429]  # no key needed; the address is limited
