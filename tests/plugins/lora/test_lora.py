"""enigma-plugin-lora against PEFT: the same adapters, the same logits, the same merged weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from enigma.errors import BadRequestError, ConfigError
from enigma.loader import load_model
from enigma.testing import make_tiny_llama
from enigma.training.attention import training_context
from enigma_lora import LoRAConfig, apply_lora, load_adapter, merge_adapter, save_adapter, trainable_parameters

peft = pytest.importorskip("peft", reason="PEFT is the oracle (requirements-dev.txt installs it with mergekit)")
transformers = pytest.importorskip("transformers")

IDS = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("lora-base") / "base", seed=3)


def enigma_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(torch.tensor(IDS), torch.arange(len(IDS)), training_context(model.num_layers, 1, len(IDS)))
        return model.compute_logits(hidden)


def hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float()


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero B matrices, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def test_peft_loads_enigmas_adapter(base: Path, tmp_path: Path) -> None:
    model = load_model(base, dtype=torch.float32).model
    config = LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    wrapped = apply_lora(model, config)
    assert len(wrapped) == 6 and all(n.endswith(("q_proj", "v_proj", "down_proj")) for n in wrapped)
    randomize(model)
    save_adapter(model, tmp_path / "adapter", config)
    reference = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                               tmp_path / "adapter")
    torch.testing.assert_close(enigma_logits(model), hf_logits(reference), rtol=1e-4, atol=1e-4)
    trainable, _ = trainable_parameters(model)
    assert trainable == sum(p.numel() for n, p in reference.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("options", [{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj"]},
                                     {"r": 4, "lora_alpha": 4, "target_modules": "all-linear", "use_rslora": True},
                                     {"r": 2, "lora_alpha": 8, "target_modules": ["gate_proj", "o_proj"],
                                      "rank_pattern": {"o_proj": 6}, "alpha_pattern": {"gate_proj": 3}}])
def test_enigma_loads_peft_adapters_and_merges_as_peft(options: dict, base: Path, tmp_path: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(**options, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = hf_logits(peft_model)

    model = load_model(base, dtype=torch.float32).model
    load_adapter(model, tmp_path / "adapter")
    torch.testing.assert_close(enigma_logits(model), expected, rtol=1e-4, atol=1e-4)

    merged = merge_adapter(base, tmp_path / "adapter", output=tmp_path / "merged")
    theirs = peft_model.merge_and_unload().state_dict()
    ours = load_file(merged / "model.safetensors")
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-5, atol=1e-5, msg=name)
    assert (merged / "tokenizer.json").exists()
    assert json.loads((merged / "config.json").read_text())["num_hidden_layers"] == 2


def test_adapter_for_another_base_names_the_tensor(base: Path, tmp_path: Path) -> None:
    wide = make_tiny_llama(tmp_path / "wide", hidden_size=32)
    model = load_model(wide, dtype=torch.float32).model
    config = LoRAConfig(rank=2, target_modules=["q_proj"])
    apply_lora(model, config)
    save_adapter(model, tmp_path / "adapter", config)
    with pytest.raises(BadRequestError, match=r"lora_A\.weight is \[2, 32\] but the model's model\.layers\.0\."
                                              r"self_attn\.q_proj needs \[2, 64\]"):
        load_adapter(load_model(base, dtype=torch.float32).model, tmp_path / "adapter")
    with pytest.raises(BadRequestError, match=r"q_proj is \[32, 32\] by its A and B, but .* is \[64, 64\]"):
        merge_adapter(base, tmp_path / "adapter", output=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_bad_settings_are_clear(base: Path, tmp_path: Path) -> None:
    model = load_model(base, dtype=torch.float32).model
    with pytest.raises(BadRequestError, match="rank must be a positive integer, not 0"):
        LoRAConfig(rank=0)
    with pytest.raises(BadRequestError, match="no module of the model matches target_modules qkv; its Linear "
                                              "modules are down_proj, gate_proj, k_proj, lm_head, o_proj"):
        apply_lora(model, LoRAConfig(target_modules=["qkv"]))
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "use_dora": True}))
    with pytest.raises(ConfigError, match="DoRA adapters are not supported yet"):
        load_adapter(model, tmp_path / "dora")
    with pytest.raises(ConfigError, match="has no adapter_config.json"):
        load_adapter(model, tmp_path)
