"""GGUF files run in enigma: the weights stay in their blocks, the numbers are gguf's dequantized ones."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from enigma_ggml.export import write_gguf
from enigma_ggml.kernels import GGMLEmbedding, GGMLLinear, TiedGGMLHead
from enigma_ggml.names import hf_name
from safetensors.torch import save_file

from enigma import LLM, SamplingParams
from enigma.errors import BadRequestError, NotAvailableError
from enigma.llm import resolve_model_path
from enigma.loader import load_model
from enigma.testing import make_tiny_llama
from enigma.training.attention import training_context

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

gguf = pytest.importorskip("gguf")
IDS = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 84, 104, 101]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama whose rows divide into 256-value blocks (hidden 256, two layers, GQA)."""
    return make_tiny_llama(tmp_path_factory.mktemp("gguf-in") / "llama", layers=2, hidden_size=256, seed=5)


@pytest.fixture(scope="module")
def qwen2(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shapes as Qwen2 (q/k/v biases) with the head tied to the embeddings."""
    from enigma.models.llama import LlamaForCausalLM
    from enigma.saving import save_model_folder
    from enigma.training.sft import init_weights

    config = {**json.loads((llama / "config.json").read_text()), "architectures": ["Qwen2ForCausalLM"],
              "model_type": "qwen2", "tie_word_embeddings": True}
    torch.manual_seed(6)
    model = LlamaForCausalLM.from_hf_config(config)
    init_weights(model, std=0.2)
    return save_model_folder(model, config, tmp_path_factory.mktemp("gguf-in") / "qwen2", tokenizer_folder=llama)


def logits(folder: Path, ids: list[int] = IDS) -> torch.Tensor:
    model = load_model(folder, dtype="float32").model
    with torch.no_grad():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), training_context(model.num_layers, 1, len(ids)))
        return model.compute_logits(hidden)


def dequantized_folder(path: Path, original: Path, target: Path) -> Path:
    """The oracle: every tensor of the GGUF dequantized by gguf.quants, q/k rows put back, as safetensors."""
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture").contents()
    heads = reader.get_field(f"{arch}.attention.head_count").contents()
    kv_heads = reader.get_field(f"{arch}.attention.head_count_kv").contents()
    tensors = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        values = values.reshape(tuple(reversed(tensor.shape.tolist())))
        if arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            n = heads if "attn_q" in tensor.name else kv_heads
            values = values.reshape(n, values.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(values.shape)
        tensors[hf_name(tensor.name)] = torch.from_numpy(np.ascontiguousarray(values))
    target.mkdir()
    save_file(tensors, target / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target / name).write_bytes((original / name).read_bytes())
    config = json.loads((original / "config.json").read_text())
    config.pop("quantization_config", None)  # float weights now
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("file_type", ["F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"])
def test_logits_are_those_of_ggufs_dequantized_weights(arch: str, file_type: str, request, tmp_path: Path) -> None:
    original = request.getfixturevalue(arch)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(original, path, file_type)
    folder = resolve_model_path(path)
    expected = logits(dequantized_folder(path, original, tmp_path / "oracle"))
    torch.testing.assert_close(logits(folder), expected, atol=2e-4, rtol=1e-4)


TINY_TEXT = "The os.path module implements some useful functions on pathnames. To read or write files see open()."
RELATIVE_ERROR = {"F32": 1e-6, "F16": 5e-4, "Q8_0": 5e-3, "Q6_K": 0.015, "Q5_K_M": 0.02, "Q4_K_M": 0.03}
"""The stated tolerance: ||logits - fp32 logits|| / ||fp32 logits|| on enigma-tiny (measured: 0, 1.0e-4, 2.3e-3,
7.5e-3, 1.0e-2, 1.5e-2)."""


@pytest.mark.parametrize("file_type", list(RELATIVE_ERROR))
def test_enigma_tiny_logits_within_the_types_error(file_type: str, tmp_path: Path) -> None:
    from enigma.tokenizer import Tokenizer

    tiny = resolve_model_path("enigma-tiny")
    write_gguf(tiny, tmp_path / "tiny.gguf", file_type)
    ids = Tokenizer(tiny).encode(TINY_TEXT)
    ours, reference = logits(resolve_model_path(tmp_path / "tiny.gguf"), ids), logits(tiny, ids)
    assert ((ours - reference).norm() / reference.norm()).item() < RELATIVE_ERROR[file_type]


def test_weights_stay_in_their_blocks(llama: Path, tmp_path: Path) -> None:
    write_gguf(llama, tmp_path / "q4.gguf", "Q4_K_M")
    loaded = load_model(resolve_model_path(tmp_path / "q4.gguf"))
    model = loaded.model
    assert isinstance(model.model.embed_tokens, GGMLEmbedding) and model.model.embed_tokens.type_name == "Q4_K"
    assert isinstance(model.lm_head, GGMLLinear) and model.lm_head.type_name == "Q6_K"
    kinds = {m.type_name for m in model.modules() if isinstance(m, GGMLLinear)}
    assert kinds == {"Q4_K", "Q6_K"}
    packed = sum(b.nbytes for b in model.buffers() if b.dtype == torch.uint8)
    floats = sum(p.nbytes for p in model.parameters())
    file_size = (tmp_path / "q4.gguf").stat().st_size
    assert packed + floats <= file_size and packed > 0.95 * (file_size - 64 * 1024)
    assert loaded.quantization == "Q4_K_M"


def test_a_tied_head_reads_the_embeddings_bytes(qwen2: Path, tmp_path: Path) -> None:
    write_gguf(qwen2, tmp_path / "tied.gguf", "Q8_0")
    reader = gguf.GGUFReader(str(tmp_path / "tied.gguf"))
    assert "output.weight" not in {t.name for t in reader.tensors}
    model = load_model(resolve_model_path(tmp_path / "tied.gguf")).model
    assert isinstance(model.lm_head, TiedGGMLHead) and model.lm_head.embedding is model.model.embed_tokens


def test_llm_generates_from_a_gguf_path(tmp_path: Path) -> None:
    tiny = resolve_model_path("enigma-tiny")
    write_gguf(tiny, tmp_path / "tiny-q8.gguf", "Q8_0")
    params = SamplingParams(max_tokens=16, temperature=0)
    expected = LLM(tiny).generate(["The history of"], params)[0].outputs[0].token_ids
    llm = LLM(str(tmp_path / "tiny-q8.gguf"))
    assert llm.generate(["The history of"], params)[0].outputs[0].token_ids == expected  # Q8_0 keeps greedy text
    assert llm.tokenizer.chat_template and llm.tokenizer.eos_token_ids
    attention, mlp = llm.loaded.model.model.layers[0].self_attn, llm.loaded.model.model.layers[0].mlp
    assert isinstance(attention.qkv_proj, GGMLLinear) and isinstance(mlp.gate_up_proj, GGMLLinear)  # one call
    assert attention.k_proj.qweight.data_ptr() == attention.qkv_proj.qweight[attention.q_proj.out_features:].data_ptr()
    first = resolve_model_path(tmp_path / "tiny-q8.gguf")
    assert resolve_model_path(tmp_path / "tiny-q8.gguf") == first  # imported once, then reused
    assert (first / "model.gguf").resolve() == (tmp_path / "tiny-q8.gguf").resolve()  # linked, not copied


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gguf") / "Enigma-Tiny.Q4_K_M.gguf"
    write_gguf(resolve_model_path("enigma-tiny"), path, "Q4_K_M")
    return path


def test_pull_run_and_create_from_a_gguf_file(enigma, tiny_q4: Path, tmp_path: Path) -> None:
    pulled = enigma("pull", str(tiny_q4))
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith("pulled enigma-tiny.q4_k_m:latest")
    shown = json.loads(enigma("show", "enigma-tiny.q4_k_m", "--json").stdout)
    assert shown["quantization"] == "Q4_K_M" and shown["architecture"] == "LlamaForCausalLM"
    assert shown["parameters"] > 5_000_000
    files = {entry["path"] for entry in shown["files"]}
    assert {"model.gguf", "config.json", "tokenizer.json", "chat_template.jinja"} <= files
    from enigma.store import Store

    stored = Store().path("enigma-tiny.q4_k_m") / "model.gguf"
    assert not stored.is_symlink() and stored.stat().st_size == tiny_q4.stat().st_size
    answer = enigma("run", "enigma-tiny.q4_k_m", "The history of", "--max-tokens", "8", "--temperature", "0",
                    "--local")
    assert answer.returncode == 0, answer.stderr
    assert len(answer.stdout.strip()) > 10
    direct = enigma("run", str(tiny_q4), "The history of", "--max-tokens", "8", "--temperature", "0", "--local")
    assert direct.returncode == 0 and direct.stdout == answer.stdout

    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM ./{tiny_q4.name}\nSYSTEM You answer briefly.\nPARAMETER temperature 0\n")
    (tmp_path / tiny_q4.name).symlink_to(tiny_q4)
    created = enigma("create", "brief", "-f", str(modelfile))
    assert created.returncode == 0, created.stderr
    shown = json.loads(enigma("show", "brief", "--json").stdout)
    assert shown["system"] == "You answer briefly." and shown["quantization"] == "Q4_K_M"


def test_serve_a_gguf_to_the_openai_client(enigma, enigma_home: Path, tiny_q4: Path) -> None:
    import os

    import openai
    from serving import launch, stop

    assert enigma("pull", str(tiny_q4), "--name", "tiny-q4").returncode == 0
    process, base = launch({**os.environ, "ENIGMA_HOME": str(enigma_home)}, "tiny-q4",
                           log_path=enigma_home / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        reply = client.chat.completions.create(model="tiny-q4", max_tokens=12, temperature=0,
                                               messages=[{"role": "user", "content": "What does os.path.join do?"}])
        assert reply.choices[0].message.content.strip()
        assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5
    finally:
        stop(process)


def test_llama3_rope_rescaling_travels_as_rope_freqs(tmp_path: Path) -> None:
    from enigma.models.llama import LlamaForCausalLM
    from enigma.saving import save_model_folder
    from enigma.training.sft import init_weights

    base = make_tiny_llama(tmp_path / "base", hidden_size=256)
    config = {**json.loads((base / "config.json").read_text()), "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}
    torch.manual_seed(1)
    model = LlamaForCausalLM.from_hf_config(config)
    init_weights(model, std=0.2)
    folder = save_model_folder(model, config, tmp_path / "llama3", tokenizer_folder=base)
    write_gguf(folder, tmp_path / "llama3.gguf", "F32")
    reader = gguf.GGUFReader(str(tmp_path / "llama3.gguf"))
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    assert factors.shape == (32,) and factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)
    imported = resolve_model_path(tmp_path / "llama3.gguf")
    assert json.loads((imported / "config.json").read_text())["rope_scaling"]["rope_type"] == "freq_factors"
    long_ids = IDS * 8  # past the original 64 positions, where the rescaling matters
    torch.testing.assert_close(logits(imported, long_ids), logits(folder, long_ids), atol=1e-4, rtol=1e-4)


def test_pull_one_file_of_a_hub_repository(enigma, tiny_q4: Path, tmp_path: Path) -> None:
    from hub_server import FakeHub

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "enigma-tiny.Q4_K_M.gguf").write_bytes(tiny_q4.read_bytes())
    (repo / "enigma-tiny.Q8_0.gguf").write_bytes(b"GGUF not really")
    (repo / "README.md").write_text("GGUF files of enigma-tiny\n")
    with FakeHub() as hub:
        hub.add_repo("acme/tiny-GGUF", repo)
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        whole = enigma("pull", "hf:acme/tiny-GGUF", env=env)
        assert whole.returncode == 1 and "--file enigma-tiny.Q4_K_M.gguf" in whole.stderr
        missing = enigma("pull", "hf:acme/tiny-GGUF", "--file", "nope.gguf", env=env)
        assert missing.returncode == 1 and "enigma-tiny.Q8_0.gguf" in missing.stderr
        pulled = enigma("pull", "hf:acme/tiny-GGUF", "--file", "enigma-tiny.Q4_K_M.gguf", "--name", "tq", env=env)
        assert pulled.returncode == 0, pulled.stderr
    listed = json.loads(enigma("list", "--json").stdout)
    assert [(m["name"], m["quantization"]) for m in listed] == [("tq:latest", "Q4_K_M")]
    assert listed[0]["source"].startswith("hf-file:acme/tiny-GGUF@") and listed[0]["source"].endswith(
        ":enigma-tiny.Q4_K_M.gguf")


# ---------------------------------------------------------------- bad files


TOP = {"token_embd.weight": (4, 8), "output_norm.weight": (8,), "output.weight": (4, 8)}
LAYER = {"blk.0.attn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (8, 8),
         "blk.0.attn_v.weight": (8, 8), "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_norm.weight": (8,),
         "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}


def write_file(path: Path, arch: str = "llama", *, shapes: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A small GGUF with the given tensors (F32 zeros), written through gguf's writer."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {"embedding_length": 8, "block_count": 1, "feed_forward_length": 16,
                       "attention.head_count": 2, "attention.head_count_kv": 2}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(["a", "b", "c", "d"])
    writer.add_token_merges([])
    for name, shape in {**LAYER, **(shapes or TOP)}.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_files_are_refused_by_name_and_nothing_is_stored(enigma, tmp_path: Path) -> None:
    good = write_file(tmp_path / "good.gguf")
    assert LLM(str(good)).tokenizer.vocab_size == 4  # the minimal file itself loads

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(BadRequestError, match=r"truncated.gguf is truncated"):
        resolve_model_path(truncated)
    wrong_magic = tmp_path / "magic.gguf"
    wrong_magic.write_bytes(b"GGML" + good.read_bytes()[4:])
    with pytest.raises(BadRequestError, match=r"magic.gguf is not a GGUF file \(it starts with b'GGML'"):
        resolve_model_path(wrong_magic)
    unknown = tmp_path / "unknown-type.gguf"
    data = bytearray(good.read_bytes())
    name = b"blk.0.ffn_down.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # after the name: n_dims (u32), two dims (u64), then the type
    data[at:at + 4] = (99).to_bytes(4, "little")
    unknown.write_bytes(bytes(data))
    with pytest.raises(BadRequestError, match=r"unknown-type.gguf: tensor .blk.0.ffn_down.weight. has ggml type 99, "):
        resolve_model_path(unknown)
    with pytest.raises(NotAvailableError, match=r"gpt2.gguf: architecture 'gpt2' is not supported"):
        resolve_model_path(write_file(tmp_path / "gpt2.gguf", "gpt2"))
    shapes = {**TOP, "output.weight": (5, 8)}
    with pytest.raises(BadRequestError, match=r"shape.gguf: tensor output.weight has shape \[5, 8\] but the "
                                              r"metadata \(llama.\*\) implies \[4, 8\]"):
        resolve_model_path(write_file(tmp_path / "shape.gguf", shapes=shapes))
    for bad in ("truncated.gguf", "magic.gguf", "unknown-type.gguf", "gpt2.gguf", "shape.gguf"):
        result = enigma("pull", str(tmp_path / bad))
        assert result.returncode == 1 and bad in result.stderr
    assert json.loads(enigma("list", "--json").stdout) == []
