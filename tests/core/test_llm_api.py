"""The LLM API's inputs and outputs, and the loader's errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from enigma import LLM, BadRequestError, ConfigError, NotFoundError, RequestOutput, SamplingParams


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_models import make_model

    return make_model(tmp_path_factory.mktemp("api"), "qwen2", template="chatml")


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(folder)


def test_generate_accepts_strings_lists_and_token_ids(llm):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    single = llm.generate("Hello", params)
    many = llm.generate(["Hello", "World"], params)
    ids = llm.generate([llm.tokenizer.encode("Hello")], params)
    flat_ids = llm.generate(llm.tokenizer.encode("Hello"), params)
    assert isinstance(single[0], RequestOutput) and single[0].finished
    assert len(many) == 2 and many[0].outputs[0].token_ids == single[0].outputs[0].token_ids
    assert ids[0].outputs[0].token_ids == single[0].outputs[0].token_ids == flat_ids[0].outputs[0].token_ids
    assert ids[0].prompt is None and single[0].prompt == "Hello"
    assert single[0].prompt_token_ids == llm.tokenizer.encode("Hello")
    assert single[0].outputs[0].text == llm.tokenizer.decode(single[0].outputs[0].token_ids)


def test_one_params_per_prompt(llm):
    outs = llm.generate(["a", "b"], [SamplingParams(max_tokens=2, ignore_eos=True),
                                     SamplingParams(max_tokens=4, ignore_eos=True)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 4]
    with pytest.raises(BadRequestError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()])


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "Hi"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert out.prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                          "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt, add_special_tokens=False)
    longer = [*messages, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]
    two = llm.chat([messages, longer],
                   SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(two) == 2


def test_prompt_over_the_context_is_refused(llm):
    too_long = [5] * llm.max_model_len
    with pytest.raises(BadRequestError, match=f"the prompt has {llm.max_model_len} tokens but the model's context is"):
        llm.generate([too_long])
    with pytest.raises(BadRequestError, match=r"prompt token ids must be integers in \[0, 384\); got invalid "):
        llm.generate([[10**9]])


def test_generation_stops_at_the_context_end(llm):
    prompt = [5] * (llm.max_model_len - 3)
    out = llm.generate([prompt], SamplingParams(max_tokens=None, ignore_eos=True))[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (3, "length")


def test_embed_refused_on_a_generator_and_generate_on_an_embedder(llm):
    from tiny_models import minilm_path

    with pytest.raises(BadRequestError, match="embed\\(\\) needs an embedding model"):
        llm.embed("x")
    with pytest.raises(BadRequestError, match="generate\\(\\) needs a text-generation model"):
        LLM(minilm_path()).generate("x")


@pytest.mark.parametrize("dtype,expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                            ("fp32", torch.float32)])
def test_dtype_choice(folder, dtype, expected):
    llm = LLM(folder, dtype=dtype)
    assert llm.loaded.dtype == expected
    assert llm.generate("Hi", SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids


def test_bad_dtype_and_unknown_backend(folder):
    with pytest.raises(ConfigError, match="dtype 'int3' is not supported; choose auto, float32"):
        LLM(folder, dtype="int3")
    with pytest.raises(NotFoundError, match=r"no backend named 'tpu' is installed; installed backends: "
                                            r".*torch-cpu \(from enigma-core; available\)"):
        LLM(folder, backend="tpu")


def test_sharded_checkpoint_loads_the_same(tmp_path, folder):
    from tiny_models import make_model

    sharded = make_model(tmp_path / "sharded", "qwen2", template="chatml", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert LLM(sharded).generate("Hi", params)[0].outputs[0].token_ids == \
        LLM(folder).generate("Hi", params)[0].outputs[0].token_ids


def copy_folder(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_missing_and_mismatched_tensors_are_named(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = copy_folder(folder, tmp_path)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NotFoundError, match="has no tensor 'model.layers.1.self_attn.k_proj.weight'"):
        LLM(broken)

    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"'model.norm.weight' .* has shape \[3\] but .* expects \[64\]"):
        LLM(broken)


def test_folder_errors(folder, tmp_path):
    with pytest.raises(NotFoundError, match="model 'nowhere' not found"):
        LLM("nowhere")
    broken = copy_folder(folder, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotFoundError, match=r"declares architectures \[GPTNeoXForCausalLM\], which no installed "
                                            r"model family implements; supported: BertModel, LlamaForCausalLM"):
        LLM(broken)
    config["architectures"] = ["Qwen2ForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    with pytest.raises(NotFoundError, match="pytorch_model.bin: pickle files are never loaded"):
        LLM(broken)
    (broken / "config.json").unlink()
    with pytest.raises(NotFoundError, match="is not a Hugging Face model folder: it has no config.json"):
        LLM(broken)


def test_stream_yields_deltas_that_add_up_to_generate(llm):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    whole = llm.generate("The quick brown", params)[0].outputs[0]
    deltas = list(llm.stream("The quick brown", params))
    assert "".join(d.outputs[0].text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == whole.token_ids
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])


def test_closing_a_stream_early_frees_its_blocks(llm):
    stream = llm.stream("The quick brown", SamplingParams(max_tokens=200, ignore_eos=True))
    next(stream)
    next(stream)
    stream.close()
    stats = llm.engine.stats()
    assert stats["running"] == 0 and stats["kv_blocks_used"] == 0
