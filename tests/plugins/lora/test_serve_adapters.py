"""`enigma serve BASE --lora NAME=PATH` with the openai SDK, and a Modelfile's ADAPTER."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serving import ENIGMA, launch, stop
from tiny_models import make_random_adapter

from enigma import LLM, SamplingParams
from enigma.testing import make_tiny_llama
from enigma_lora import merge_adapter

pytestmark = pytest.mark.slow


def greedy_text(folder: Path, prompt: str) -> str:
    out = LLM(folder, dtype="float32").generate(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    return out[0].outputs[0].text


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve-lora")
    base = make_tiny_llama(root / "base", seed=11)
    adapters = {"sql": make_random_adapter(base, root / "sql", seed=1, targets=["q_proj", "v_proj"]),
                "chat": make_random_adapter(base, root / "chat", seed=2, targets=["o_proj", "up_proj"])}
    env = {**os.environ, "ENIGMA_HOME": str(root / "home")}
    process, url = launch(env, str(base), "--lora", f"sql={adapters['sql']}", "--lora",
                          f"chat={adapters['chat']}", "--no-auth",
                          log_path=root / "server.log")
    yield url, base, adapters, root
    stop(process)


def test_the_openai_sdk_picks_adapters_by_model_name(served) -> None:
    from openai import OpenAI

    url, base, adapters, root = served
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    listed = {model.id for model in client.models.list()}
    assert {"sql", "chat", str(base)} <= listed
    prompt = "Hello"
    for name in ("sql", "chat", str(base)):
        folder = base if name == str(base) else merge_adapter(base, adapters[name], output=root / f"merged-{name}")
        expected = greedy_text(folder, prompt)
        answer = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert answer.choices[0].text == expected, name
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=name, prompt=prompt, max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True}))
        assert streamed == expected, name


def test_modelfile_adapter(tmp_path: Path) -> None:
    env = {**os.environ, "ENIGMA_HOME": str(tmp_path / "home")}
    base = make_tiny_llama(tmp_path / "base", seed=12)
    adapter = make_random_adapter(base, tmp_path / "lora", seed=3, targets=["q_proj", "down_proj"])
    (tmp_path / "Modelfile").write_text(f"FROM {base}\nADAPTER ./lora\n")
    created = subprocess.run([str(ENIGMA), "create", "tuned", "-f", str(tmp_path / "Modelfile")], env=env,
                             capture_output=True, text=True)
    assert created.returncode == 0, created.stderr
    answer = subprocess.run([str(ENIGMA), "run", "tuned", "Hello", "--max-tokens", "6", "--temperature", "0",
                             "--local"], env=env, capture_output=True, text=True)
    assert answer.returncode == 0, answer.stderr
    expected = greedy_text(merge_adapter(base, adapter, output=tmp_path / "merged"), "Hello")
    assert answer.stdout.strip() == expected.strip()
    (tmp_path / "Bad").write_text(f"FROM {base}\nADAPTER ./nowhere\n")
    bad = subprocess.run([str(ENIGMA), "create", "bad", "-f", str(tmp_path / "Bad")], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "is not a LoRA adapter folder in PEFT's format" in bad.stderr
