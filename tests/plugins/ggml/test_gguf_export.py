"""GGUF files written by enigma: what gguf's reader finds in them, llama.cpp's type mix, `enigma quantize`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from enigma_ggml.export import write_gguf
from enigma_ggml.names import gguf_name, permute_for_rope
from enigma_ggml.quants import dequantize
from enigma_ggml.recipe import TensorInfo, tensor_types, use_more_bits
from safetensors.torch import load_file

from enigma.errors import BadRequestError, NotAvailableError
from enigma.testing import make_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama whose rows divide into 256-value blocks (hidden 256, two layers, GQA)."""
    return make_tiny_llama(tmp_path_factory.mktemp("gguf") / "model", layers=2, hidden_size=256)


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("file_type", ["F32", "Q8_0", "Q4_K_M"])
def test_what_the_reader_finds(file_type: str, folder: Path, tmp_path: Path) -> None:
    types = write_gguf(folder, tmp_path / "m.gguf", file_type, name="tiny")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    config = json.loads((folder / "config.json").read_text())
    assert field("general.architecture") == "llama" and field("general.name") == "tiny"
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 256
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("llama.context_length") == config["max_position_embeddings"]
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field("general.file_type") == {"F32": 0, "Q8_0": 7, "Q4_K_M": 15}[file_type]
    assert field("tokenizer.ggml.model") == "gpt2" and len(field("tokenizer.ggml.tokens")) == 258
    assert field("tokenizer.ggml.eos_token_id") == 257 and field("tokenizer.ggml.bos_token_id") == 256
    weights = {k: v.float().numpy() for k, v in load_file(folder / "model.safetensors").items()}
    hf_names = {gguf_name(name): name for name in weights}
    assert {t.name for t in reader.tensors} == set(hf_names)
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        assert kind == types[tensor.name]
        values = dequantize(np.asarray(tensor.data), kind) if kind not in ("F32", "F16") else np.asarray(tensor.data)
        values = values.reshape(weights[hf_names[tensor.name]].shape)
        if ".attn_q." in tensor.name or ".attn_k." in tensor.name:
            values = unpermute(values, 4 if ".attn_q." in tensor.name else 2)
        original = weights[hf_names[tensor.name]]
        if kind == "F32":
            assert np.array_equal(values, original), tensor.name
        else:
            error = np.sqrt(((values - original) ** 2).mean() / (original ** 2).mean())
            assert error < {"Q8_0": 0.01, "Q4_K": 0.12, "Q6_K": 0.03}[kind], (tensor.name, error)


def test_permutation_is_llama_cpps() -> None:
    """One head of 8 rows: HF's rotate-half order becomes adjacent pairs [0, 4, 1, 5, 2, 6, 3, 7]."""
    rows = np.arange(8, dtype=np.float32)[:, None]
    assert permute_for_rope(rows, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    weight = np.random.default_rng(0).standard_normal((32, 5)).astype(np.float32)
    assert np.array_equal(unpermute(permute_for_rope(weight, 4), 4), weight)


def layers(count: int, hidden: int = 4096, tied: bool = False) -> list[TensorInfo]:
    tensors = [TensorInfo("token_embd.weight", (32000, hidden))]
    for i in range(count):
        tensors += [TensorInfo(f"blk.{i}.attn_norm.weight", (hidden,)),
                    TensorInfo(f"blk.{i}.attn_q.weight", (hidden, hidden)),
                    TensorInfo(f"blk.{i}.attn_v.weight", (hidden // 4, hidden)),
                    TensorInfo(f"blk.{i}.ffn_down.weight", (hidden, hidden * 3))]
    tensors.append(TensorInfo("output_norm.weight", (hidden,)))
    if not tied:
        tensors.append(TensorInfo("output.weight", (32000, hidden)))
    return tensors


def test_the_type_mix_is_llama_cpps() -> None:
    more = [i for i in range(32) if use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # llama.cpp's, for 32 layers
    mix = tensor_types("Q4_K_M", layers(32), tied_embeddings=False)
    assert [i for i in range(32) if mix[f"blk.{i}.attn_v.weight"] == "Q6_K"] == more
    assert [i for i in range(32) if mix[f"blk.{i}.ffn_down.weight"] == "Q6_K"] == more
    assert mix["output.weight"] == "Q6_K" and mix["token_embd.weight"] == "Q4_K"
    assert mix["blk.5.attn_q.weight"] == "Q4_K" and mix["blk.5.attn_norm.weight"] == "F32"
    small = tensor_types("Q4_K_S", layers(32), tied_embeddings=True)
    assert [i for i in range(32) if small[f"blk.{i}.attn_v.weight"] == "Q5_K"] == [0, 1, 2, 3]
    assert [i for i in range(32) if small[f"blk.{i}.ffn_down.weight"] == "Q5_K"] == [0, 1, 2, 3]
    assert small["token_embd.weight"] == "Q6_K"  # tied: the embedding is the head
    assert set(tensor_types("Q5_K_S", layers(4), tied_embeddings=False).values()) == {"Q5_K", "Q6_K", "F32"}
    assert tensor_types("Q8_0", layers(4), tied_embeddings=False)["output.weight"] == "Q8_0"
    narrow = tensor_types("Q4_K_M", layers(2, hidden=96), tied_embeddings=False)  # rows of 96: no 256-blocks
    assert narrow["blk.0.attn_q.weight"] == "Q5_0" and narrow["output.weight"] == "Q8_0"
    assert narrow["blk.1.attn_v.weight"] == "Q8_0"  # Q6_K falls back to Q8_0


def test_unsupported_inputs_are_named(folder: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_tiny_llama(other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(NotAvailableError, match=r"architecture \['GPT2LMHeadModel'\] cannot be written as GGUF"):
        write_gguf(other, tmp_path / "x.gguf", "Q8_0")
    with pytest.raises(BadRequestError, match="unknown GGUF file type 'Q4_K_X'"):
        write_gguf(folder, tmp_path / "x.gguf", "Q4_K_X")


def test_enigma_quantize_writes_a_gguf_into_the_store(enigma, folder: Path) -> None:
    done = enigma("quantize", str(folder), "--bits", "4", "--name", "tiny:q4")
    assert done.returncode == 0, done.stderr
    listed = enigma("list").stdout
    assert "tiny:q4" in listed and "Q4_K_M" in listed
    shown = json.loads(enigma("show", "tiny:q4", "--json").stdout)
    files = {entry["path"]: entry for entry in shown["files"]}
    assert "model.gguf" in files and len(files["model.gguf"]["sha256"]) == 64
    from enigma.store import Store

    gguf_file = Store().path("tiny:q4") / "model.gguf"
    assert gguf.GGUFReader(str(gguf_file)).get_field("general.file_type").contents() == 15
    run = enigma("run", "tiny:q4", "Hello", "--local", "--max-tokens", "4")
    assert run.returncode == 0 and run.stdout, run.stderr  # random weights: any text
    wrong = enigma("quantize", str(folder), "--type", "Q4_K_X")
    assert wrong.returncode == 1 and "Q4_K_M (ggml)" in wrong.stderr


def test_bits_per_weight(folder: Path, tmp_path: Path) -> None:
    sizes = {}
    for file_type in ("F32", "Q8_0", "Q6_K", "Q4_K_M"):
        write_gguf(folder, tmp_path / f"{file_type}.gguf", file_type)
        sizes[file_type] = (tmp_path / f"{file_type}.gguf").stat().st_size
    assert sizes["F32"] > sizes["Q8_0"] > sizes["Q6_K"] > sizes["Q4_K_M"]
    parameters = sum(t.numel() for t in load_file(folder / "model.safetensors").values())
    assert sizes["F32"] == pytest.approx(parameters * 4, rel=0.1)


def test_the_seeds_python_call(folder: Path, tmp_path: Path) -> None:
    from enigma_ggml import ggml_quantize

    from enigma.loader import load_model

    loaded = load_model(folder, dtype="float32")
    path = ggml_quantize(loaded.model, quant_type="Q6_K", output=tmp_path / "out" / "tiny.gguf",
                         hf_config=loaded.hf_config, tokenizer_folder=folder)
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.file_type").contents() == 18
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]  # nothing else left behind


def test_requantizing_a_gguf_into_one_file(enigma, folder: Path, tmp_path: Path) -> None:
    f32 = tmp_path / "m-f32.gguf"
    write_gguf(folder, f32, "F32")
    done = enigma("quantize", str(f32), "--type", "Q4_K_M", "--output", str(tmp_path / "m-q4.gguf"))
    assert done.returncode == 0, done.stderr
    assert "compounds" not in done.stderr  # F32 in, nothing lost
    write_gguf(folder, tmp_path / "direct.gguf", "Q4_K_M")
    again, direct = gguf.GGUFReader(str(tmp_path / "m-q4.gguf")), gguf.GGUFReader(str(tmp_path / "direct.gguf"))
    assert [(t.name, t.tensor_type) for t in again.tensors] == [(t.name, t.tensor_type) for t in direct.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(again.tensors, direct.tensors))  # the same bytes
    assert {k: again.get_field(k).contents() for k in again.fields if not k.startswith("GGUF.")} == {
        k: direct.get_field(k).contents() for k in direct.fields if not k.startswith("GGUF.")}
    assert sorted(p.name for p in tmp_path.glob("*gguf*")) == ["direct.gguf", "m-f32.gguf", "m-q4.gguf"]

    lossy = enigma("quantize", str(tmp_path / "m-q4.gguf"), "--type", "Q8_0", "--name", "m:q8")
    assert lossy.returncode == 0 and "compounds the error" in lossy.stderr
    assert "Q8_0" in enigma("list").stdout
    taken = enigma("quantize", str(f32), "--type", "Q6_K", "--output", str(tmp_path / "m-q4.gguf"))
    assert taken.returncode == 1 and "exists" in taken.stderr
