"""llama.cpp itself as the oracle: it loads enigma's GGUF files, tokenizes as enigma does, generates the same
greedy tokens, and its own quantizer picks the same types and writes the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from enigma_ggml.export import write_gguf
from enigma_ggml.tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

from enigma import LLM, SamplingParams
from enigma.llm import resolve_model_path
from enigma.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

CORPUS = [
    "The os.path module implements some useful functions on pathnames. To read or write files see open().",
    "def join(a, *p):\n    \"\"\"Join two or more pathname components.\"\"\"\n    return a + '/' + '/'.join(p)\n",
    "Version 3.12.4 added 1234567 items; isn't it 42?  We'll see...  (maybe) [x] {y} <z> $HOME ~user |pipe|",
    "Ünïcödé text, émoji 🤖, 中文字符 and tabs\tand\nnew lines\r\n   indented",
    "   leading spaces, trailing spaces   ",
    "x=1;y=2;print(x+y)#!@%^&*",
]


def llama_with_tokenizer(folder: Path, tokenizer_json: dict, *, layers: int = 2, hidden: int = 256,
                         intermediate: int = 512, seed: int = 0) -> Path:
    """A random Llama (GQA) whose vocabulary is ``tokenizer_json``'s, saved as an HF folder."""
    from enigma.models.llama import LlamaForCausalLM
    from enigma.saving import save_model_folder
    from enigma.training.sft import init_weights

    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    vocab = len(tokenizer_json["model"]["vocab"]) + sum(
        1 for t in tokenizer_json.get("added_tokens", []) if t["content"] not in tokenizer_json["model"]["vocab"])
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_hf_config(config)
    init_weights(model, std=0.05)
    return save_model_folder(model, config, folder, tokenizer_folder=folder)


def llama_cpp_model(llama_cpp, path: Path, **options):
    """llama.cpp on ``path`` with an F32 KV cache (its default F16 one rounds K and V, which flips near-ties of
    random models' logits; enigma keeps the model's dtype)."""
    f32 = 0  # GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, seed=0, type_k=f32,
                           type_v=f32, **options)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return resolve_model_path("enigma-tiny")


@pytest.mark.parametrize("file_type", ["F32", "Q8_0"])
def test_llama_cpp_generates_enigmas_greedy_tokens(llama_cpp, tiny: Path, file_type: str, tmp_path: Path) -> None:
    path = tmp_path / f"tiny-{file_type}.gguf"
    write_gguf(tiny, path, file_type)
    theirs = llama_cpp_model(llama_cpp, path)
    ours = LLM(str(path))
    params = SamplingParams(max_tokens=32, min_tokens=32, temperature=0)
    for prompt in CORPUS[:3]:
        ids = ours.tokenizer.encode(prompt, add_special_tokens=False)
        expected = []
        for token in theirs.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
            expected.append(token)
            if len(expected) == 32:
                break
        assert ours.generate([ids], params)[0].outputs[0].token_ids == expected, prompt
        if file_type == "F32":  # and the original folder agrees too
            assert LLM(tiny).generate([ids], params)[0].outputs[0].token_ids == expected


def _variant(tiny: Path, pre: str) -> dict:
    """enigma-tiny's vocabulary and merges behind one of the pre-tokenizers llama.cpp names."""
    data = json.loads((tiny / "tokenizer.json").read_text(encoding="utf-8"))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    split = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}.get(pre)
    if split is not None:
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False}, byte_level]}
        data["model"]["ignore_merges"] = pre == "llama-bpe"  # as Llama 3's tokenizer.json has it
    elif pre == "smollm":
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, {**byte_level, "use_regex": True}]}
    return data


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "smollm"])
def test_llama_cpp_tokenizes_byte_level_vocabularies_as_enigma(llama_cpp, tiny: Path, pre: str,
                                                               tmp_path: Path) -> None:
    folder = tiny if pre == "gpt-2" else llama_with_tokenizer(tmp_path / "m", _variant(tiny, pre))
    write_gguf(folder, tmp_path / "m.gguf", "F32")
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).get_field("tokenizer.ggml.pre").contents() == pre
    theirs = llama_cpp_model(llama_cpp, tmp_path / "m.gguf", vocab_only=True)
    original, rebuilt = Tokenizer(folder), LLM(str(tmp_path / "m.gguf"), num_kv_blocks=4).tokenizer
    for text in [*CORPUS, "\n".join(CORPUS)]:
        expected = original.encode(text, add_special_tokens=False)
        assert theirs.tokenize(text.encode(), add_bos=False, special=False) == expected, text
        assert rebuilt.encode(text, add_special_tokens=False) == expected, text
    special = "<|im_start|>user\nHello<|im_end|>\n"
    assert theirs.tokenize(special.encode(), add_bos=False, special=True) == original.encode(
        special, add_special_tokens=False)


def test_llama_cpp_tokenizes_a_sentencepiece_vocabulary_as_enigma(llama_cpp, tmp_path: Path) -> None:
    from test_tokenizer import spm_folder

    tokenizer = json.loads((spm_folder(tmp_path / "spm") / "tokenizer.json").read_text(encoding="utf-8"))
    folder = llama_with_tokenizer(tmp_path / "m", tokenizer, hidden=64, intermediate=128)
    shutil.copy(tmp_path / "spm" / "tokenizer_config.json", folder / "tokenizer_config.json")
    write_gguf(folder, tmp_path / "m.gguf", "F32")
    theirs = llama_cpp_model(llama_cpp, tmp_path / "m.gguf", vocab_only=True)
    original, rebuilt = Tokenizer(folder), LLM(str(tmp_path / "m.gguf"), num_kv_blocks=4).tokenizer
    for text in CORPUS:
        expected = original.encode(text, add_special_tokens=False)
        assert theirs.tokenize(text.encode(), add_bos=False, special=False) == expected, text
        assert rebuilt.encode(text, add_special_tokens=False) == expected, text
    assert rebuilt.encode("hi")[0] == rebuilt.bos_token_id == 1  # add_bos, as llama.cpp does for SPM


@pytest.fixture(scope="module")
def twelve_layers(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-layer model (enigma-tiny's vocabulary), so use_more_bits picks layers in the middle too."""
    tokenizer = json.loads((tiny / "tokenizer.json").read_text(encoding="utf-8"))
    return llama_with_tokenizer(tmp_path_factory.mktemp("twelve") / "m", tokenizer, layers=12, seed=3)


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("model", ["enigma-tiny", "twelve-layers"])
def test_llama_cpps_quantizer_picks_the_same_types_and_writes_the_same_bytes(
        llama_cpp, model: str, file_type: str, tiny: Path, twelve_layers: Path, tmp_path: Path) -> None:
    folder = tiny if model == "enigma-tiny" else twelve_layers
    write_gguf(folder, tmp_path / "f32.gguf", "F32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(),
                                          str(tmp_path / "theirs.gguf").encode(), params) == 0
    write_gguf(folder, tmp_path / "ours.gguf", file_type)
    theirs = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "theirs.gguf")).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "ours.gguf")).tensors}
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    for name, tensor in ours.items():
        mine, llama_cpps = np.asarray(tensor.data).view(np.uint8), np.asarray(theirs[name].data).view(np.uint8)
        assert np.array_equal(mine, llama_cpps), name


def test_files_with_llama_cpps_default_pre_tokenizer(llama_cpp, tiny: Path, tmp_path: Path) -> None:
    """Files made by others may name ``default``: llama.cpp's own split (punctuation runs first), not GPT-2's."""
    write_gguf(tiny, tmp_path / "gpt2.gguf", "F32")
    source = gguf.GGUFReader(str(tmp_path / "gpt2.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "default.gguf"), "llama")
    for field in source.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "tokenizer.ggml.pre"):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    writer.add_tokenizer_pre("default")
    for tensor in source.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    theirs = llama_cpp_model(llama_cpp, tmp_path / "default.gguf", vocab_only=True)
    rebuilt = LLM(str(tmp_path / "default.gguf"), num_kv_blocks=4).tokenizer
    gpt2 = Tokenizer(tiny)
    differs = False
    for text in [*CORPUS, "\n".join(CORPUS)]:
        ids = rebuilt.encode(text, add_special_tokens=False)
        assert theirs.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        differs |= ids != gpt2.encode(text, add_special_tokens=False)
    assert differs  # the corpus tells the two splits apart


@pytest.fixture(scope="module")
def sentencepiece_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-2-style HF folder: a SentencePiece BPE ``tokenizer.model`` (byte fallback) trained here, and
    random weights, the input llama.cpp's converter takes for Llama 2, Mistral and TinyLlama."""
    spm = pytest.importorskip("sentencepiece")
    from enigma.models.llama import LlamaForCausalLM
    from enigma.saving import save_model_folder
    from enigma.training.sft import init_weights

    folder = tmp_path_factory.mktemp("spm-llama") / "model"
    folder.mkdir()
    corpus = folder.parent / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 4 + [(Path(__file__).parent / "test_gguf_loading.py").read_text()]))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=700, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 700, "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                               "eos_token": "</s>", "unk_token": "<unk>"}))
    torch.manual_seed(4)
    model = LlamaForCausalLM.from_hf_config(config)
    init_weights(model, std=0.1)
    return save_model_folder(model, config, folder)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_files_llama_cpps_converter_made_run_in_enigma(llama_cpp, convert_hf_to_gguf: Path, sentencepiece_llama: Path,
                                                       outtype: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / f"converted-{outtype}.gguf"
    subprocess.run([sys.executable, str(convert_hf_to_gguf), str(sentencepiece_llama), "--outtype", outtype,
                    "--outfile", str(path)], check=True, capture_output=True, timeout=600)
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("tokenizer.ggml.model").contents() == "llama"  # SentencePiece, with its scores
    theirs = llama_cpp_model(llama_cpp, path)
    ours = LLM(str(path))
    for text in CORPUS:
        assert ours.tokenizer.encode(text, add_special_tokens=False) == theirs.tokenize(
            text.encode(), add_bos=False, special=False), text
    ids = ours.tokenizer.encode(CORPUS[0])
    assert ids[0] == 1 and ids == theirs.tokenize(CORPUS[0].encode())  # <s> first, as llama.cpp adds it
    from test_gguf_loading import dequantized_folder, logits

    folder = resolve_model_path(path)
    if outtype == "q8_0":  # llama.cpp quantizes activations for Q8_0 matmuls, so its greedy tokens are its own;
        expected = logits(dequantized_folder(path, folder, tmp_path / "oracle"), ids)  # the weights are gguf's
        torch.testing.assert_close(logits(folder, ids), expected, atol=2e-4, rtol=1e-4)
        return
    expected = []
    for token in theirs.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
        expected.append(token)
        if len(expected) == 32:
            break
    params = SamplingParams(max_tokens=32, min_tokens=32, temperature=0)
    assert ours.generate([ids], params)[0].outputs[0].token_ids == expected
    torch.testing.assert_close(logits(folder, ids), logits(sentencepiece_llama, ids), atol=1e-4, rtol=1e-4)


def test_llama_cpp_runs_enigmas_qwen2_files(llama_cpp, tiny: Path, tmp_path: Path) -> None:
    """Architecture qwen2 (q/k/v biases, no q/k permutation, a tied head) both ways."""
    from enigma.models.llama import LlamaForCausalLM
    from enigma.saving import save_model_folder
    from enigma.training.sft import init_weights

    folder = llama_with_tokenizer(tmp_path / "llama", json.loads((tiny / "tokenizer.json").read_text()))
    config = {**json.loads((folder / "config.json").read_text()), "architectures": ["Qwen2ForCausalLM"],
              "model_type": "qwen2", "tie_word_embeddings": True}
    torch.manual_seed(7)
    model = LlamaForCausalLM.from_hf_config(config)
    init_weights(model, std=0.1)
    qwen2 = save_model_folder(model, config, tmp_path / "qwen2", tokenizer_folder=folder)
    write_gguf(qwen2, tmp_path / "qwen2.gguf", "F32")
    assert gguf.GGUFReader(str(tmp_path / "qwen2.gguf")).get_field("general.architecture").contents() == "qwen2"
    theirs = llama_cpp_model(llama_cpp, tmp_path / "qwen2.gguf")
    ours = LLM(str(tmp_path / "qwen2.gguf"))
    ids = ours.tokenizer.encode(CORPUS[1], add_special_tokens=False)
    expected = []
    for token in theirs.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
        expected.append(token)
        if len(expected) == 32:
            break
    params = SamplingParams(max_tokens=32, min_tokens=32, temperature=0, ignore_eos=True)
    assert ours.generate([ids], params)[0].outputs[0].token_ids == expected
    assert LLM(qwen2).generate([ids], params)[0].outputs[0].token_ids == expected
