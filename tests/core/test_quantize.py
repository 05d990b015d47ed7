"""The quantizer kind end to end, through the int8 fixture plugin (pip-installed)."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors import safe_open

from enigma import LLM, SamplingParams, hookimpl
from enigma.errors import BadRequestError, ConfigError, NotFoundError
from enigma.plugins import load_plugins
from enigma.quantize import find_quantizer, installed_types, quantize

PROMPT = "The quick brown fox jumps over the lazy dog"


def prompt_logprobs(llm):
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    rows = llm.generate(PROMPT, params)[0].prompt_logprobs[1:]
    return torch.tensor([next(iter(row.values())).logprob for row in rows])


def test_int8_folder_loads_through_its_quantizer_and_generates(installed_plugins, tiny_model, tmp_path):
    folder = tiny_model("llama-gqa")
    out = quantize(folder, "int8", output=tmp_path / "int8")  # type names are case-insensitive

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "int8"
    assert config["quantization_config"]["type"] == "INT8"
    with safe_open(str(out / "model.safetensors"), framework="pt") as tensors:
        assert tensors.get_tensor("model.layers.0.self_attn.v_proj.qweight").dtype == torch.int8
        assert "model.layers.0.self_attn.v_proj.weight" not in tensors.keys()
    assert (out / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "enigma-home"] == ["int8"]  # no scratch left

    quantized, original = LLM(out), LLM(folder)
    from enigma_int8.quantizer import Int8Linear

    v_proj = quantized.loaded.model.model.layers[0].self_attn.v_proj
    assert isinstance(v_proj, Int8Linear) and v_proj.qweight.dtype == torch.int8  # prepare left it packed
    assert v_proj.scales.dtype == torch.float32
    expected, got = prompt_logprobs(original), prompt_logprobs(quantized)
    assert not torch.equal(expected, got)  # really the int8 weights
    error = (expected - got).abs()
    assert error.max() < 0.15 and error.mean() < 0.05, error  # int8 rows: ~1% of a logprob
    text = quantized.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(text.outputs[0].token_ids) == 8


def test_quantize_into_the_store_records_the_quantization(installed_plugins, tiny_model):
    from enigma.store import Store

    path = quantize(tiny_model("llama-gqa"), "INT8", name="tiny:int8")
    manifest = Store().get("tiny:int8")
    assert manifest.quantization == "INT8"
    assert {entry.path for entry in manifest.files} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert Store().verify("tiny:int8") == []
    assert path == Store().path("tiny:int8")
    assert LLM("tiny:int8").loaded.quantization == "INT8"


def test_types_are_listed_and_unknown_ones_named(installed_plugins, monkeypatch):
    monkeypatch.setenv("ENIGMA_DISABLE_PLUGINS", "ggml,exl2")  # the int8 fixture alone
    host = load_plugins()
    assert [(t.name, t.quantizer, t.origin) for t in installed_types(host)] == [
        ("INT8", "int8", "enigma-plugin-int8")]
    quantizer, chosen = find_quantizer("int8", host)
    assert chosen.name == "INT8" and "INT8" in quantizer.types()
    with pytest.raises(NotFoundError, match=r"no installed quantizer makes type 'Q4_K_M'; installed types: "
                                            r"INT8 \(int8\)"):
        find_quantizer("Q4_K_M", host)


def test_without_quantizers_the_error_says_what_to_install(enigma_home, monkeypatch):
    monkeypatch.setenv("ENIGMA_DISABLE_PLUGINS", "ggml,exl2")
    with pytest.raises(NotFoundError, match="no quantizer is installed.*enigma-plugin-ggml"):
        find_quantizer("Q4_K_M", load_plugins())


def test_a_failing_quantizer_leaves_nothing_behind(installed_plugins, tiny_model, tmp_path, monkeypatch):
    from enigma_int8.quantizer import Int8Quantizer

    from enigma.store import Store

    def broken(self, model, *, type, output, options, progress=None):
        (output / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Int8Quantizer, "quantize", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        quantize(tiny_model("llama-gqa"), "INT8", output=tmp_path / "work" / "out")
    assert list((tmp_path / "work").iterdir()) == []
    with pytest.raises(RuntimeError, match="disk full"):
        quantize(tiny_model("llama-gqa"), "INT8", name="tiny:int8")
    assert not Store().exists("tiny:int8")
    assert not list((Store().root / ".staging").iterdir())


def test_an_artifact_that_does_not_name_its_quantizer_is_refused(installed_plugins, tiny_model, tmp_path,
                                                                 monkeypatch):
    from enigma_int8.quantizer import Int8Quantizer

    original = Int8Quantizer.quantize

    def forgetful(self, model, **kwargs):
        original(self, model, **kwargs)
        config = json.loads((kwargs["output"] / "config.json").read_text())
        del config["quantization_config"]
        (kwargs["output"] / "config.json").write_text(json.dumps(config))

    monkeypatch.setattr(Int8Quantizer, "quantize", forgetful)
    with pytest.raises(ConfigError, match="quant_method = None; it must be 'int8'"):
        quantize(tiny_model("llama-gqa"), "INT8", output=tmp_path / "work" / "out")
    assert list((tmp_path / "work").iterdir()) == []


def test_output_must_be_new(installed_plugins, tiny_model, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(BadRequestError, match="exists; choose a new folder"):
        quantize(tiny_model("llama-gqa"), "INT8", output=tmp_path / "taken")


def test_a_folder_quantized_by_a_missing_quantizer_names_it(installed_plugins, tiny_model, tmp_path):
    out = quantize(tiny_model("llama-gqa"), "INT8", output=tmp_path / "int8")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotFoundError, match="quantized with 'gptq', which no installed quantizer reads"):
        LLM(out)


def test_hook_enigma_register_quantizers(installed_plugins, make_plugin_host):
    import enigma_int8

    host = make_plugin_host(enigma_int8)
    assert host.records["enigma_int8"].status == "loaded"
    assert host.select("quantizer").name == "int8"
    assert "INT8" in host.create("quantizer", "int8").types()


def test_hook_enigma_transform_model(make_plugin_host, tiny_model, monkeypatch):
    import enigma.plugins

    seen = []

    @hookimpl
    def enigma_transform_model(model, context):
        seen.append((context.architecture, next(model.parameters()).device.type, dict(context.options)))
        layer = model.model.layers[0].mlp
        layer.down_proj = torch.nn.Linear(layer.down_proj.in_features, layer.down_proj.out_features, bias=False)

    plugin = types.ModuleType("zeroing_plugin")
    plugin.enigma_transform_model = enigma_transform_model
    host = make_plugin_host(plugin)
    monkeypatch.setattr(enigma.plugins, "_host", host)
    llm = LLM(tiny_model("llama-gqa"), load_options={"adapter": "notes"})
    assert seen == [("LlamaForCausalLM", "meta", {"adapter": "notes"})]
    assert llm.loaded.model.model.layers[0].mlp.down_proj.weight.device.type == "cpu"  # loaded by name

    @hookimpl
    def enigma_transform_model(model, context):
        raise ValueError("no such layer")

    plugin = types.ModuleType("broken_transform")
    plugin.enigma_transform_model = enigma_transform_model
    monkeypatch.setattr(enigma.plugins, "_host", make_plugin_host(plugin))
    with pytest.raises(Exception, match="plugin 'broken_transform' failed to transform .*no such layer"):
        LLM(tiny_model("llama-gqa"))


def test_quantizing_streams_tensors_without_loading_the_model(installed_plugins, tiny_model, tmp_path, monkeypatch):
    import enigma.loader

    def no_load(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(enigma.loader, "load_model", no_load)
    out = quantize(tiny_model("llama-gqa"), "INT8", output=tmp_path / "int8")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
