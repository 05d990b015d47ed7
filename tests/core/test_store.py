"""The model store: names, manifests, atomic and serialized writes, verification."""

from __future__ import annotations

import json
import threading

import pytest

from enigma.errors import BadRequestError, NotFoundError
from enigma.modelfile import parse_modelfile
from enigma.store import ModelName, Store


@pytest.fixture
def folder(tiny_model):
    return tiny_model("llama-gqa")


FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_names_parse_like_ollama():
    assert ModelName.parse("Llama3") == ModelName("llama3", "latest")
    assert str(ModelName.parse("qwen2.5:0.5b-instruct")) == "qwen2.5:0.5b-instruct"
    for bad in ("", "../x", "a/b", "a\\b", "x:", ":y", "x:a/b", ".hidden", "a..b", "x" * 81):
        with pytest.raises(BadRequestError, match="is not valid"):
            ModelName.parse(bad)


def test_add_describes_the_model_and_verifies(folder, tmp_path):
    store = Store(tmp_path / "models")
    manifest = store.add_folder("tiny", folder, FILES, source="test")
    assert (manifest.architecture, manifest.context_length, manifest.dtype) == ("LlamaForCausalLM", 512, "float32")
    assert manifest.parameters > 10_000 and len(manifest.id) == 12
    assert store.path("tiny:latest") == tmp_path / "models" / "tiny" / "latest"
    assert store.verify("tiny") == []
    (store.path("tiny") / "config.json").write_text("{}")
    assert store.verify("tiny") == ["config.json has 2 bytes, expected "
                                    f"{next(f.size for f in manifest.files if f.path == 'config.json')}"]
    weights = store.path("tiny") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert "model.safetensors does not match its sha256" in store.verify("tiny")


def test_concurrent_writes_of_one_model_do_not_collide(folder, tmp_path):
    store = Store(tmp_path / "models")
    errors = []

    def add():
        try:
            Store(tmp_path / "models").add_folder("same", folder, FILES, source="thread")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.verify("same") == []
    assert [m.name for m in store.list()] == ["same"]
    assert not list((tmp_path / "models" / ".staging").iterdir())


def test_a_crash_leaves_no_half_model(folder, tmp_path):
    store = Store(tmp_path / "models")
    name = ModelName.parse("crashy")
    with pytest.raises(RuntimeError), store.lock(name), store.staging(name) as staged:
        (staged / "config.json").write_text("partial")
        raise RuntimeError("killed mid-copy")
    assert store.list() == [] and not store.exists("crashy")
    with pytest.raises(NotFoundError, match="`enigma list`.*`enigma pull crashy`"):
        store.get("crashy")
    stale = tmp_path / "models" / ".staging" / "crashy@latest.leftover"
    stale.mkdir(parents=True)
    store.add_folder("crashy", folder, FILES, source="test")
    assert not stale.exists()  # swept by the next write


def test_remove_and_copy(folder, tmp_path):
    store = Store(tmp_path / "models")
    store.add_folder("a:v1", folder, FILES, source="test")
    copied = store.copy("a:v1", "b")
    assert copied.id == store.get("a:v1").id and copied.model_name == ModelName("b", "latest")
    with pytest.raises(BadRequestError, match="onto itself"):
        store.copy("a:v1", "a:v1")
    store.remove("a:v1")
    assert [str(m.model_name) for m in store.list()] == ["b:latest"]
    assert store.verify("b") == []
    with pytest.raises(NotFoundError):
        store.remove("a:v1")


def test_corrupt_manifest_says_what_to_do(folder, tmp_path):
    store = Store(tmp_path / "models")
    store.add_folder("m", folder, FILES, source="test")
    (store.path("m") / "manifest.json").write_text(json.dumps({"name": "m"}))
    with pytest.raises(Exception, match="corrupt.*enigma rm m:latest"):
        store.get("m")


def test_modelfile_parsing():
    spec = parse_modelfile('from base\nSYSTEM\nparameter top_k 5\nPARAMETER stop "a b"\nPARAMETER stop x\n'
                           'TEMPLATE """{{ messages }}\n"""\nLICENSE MIT\n')
    assert spec.from_ == "base" and spec.system == "" and spec.license == "MIT"
    assert spec.parameters == {"top_k": 5, "stop": ["a b", "x"]} and spec.template == "{{ messages }}\n"
    for text, message in [("SYSTEM hi\n", "no FROM"), ("FROM x\nPARAMETER seed\n", ":2: PARAMETER takes a name"),
                          ("FROM x\nPARAMETER mirostat 1\n", ":2: unknown parameter 'mirostat'"),
                          ("FROM x\nPARAMETER top_k many\n", ":2: parameter top_k needs a int"),
                          ('FROM x\nSYSTEM """never closed\n', ":2: the triple-quoted SYSTEM"),
                          ("FROM x\nMESSAGE user hi\n", ":2: unknown instruction 'MESSAGE'")]:
        with pytest.raises(BadRequestError, match=message):
            parse_modelfile(text)
