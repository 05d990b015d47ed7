"""EXL2 conversion end to end on enigma-tiny: the target bpw is met, the choices are recorded, the model runs in
enigma as its reference-dequantized weights do, and bad input is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from enigma_exl2.layout import TENSOR_SUFFIXES, reference_dequantize
from safetensors import safe_open
from safetensors.torch import save_file

from enigma import LLM
from enigma.errors import BadRequestError, NotAvailableError, NotFoundError
from enigma.llm import resolve_model_path
from enigma.loader import load_model
from enigma.quantize import quantize
from enigma.sampling import SamplingParams
from enigma.tokenizer import Tokenizer
from enigma.training.attention import training_context

SMALL = {"calibration_rows": 8, "calibration_length": 256}
"""A calibration small enough for CI (2048 tokens of the default text)."""
TEXT = ("Python is an easy to learn, powerful programming language. It has efficient high-level data structures and "
        "a simple but effective approach to object-oriented programming.")


@pytest.fixture(scope="module")
def tiny() -> Path:
    return resolve_model_path("enigma-tiny")


@pytest.fixture(scope="module")
def exl2_4(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """enigma-tiny at 4.0 bpw (measured from scratch: the slow part, ~40 s here)."""
    out = tmp_path_factory.mktemp("exl2") / "tiny-4.0"
    work = tmp_path_factory.mktemp("exl2-work")
    return quantize(tiny, "EXL2", output=out, options={"bpw": 4.0, "work_dir": str(work), **SMALL})


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def exl2_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "output.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def logits(folder: Path, ids: list[int]) -> torch.Tensor:
    model = load_model(folder, dtype="float32").model
    with torch.no_grad():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), training_context(model.num_layers, 1, len(ids)))
        return model.compute_logits(hidden)


def dequantized_folder(folder: Path, tiny: Path, target: Path) -> Path:
    """The oracle: the EXL2 folder's every Linear dequantized by the reference (numpy) reader, as safetensors."""
    hf = config(tiny)
    tensors = exl2_tensors(folder)
    shapes = {name: tuple(t.shape) for name, t in load_model(tiny).model.state_dict().items()}
    dense = {}
    for name in {key.rsplit(".", 1)[0] for key in tensors if key.endswith(".q_weight")}:
        out_features, in_features = shapes[f"{name}.weight"]
        parts = {suffix: tensors[f"{name}.{suffix}"].numpy() for suffix in TENSOR_SUFFIXES}
        dense[f"{name}.weight"] = torch.from_numpy(reference_dequantize(parts, in_features, out_features))
    dense.update({k: v.float() for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in TENSOR_SUFFIXES})
    target.mkdir()
    save_file(dense, target / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target / name).write_bytes((tiny / name).read_bytes())
    (target / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": False}))
    return target


@pytest.mark.slow
def test_target_bpw_is_met_and_the_choices_are_recorded(exl2_4: Path, tiny: Path, tmp_path: Path) -> None:
    quantization = config(exl2_4)["quantization_config"]
    assert quantization["quant_method"] == "exl2" and quantization["bits"] == 4.0
    assert abs(quantization["achieved_bpw"] - 4.0) <= 0.05
    assert quantization["calibration"] == {"rows": 8, "length": 256, "dataset": "python-docs-tutorial"}
    strategy = quantization["strategy"]
    assert len(strategy) == 6 and all(set(layer) == {"attention", "mlp"} for layer in strategy)
    assert all(set(layer["mlp"]["recipe"]) == {"gate_proj", "up_proj", "down_proj"} for layer in strategy)

    # the bits of the written tensors, counted from the file, are the achieved figure
    tensors = exl2_tensors(exl2_4)
    decoder = [k for k in tensors if k.startswith("model.layers.") and k.rsplit(".", 1)[-1] in TENSOR_SUFFIXES]
    numel = sum(p.numel() for n, p in load_model(tiny).model.named_parameters()
                if n.startswith("model.layers.") and n.endswith("proj.weight"))
    bits = sum(tensors[k].numel() * tensors[k].element_size() * 8 for k in decoder)
    assert bits / numel == pytest.approx(quantization["achieved_bpw"], abs=1e-3)
    assert "lm_head.q_weight" in tensors and tensors["model.embed_tokens.weight"].dtype == torch.float16

    # the measurement ships with the model and serves other targets without measuring again
    measurement = exl2_4 / "measurement.json"
    for target in (3.0, 6.0):
        out = quantize(tiny, "EXL2", output=tmp_path / f"t{target}",
                       options={"bpw": target, "measurement": str(measurement), **SMALL})
        assert abs(config(out)["quantization_config"]["achieved_bpw"] - target) <= 0.05


@pytest.mark.slow
def test_enigma_runs_it_as_its_reference_dequantized_weights(exl2_4: Path, tiny: Path, tmp_path: Path) -> None:
    ids = Tokenizer(tiny).encode(TEXT)
    oracle = dequantized_folder(exl2_4, tiny, tmp_path / "oracle")
    torch.testing.assert_close(logits(exl2_4, ids), logits(oracle, ids), atol=2e-4, rtol=1e-4)
    reference = logits(tiny, ids)
    error = ((logits(exl2_4, ids) - reference).norm() / reference.norm()).item()
    assert error < 0.05, error

    # through the engine (the native decoder on the CPU): greedy tokens as the oracle's
    params = SamplingParams(max_tokens=24, temperature=0)
    prompts = ["The Python tutorial", "A list is"]
    ours = [o.outputs[0].token_ids for o in LLM(str(exl2_4)).generate(prompts, params)]
    theirs = [o.outputs[0].token_ids for o in LLM(str(oracle)).generate(prompts, params)]
    assert ours == theirs


def test_an_interrupted_measurement_resumes(tmp_path: Path) -> None:
    from enigma.testing import make_tiny_llama

    tiny = make_tiny_llama(tmp_path / "llama", layers=6)
    work = tmp_path / "work"
    seen: list[int] = []

    def stop_after_two(done: int, total: int) -> None:
        seen.append(done)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(tiny, "EXL2", output=tmp_path / "a", options={"work_dir": str(work), **SMALL},
                 progress=stop_after_two)
    assert not (tmp_path / "a").exists()                       # nothing half-written
    assert len(json.loads((work / "measurement.json").read_text())["layers"]) == 2
    seen.clear()
    out = quantize(tiny, "EXL2", output=tmp_path / "b", options={"work_dir": str(work), **SMALL},
                   progress=lambda done, total: seen.append(done))
    assert seen[0] == 3 and seen[-1] == 13                    # layers 3-6 measured, then 6 layers + head
    assert not work.exists()                                  # done: the scratch is gone
    fresh = quantize(tiny, "EXL2", output=tmp_path / "c", options={"work_dir": str(tmp_path / "w2"), **SMALL})
    resumed = json.loads((out / "measurement.json").read_text())
    assert resumed["layers"] == json.loads((fresh / "measurement.json").read_text())["layers"]
    assert (out / "output.safetensors").read_bytes() == (fresh / "output.safetensors").read_bytes()


def test_bad_input_is_refused_with_what_to_do(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(BadRequestError, match="--bpw 2.0 is out of range.*2.5 to 8.0"):
        quantize(tiny, "EXL2", output=tmp_path / "a", options={"bpw": 2.0})
    with pytest.raises(BadRequestError, match="--bpw 9.0 is out of range"):
        quantize(tiny, "EXL2", output=tmp_path / "a", options={"bpw": 9.0})
    with pytest.raises(BadRequestError, match="--head-bits 7"):
        quantize(tiny, "EXL2", output=tmp_path / "a", options={"head_bits": 7})
    with pytest.raises(BadRequestError, match=r"too short: \d+ tokens, and 8 rows of 256 need 2048"):
        quantize(tiny, "EXL2", output=tmp_path / "a", options={"calibration_texts": [TEXT], **SMALL})
    with pytest.raises(BadRequestError, match="takes no option bits"):
        quantize(tiny, "EXL2", output=tmp_path / "a", options={"bits": 4})
    with pytest.raises(NotFoundError, match="calibration file .*nope.txt does not exist"):
        quantize(tiny, "EXL2", output=tmp_path / "a", options={"calibration": str(tmp_path / "nope.txt")})
    lines = tmp_path / "cal.jsonl"
    lines.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    with pytest.raises(BadRequestError, match=r'cal.jsonl:2 has no "text" string'):
        quantize(tiny, "EXL2", output=tmp_path / "a", options={"calibration": str(lines)})
    assert not (tmp_path / "a").exists()


def test_only_the_llama_family_is_supported(tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 100, "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12}))
    with pytest.raises(BadRequestError, match="supports the Llama family.*BertModel"):
        quantize(bert, "EXL2", output=tmp_path / "a")


@pytest.mark.slow
def test_an_exl2_model_is_not_quantized_again(exl2_4: Path, tmp_path: Path) -> None:
    with pytest.raises(NotAvailableError, match="quantized already"):
        quantize(exl2_4, "EXL2", output=tmp_path / "again", options=SMALL)
    with pytest.raises(Exception, match="quantized with 'exl2'"):
        quantize(exl2_4, "Q4_K_M", output=tmp_path / "gguf")

