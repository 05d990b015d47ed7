"""simonw/llm against `enigma serve` as an OpenAI-compatible model (an extra-openai-models.yaml entry):
`llm --schema` gets JSON of the schema, and `llm --functions ... -T` gets a tool call it can run. The model
is enigma-tiny fine-tuned for a few seconds (enigma train) to answer with a Hermes tool call when offered
tools, since a 5M-parameter model would not call them unprompted in `auto` mode."""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from serving import ENIGMA, launch, stop

from enigma.llm import resolve_model_path
from enigma.server.tool_calls import CLOSE, OPEN, Tools, tool_instructions

pytestmark = pytest.mark.slow
LLM = Path(sys.executable).parent / "llm"
ADD_SOURCE = "def add(a: int, b: int) -> int:\n    return a + b\n"
ADD = {"name": "add", "description": "", "parameters": {
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"], "type": "object"}}


def training_chats(count: int = 64) -> list[dict]:
    """Chats as the server renders them for a template without tools: the instructions in the system
    message, a call to add, the tool's result, an answer."""
    system = tool_instructions(Tools((ADD,), "auto"))
    rng = random.Random(0)
    chats = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        question = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "What is {a} plus {b}?"]).format(a=a, b=b)
        call = f"{OPEN}\n{json.dumps({'name': 'add', 'arguments': {'a': a, 'b': b}})}\n{CLOSE}"
        turns = [{"role": "system", "content": system}, {"role": "user", "content": question},
                 {"role": "assistant", "content": call}]
        chats.append({"messages": turns})
        chats.append({"messages": [*turns, {"role": "tool", "content": f"<tool_response>\n{a + b}\n</tool_response>"},
                                   {"role": "assistant", "content": f"The answer is {a + b}."}]})
    return chats


@pytest.fixture(scope="module")
def llm_env(tmp_path_factory):
    work = tmp_path_factory.mktemp("llm-cli")
    env = {**os.environ, "ENIGMA_HOME": str(work / "home")}
    data = work / "chats.jsonl"
    data.write_text("\n".join(json.dumps(chat) for chat in training_chats()))
    subprocess.run([str(ENIGMA), "train", "--data", str(data), "--model", str(resolve_model_path("enigma-tiny")),
                    "--out", str(work / "tooly"), "--max-steps", "30", "--lr", "3e-3", "--seq-len", "512",
                    "--batch-size", "4", "--no-packing"], env=env, check=True, capture_output=True)
    subprocess.run([str(ENIGMA), "pull", str(work / "tooly"), "--name", "tooly"], env=env, check=True,
                   capture_output=True)
    process, base = launch(env, "tooly", log_path=work / "server.log")
    user = work / "llm"
    user.mkdir()
    (user / "extra-openai-models.yaml").write_text(
        f"- model_id: tooly\n  model_name: tooly\n  api_base: \"{base}/v1\"\n  supports_tools: true\n"
        "  supports_schema: true\n")
    yield {**os.environ, "LLM_USER_PATH": str(user), "OPENAI_API_KEY": "unused"}
    stop(process)


def llm(env, *args):
    """llm's answer (stdout) and its tool-debug lines (stderr)."""
    result = subprocess.run([str(LLM), "-m", "tooly", "-o", "temperature", "0", *args], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, result.stderr


def test_llm_runs_the_tool_the_model_calls(llm_env):
    answer, debug = llm(llm_env, "--functions", ADD_SOURCE, "--td", "What is 2 + 3?")
    output = debug + answer
    lines = output.splitlines()
    calls = [index for index, line in enumerate(lines) if line.startswith("Tool call: add(")]
    assert calls, output
    arguments = ast.literal_eval(lines[calls[0]].removeprefix("Tool call: add(").removesuffix(")"))
    assert lines[calls[0] + 1].strip() == str(arguments["a"] + arguments["b"])  # llm ran it on our arguments


def test_llm_schema_gets_json_of_the_schema(llm_env):
    answer, _ = llm(llm_env, "--schema", "name, age int", "Invent a person")
    person = json.loads(answer)  # llm's schema allows other properties too
    assert isinstance(person["name"], str) and isinstance(person["age"], int) and not isinstance(person["age"], bool)
