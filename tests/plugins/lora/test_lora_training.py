"""``enigma train --method lora`` as a user runs it: adapters train, the base does not, PEFT loads the result."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tiny_models import CORPUS, make_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("lora-train") / "base", "llama-gqa")


def train(enigma, base: Path, data: Path, out: Path, *extra: str):
    return enigma("train", "--method", "lora", "--data", str(data), "--model", str(base), "--out", str(out),
                  "--seq-len", "32", "--batch-size", "4", "--max-steps", "30", "--lr", "3e-3", "--threads", "1",
                  "--eval-interval", "30", *extra)


def test_lora_trains_an_adapter_that_peft_loads(enigma, base: Path, tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text(CORPUS * 4)
    done = train(enigma, base, data, tmp_path / "out", "--lora-rank", "4", "--lora-alpha", "8",
                 "--target", "q_proj,v_proj,gate_proj", "--merge", "--save-interval", "15")
    assert done.returncode == 0, done.stderr
    assert re.search(r"[\d,]+ of [\d,]+ parameters train", done.stdout + done.stderr)
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, ["gate_proj", "q_proj",
                                                                                       "v_proj"])
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(key.startswith("base_model.model.model.layers.") for key in adapter)
    assert any(tensor.abs().sum() > 0 for key, tensor in adapter.items() if "lora_B" in key)
    losses = [float(m[1]) for m in re.finditer(r"^step \d+/\d+\s+loss ([\d.]+)", done.stdout + done.stderr, re.M)]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base)
    reference = peft.PeftModel.from_pretrained(hf_base, out)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([[1, 30, 31, 32, 33, 34]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    untouched = load_file(base / "model.safetensors")
    with torch.no_grad():
        for name, tensor in reference.get_base_model().state_dict().items():
            key = name.replace(".base_layer", "")
            if "lora_" not in name and key in untouched:
                assert torch.equal(tensor, untouched[key]), name  # the base did not train

    checkpoint = load_file(out / "checkpoints" / "step-0000015" / "model.safetensors")
    assert set(checkpoint) and all(".lora_A." in k or ".lora_B." in k for k in checkpoint)

    answer = enigma("run", str(out / "merged"), "Hello", "--max-tokens", "3", "--temperature", "0", "--local")
    assert answer.returncode == 0, answer.stderr

    # resuming from the step-15 checkpoint (the adapter alone) continues the run exactly
    resumed = train(enigma, base, data, out, "--lora-rank", "4", "--lora-alpha", "8",
                    "--target", "q_proj,v_proj,gate_proj", "--save-interval", "15", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    again = load_file(out / "adapter_model.safetensors")
    assert all(torch.allclose(again[k], adapter[k], rtol=1e-5, atol=1e-6) for k in adapter)


def test_lora_options_errors(enigma, base: Path, tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text(CORPUS)
    zero = train(enigma, base, data, tmp_path / "a", "--lora-rank", "0")
    assert zero.returncode == 1 and "lora.rank" in zero.stderr and "an integer of at least 1" in zero.stderr
    unknown = train(enigma, base, data, tmp_path / "b", "--target", "qkv_proj")
    assert unknown.returncode == 1
    assert "no module of the model matches target_modules qkv_proj; its Linear modules are" in unknown.stderr


def test_merge_adapter_command(enigma, base: Path, tmp_path: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    tuned = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"],
                                                    init_lora_weights=False))
    tuned.save_pretrained(tmp_path / "adapter")
    done = enigma("merge-adapter", str(base), str(tmp_path / "adapter"), "--name", "tuned:merged")
    assert done.returncode == 0, done.stderr
    assert "tuned:merged" in enigma("list").stdout
    assert enigma("merge-adapter", str(base), str(tmp_path / "adapter")).returncode == 2
