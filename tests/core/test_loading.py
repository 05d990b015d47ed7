"""The staged loading pipeline: architectures and weight sources from plugins, tensors by checkpoint name."""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import enigma.plugins
from enigma import LLM, SamplingParams, hookimpl
from enigma.loader import load_model

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def use_host(monkeypatch, make_plugin_host, *plugins):
    host = make_plugin_host(*plugins)
    monkeypatch.setattr(enigma.plugins, "_host", host)
    return host


def test_the_model_state_dict_is_the_checkpoint(tiny_model):
    """Per-projection modules carry checkpoint names, so nothing is stacked or renamed."""
    folder = tiny_model("llama-gqa")
    loaded = load_model(folder)
    checkpoint = load_file(folder / "model.safetensors")
    assert set(loaded.model.checkpoint_tensors()) == set(checkpoint)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert torch.equal(loaded.model.get_parameter(name), checkpoint[name])


def test_loading_builds_on_meta_and_never_imports_the_compiler(tiny_model):
    import subprocess
    import sys

    code = ("import sys; from enigma.loader import load_model; load_model(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_model("llama-gqa"))], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "False"


def test_hook_enigma_register_architectures(make_plugin_host, tiny_model, tmp_path, monkeypatch):
    import json

    from enigma.models.llama import LlamaForCausalLM

    class ShoutingLlama(LlamaForCausalLM):
        """A family from a plugin: Llama whose logits favour token 7."""

        def compute_logits(self, hidden):
            logits = super().compute_logits(hidden)
            logits[:, 7] += 1000
            return logits

    @hookimpl
    def enigma_register_architectures(register):
        register("ShoutingLlamaForCausalLM", ShoutingLlama, summary="a test family")

    plugin = types.ModuleType("family_plugin")
    plugin.enigma_register_architectures = enigma_register_architectures
    host = use_host(monkeypatch, make_plugin_host, plugin)
    assert host.registry.get("architecture", "ShoutingLlamaForCausalLM").plugin == "family_plugin"

    folder = shutil.copytree(tiny_model("llama-gqa"), tmp_path / "shouting")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["ShoutingLlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    llm = LLM(folder)
    assert isinstance(llm.loaded.model, ShoutingLlama)
    assert llm.generate("Hello", GREEDY)[0].outputs[0].token_ids == [7] * 6


def test_hook_enigma_register_weight_sources(installed_plugins, make_plugin_host, tiny_model, tmp_path):
    import enigma_npz  # tests/fixtures/enigma-plugin-npz, pip-installed

    original = tiny_model("llama-gqa")
    folder = shutil.copytree(original, tmp_path / "npz")
    tensors = load_file(folder / "model.safetensors")
    np.savez(folder / "weights.npz", **{name: t.numpy() for name, t in tensors.items()})
    (folder / "model.safetensors").unlink()

    expected = LLM(original).generate("Hello", GREEDY)[0].outputs[0].token_ids
    make_plugin_host(install=True)  # the builtins alone
    with pytest.raises(enigma.NotFoundError, match=r"no weights that an installed weight source reads "
                                                   r"\(safetensors: \*.safetensors files\)"):
        LLM(folder)

    host = make_plugin_host(enigma_npz, install=True)
    assert [impl.name for impl in host.registry.implementations("weight_source")] == ["npz", "safetensors"]
    assert LLM(folder).generate("Hello", GREEDY)[0].outputs[0].token_ids == expected


def test_backend_runs_plain_projections_fused_without_copying(tiny_model):
    llm = LLM(tiny_model("llama-gqa"))
    attention = llm.loaded.model.model.layers[0].self_attn
    assert attention.qkv_proj is not None
    fused = attention.qkv_proj.weight
    assert attention.q_proj.weight.data_ptr() == fused.data_ptr()  # a view: no second copy
    assert attention.v_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert set(llm.loaded.model.state_dict()) == set(load_file(tiny_model("llama-gqa") / "model.safetensors"))


def test_transformed_projections_stay_unfused(installed_plugins, tiny_model, tmp_path):
    from enigma.quantize import quantize

    llm = LLM(quantize(tiny_model("llama-gqa"), "INT8", output=tmp_path / "int8"))
    layer = llm.loaded.model.model.layers[0]
    assert layer.self_attn.qkv_proj is None and layer.mlp.gate_up_proj is None


def test_hook_enigma_import_model_file(make_plugin_host, tiny_model, tmp_path, monkeypatch):
    """A plugin that reads one-file models (here a tar of a model folder) makes LLM(file) and pull work."""
    import tarfile

    from enigma.errors import NotAvailableError
    from enigma.pull import pull
    from enigma.store import Store

    original = tiny_model("llama-gqa")
    archive = tmp_path / "model.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(original.iterdir()):
            tar.add(path, arcname=path.name)
    calls = []

    @hookimpl
    def enigma_import_model_file(path, folder):
        calls.append((path, sorted(folder.iterdir())))
        if path.suffix != ".tar":
            return None
        with tarfile.open(path) as tar:
            tar.extractall(folder, filter="data")
        return True

    plugin = types.ModuleType("tar_models")
    plugin.enigma_import_model_file = enigma_import_model_file
    monkeypatch.setattr(enigma.plugins, "_host", make_plugin_host(plugin))
    expected = LLM(original).generate("Hello", GREEDY)[0].outputs[0].token_ids
    assert LLM(str(archive)).generate("Hello", GREEDY)[0].outputs[0].token_ids == expected
    assert calls == [(archive.resolve(), [])]  # an absolute path and an empty folder
    LLM(str(archive))
    assert len(calls) == 1  # the imported folder is cached while the file is unchanged
    manifest = pull(str(archive), name="from-tar")
    assert manifest.source == f"file:{archive.resolve()}"
    assert {e.path for e in manifest.files} >= {"config.json", "model.safetensors"}
    assert Store().exists("from-tar")

    (tmp_path / "model.bin").write_bytes(b"pickle?")
    with pytest.raises(NotAvailableError, match=r"model.bin: no installed plugin reads .bin model files"):
        LLM(str(tmp_path / "model.bin"))
    monkeypatch.setattr(enigma.plugins, "_host", make_plugin_host())  # builtins only
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(NotAvailableError, match=r"install enigma-plugin-ggml"):
        LLM(str(tmp_path / "x.gguf"))
