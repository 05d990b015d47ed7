"""The store and the Ollama-style commands, driven as a user would (subprocess and a pty)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub_server import FakeHub
from tiny_models import EOS_ID, SPECIAL_TOKENS, make_model

ENIGMA = Path(sys.executable).parent / "enigma"
IM_END_ID = SPECIAL_TOKENS.index("<|im_end|>")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny-llama"), "llama-gqa", template="chatml")


@pytest.fixture
def hub(model_folder):
    with FakeHub() as server:
        server.add_repo("acme/tiny-llama", model_folder)
        yield server


@pytest.fixture
def hub_env(hub):
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def test_pull_from_the_hub_then_list_show_run(enigma, hub, hub_env, model_folder):
    result = enigma("pull", "hf:acme/tiny-llama", env=hub_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pulled tiny-llama:latest")
    listed = json.loads(enigma("list", "--json").stdout)
    assert [m["name"] for m in listed] == ["tiny-llama:latest"]
    assert listed[0]["source"].startswith("hf:acme/tiny-llama@")
    assert "tiny-llama:latest" in enigma("list").stdout
    shown = json.loads(enigma("show", "tiny-llama", "--json").stdout)
    assert shown["architecture"] == "LlamaForCausalLM" and shown["context_length"] == 512
    files = {f["path"] for f in shown["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "<|im_start|>" in shown["chat_template"]
    text = enigma("show", "tiny-llama").stdout
    assert "LlamaForCausalLM" in text and "context length" in text
    answer = enigma("run", "tiny-llama", "Hello", "--max-tokens", "5", "--temperature", "0")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()


def test_interrupted_pull_resumes_with_a_range_request(enigma, hub, hub_env, enigma_home):
    hub.bytes_per_second = 100_000
    process = subprocess.Popen([str(ENIGMA), "pull", "hf:acme/tiny-llama"], env={**os.environ, **hub_env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    partial = []
    while time.monotonic() < deadline and process.poll() is None:
        partial = [p for p in enigma_home.rglob("model.safetensors.part") if p.stat().st_size > 50_000]
        if partial:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert partial, "no partial download seen before the kill"
    assert json.loads(enigma("list", "--json").stdout) == []  # no half model in the store
    hub.bytes_per_second = None
    result = enigma("pull", "hf:acme/tiny-llama", env=hub_env)
    assert result.returncode == 0, result.stderr
    resumed = [r for r in hub.requests if r[0] == "GET" and r[1].endswith("model.safetensors") and r[2]]
    assert resumed and int(resumed[-1][2].split("=")[1].rstrip("-")) > 50_000
    shown = json.loads(enigma("show", "tiny-llama", "--json").stdout)
    assert enigma("run", "tiny-llama", "Hi", "--max-tokens", "2").returncode == 0
    assert all(len(f["sha256"]) == 64 for f in shown["files"])


def test_corrupt_download_is_detected_and_repulled(enigma, hub, hub_env):
    hub.corrupt = {"model.safetensors"}
    result = enigma("pull", "hf:acme/tiny-llama", env=hub_env)
    assert result.returncode == 1
    assert "model.safetensors is corrupt" in result.stderr and "enigma pull" in result.stderr
    assert json.loads(enigma("list", "--json").stdout) == []
    hub.corrupt = set()
    assert enigma("pull", "hf:acme/tiny-llama", env=hub_env).returncode == 0


def test_pull_errors(enigma, hub, hub_env, tmp_path):
    result = enigma("pull", "hf:acme/nothing-here", env=hub_env)
    assert result.returncode == 1 and "acme/nothing-here does not exist" in result.stderr
    result = enigma("pull", "hf:acme/tiny-llama@v9", env=hub_env)
    assert result.returncode == 1 and "has no revision 'v9'" in result.stderr
    offline = {**hub_env, "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = enigma("pull", "hf:acme/tiny-llama", env=offline)
    assert result.returncode == 1 and "cannot reach http://127.0.0.1:9" in result.stderr
    result = enigma("pull", "somewhere-else")
    assert result.returncode == 1 and "cannot pull 'somewhere-else'" in result.stderr
    (tmp_path / "empty").mkdir()
    result = enigma("pull", str(tmp_path / "empty"))
    assert result.returncode == 1 and "has no config.json" in result.stderr


def test_names_are_validated(enigma, model_folder):
    for bad in ("../evil", "a/b", "x:..", ":tag", "name:"):
        result = enigma("pull", str(model_folder), "--name", bad)
        assert result.returncode == 1, bad
        assert "is not valid" in result.stderr, (bad, result.stderr)


def test_local_folder_cp_create_rm(enigma, model_folder, tmp_path, enigma_home):
    assert enigma("pull", str(model_folder), "--name", "base:v1").returncode == 0
    assert enigma("cp", "base:v1", "copy").returncode == 0
    names = [m["name"] for m in json.loads(enigma("list", "--json").stdout)]
    assert names == ["base:v1", "copy:latest"]
    store = enigma_home / "data" / "models"
    assert os.path.samefile(store / "base/v1/model.safetensors", store / "copy/latest/model.safetensors")

    (tmp_path / "Modelfile").write_text(
        'FROM base:v1\n# a comment\nSYSTEM """You answer\nin one line."""\nPARAMETER temperature 0.3\n'
        'PARAMETER stop "<|im_end|>"\nPARAMETER num_predict 7\n')
    result = enigma("create", "terse", "-f", str(tmp_path / "Modelfile"))
    assert result.returncode == 0, result.stderr
    shown = json.loads(enigma("show", "terse", "--json").stdout)
    assert shown["system"] == "You answer\nin one line."
    assert shown["parameters_defaults"] == {"temperature": 0.3, "stop": ["<|im_end|>"], "max_tokens": 7}
    assert enigma("run", "terse", "Hi").returncode == 0

    (tmp_path / "Bad").write_text("FROM base:v1\nPARAMETR temperature 1\n")
    result = enigma("create", "bad", "-f", str(tmp_path / "Bad"))
    assert result.returncode == 1 and f"{tmp_path / 'Bad'}:2: unknown instruction 'PARAMETR'" in result.stderr
    (tmp_path / "Bad").write_text("FROM base:v1\nPARAMETER temperature -1\n")
    result = enigma("create", "bad", "-f", str(tmp_path / "Bad"))
    assert result.returncode == 1 and "Bad:2: temperature = -1.0 is invalid" in result.stderr
    (tmp_path / "Bad").write_text("FROM ./weights.gguf\n")
    result = enigma("create", "bad", "-f", str(tmp_path / "Bad"))
    assert result.returncode == 1 and "FROM ./weights.gguf: there is no file" in result.stderr
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    result = enigma("create", "bad", "-f", str(tmp_path / "Bad"), env={"ENIGMA_DISABLE_PLUGINS": "ggml"})
    assert result.returncode == 1 and "install enigma-plugin-ggml" in result.stderr
    result = enigma("create", "bad", "-f", str(tmp_path / "Bad"))
    assert result.returncode == 1 and "weights.gguf is truncated" in result.stderr
    assert "bad" not in enigma("list").stdout  # nothing half-made in the store
    (tmp_path / "Bad").write_text("FROM base:v1\nADAPTER ./lora\n")
    result = enigma("create", "bad", "-f", str(tmp_path / "Bad"), env={"ENIGMA_DISABLE_PLUGINS": "lora"})
    assert result.returncode == 1 and "ADAPTER needs the lora plugin" in result.stderr
    result = enigma("create", "bad", "-f", str(tmp_path / "Bad"))
    assert result.returncode == 1 and "ADAPTER ./lora is not a LoRA adapter folder" in result.stderr

    result = enigma("rm", "copy")
    assert result.returncode == 2 and "pass -y" in result.stderr
    result = enigma("rm", "-y", "copy", "nope")
    assert result.returncode == 1 and "model 'nope' not found" in result.stderr and "enigma list" in result.stderr
    assert enigma("rm", "-y", "copy", "terse").returncode == 0
    assert [m["name"] for m in json.loads(enigma("list", "--json").stdout)] == ["base:v1"]
    assert (store / "base/v1/model.safetensors").exists()


def test_pull_the_packaged_model_and_detect_a_corrupt_store_copy(enigma, enigma_home):
    result = enigma("pull", "enigma-tiny")
    assert result.returncode == 0, result.stderr
    (listed,) = json.loads(enigma("list", "--json").stdout)
    assert listed["name"] == "enigma-tiny:latest" and listed["source"] == "package:enigma-tiny"
    weights = enigma_home / "data" / "models" / "enigma-tiny" / "latest" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated file, as a full disk or a bad copy leaves
    result = enigma("run", "enigma-tiny", "Hi")
    assert result.returncode == 1
    assert "model enigma-tiny:latest is corrupt (model.safetensors has 1000 bytes" in result.stderr
    assert "fetch it again: `enigma pull enigma-tiny --name enigma-tiny:latest`" in result.stderr


def test_run_reads_piped_stdin_and_reports_unknown_models(enigma, model_folder):
    assert enigma("pull", str(model_folder), "--name", "tiny").returncode == 0
    result = enigma("run", "tiny", "--max-tokens", "3", "--seed", "1", input="Explain lists.")
    assert result.returncode == 0 and result.stdout.strip()
    again = enigma("run", "tiny", "--max-tokens", "3", "--seed", "1", input="Explain lists.")
    assert again.stdout == result.stdout  # same seed, same answer
    result = enigma("run", "missing-model", "Hi")
    assert result.returncode == 1 and "model 'missing-model' not found" in result.stderr
    assert "enigma pull" in result.stderr
    result = enigma("run", "tiny", "Hi", "--temperature", "-2")
    assert result.returncode == 1 and "temperature = -2.0 is invalid" in result.stderr


class Terminal:
    """The command running on a pseudo-terminal, read and typed into like a person would."""

    def __init__(self, *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.execv(str(ENIGMA), [str(ENIGMA), *args])
        self.output = ""

    def expect(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if time.monotonic() > deadline:
                raise AssertionError(f"did not see {text!r}; got {self.output[-800:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    self.output += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:
                    break
        seen, _, self.output = self.output.partition(text)
        return seen

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_interactive_chat_on_a_terminal(enigma, tmp_path):
    # a long context, and end-of-text/end-of-turn never the likeliest token, so that a greedy
    # answer is still streaming when Ctrl-C comes
    from safetensors.torch import load_file, save_file

    folder = make_model(tmp_path / "long", "llama-gqa", template="chatml", max_position_embeddings=8192)
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"][[EOS_ID, IM_END_ID]] = 0.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert enigma("pull", str(folder), "--name", "long").returncode == 0
    term = Terminal("run", "long", "--max-tokens", "4", "--temperature", "0")
    term.expect(">>> ")
    term.send("Hello\r")
    assert term.expect(">>> ").strip()  # an answer, then the prompt again
    term.send("/set temperature 0.5\r")
    assert "Set parameter 'temperature' to '0.5'" in term.expect(">>> ")
    term.send("/show parameters\r")
    assert "temperature         0.5" in term.expect(">>> ")
    term.send('"""\rline one\rline two\r"""\r')
    term.expect(">>> ")
    term.send("/set max_tokens 8000\r")
    term.expect(">>> ")
    term.send("/set temperature 0\r")
    term.expect(">>> ")
    term.send("Tell me everything\r")
    time.sleep(1.5)
    term.send("\x03")  # Ctrl-C stops the answer, not the session
    answer = term.expect(">>> ")
    assert len(answer) > 20 and "Use Ctrl-D" not in answer  # interrupted mid-answer
    term.send("/clear\r")
    assert "Cleared the conversation" in term.expect(">>> ")
    term.send("/nope\r")
    assert "Unknown command '/nope'" in term.expect(">>> ")
    term.send("/bye\r")
    assert term.wait() == 0


def test_one_shot_run_answers_through_a_running_server(enigma, model_folder, enigma_home):
    import httpx
    from serving import launch, stop

    assert enigma("pull", str(model_folder), "--name", "tiny").returncode == 0
    env = {**os.environ, "ENIGMA_HOME": str(enigma_home)}
    process, base = launch(env, "tiny", log_path=enigma_home / "server.log")
    port = base.rsplit(":", 1)[1]

    def finished_on_server():
        metrics = httpx.get(f"{base}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("enigma:request_success_total"))

    try:
        before = finished_on_server()
        remote = enigma("run", "tiny", "Hello", "--max-tokens", "5", "--temperature", "0",
                        env={"ENIGMA_SERVER__PORT": port})
        assert remote.returncode == 0, remote.stderr
        assert finished_on_server() == before + 1  # the server answered
        local = enigma("run", "tiny", "Hello", "--max-tokens", "5", "--temperature", "0", "--local",
                       env={"ENIGMA_SERVER__PORT": port})
        assert finished_on_server() == before + 1 and local.stdout == remote.stdout  # same answer, loaded here
    finally:
        stop(process)


def test_serve_refuses_an_unknown_model_before_starting(enigma):
    result = enigma("serve", "no-such-model", "--port", "9")
    assert result.returncode == 1 and "model 'no-such-model' not found" in result.stderr


def test_speculative_decoding_from_a_modelfile_and_the_flags(enigma, model_folder, tmp_path, enigma_home):
    """`PARAMETER draft` is kept in the store and used by run and serve; `--draft` does the same; the
    served engine reports vLLM's speculative counters in /metrics."""
    import httpx
    from serving import launch, stop

    assert enigma("pull", str(model_folder), "--name", "tiny").returncode == 0
    (tmp_path / "Modelfile").write_text("FROM tiny\nPARAMETER draft [ngram]\nPARAMETER num_speculative_tokens 3\n")
    assert enigma("create", "tiny-spec", "-f", str(tmp_path / "Modelfile")).returncode == 0
    shown = json.loads(enigma("show", "tiny-spec", "--json").stdout)
    assert shown["speculative"] == {"model": "[ngram]", "num_speculative_tokens": 3}
    assert "speculative decoding" in enigma("show", "tiny-spec").stdout
    plain = enigma("run", "tiny", "ab ab ab ab", "--max-tokens", "12", "--temperature", "0", "--local")
    drafted = enigma("run", "tiny-spec", "ab ab ab ab", "--max-tokens", "12", "--temperature", "0", "--local")
    flagged = enigma("run", "tiny", "ab ab ab ab", "--max-tokens", "12", "--temperature", "0", "--local",
                     "--draft", "[self]")
    assert plain.returncode == drafted.returncode == flagged.returncode == 0, drafted.stderr + flagged.stderr
    assert plain.stdout == drafted.stdout == flagged.stdout  # greedy: the same answer

    (tmp_path / "Bad").write_text("FROM tiny\nPARAMETER num_speculative_tokens 3\n")
    result = enigma("create", "bad", "-f", str(tmp_path / "Bad"))
    assert result.returncode == 1 and "needs PARAMETER draft" in result.stderr
    result = enigma("run", "tiny", "hi", "--num-speculative-tokens", "2", "--local")
    assert result.returncode == 2 and "--num-speculative-tokens needs --draft" in result.stderr

    env = {**os.environ, "ENIGMA_HOME": str(enigma_home)}
    process, base = launch(env, "tiny", "--draft", "[ngram]", "--num-speculative-tokens", "4",
                           log_path=enigma_home / "server.log")
    try:
        response = httpx.post(f"{base}/v1/completions", json={
            "model": "tiny", "prompt": "ab ab ab ab ab ab", "max_tokens": 24, "temperature": 0})
        assert response.status_code == 200, response.text
        metrics = httpx.get(f"{base}/metrics").text
        drafts = [line for line in metrics.splitlines()
                  if line.startswith('enigma:spec_decode_num_draft_tokens_total{model_name="tiny"}')]
        assert drafts and float(drafts[0].rsplit(" ", 1)[1]) > 0
        assert "enigma:spec_decode_draft_acceptance_rate" in metrics
    finally:
        stop(process)
