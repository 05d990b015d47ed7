"""QLoRA: NF4 with double quantization equal to bitsandbytes', and LoRA training on a 4-bit base."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tiny_models import CORPUS, make_model

from enigma.loader import load_model
from enigma_lora.nf4 import NF4_CODE, NF4Linear, dequantize_nf4, dynamic_map, quantize_linears, quantize_nf4


def bitsandbytes():
    try:
        import bitsandbytes.functional as functional
    except Exception as exc:
        pytest.skip(f"bitsandbytes does not import here ({exc}); the table test still checks the codes")
    return functional


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(96, 320), (7, 64), (3, 50)])
def test_nf4_equals_bitsandbytes(double_quant: bool, shape: tuple[int, int]) -> None:
    functional = bitsandbytes()
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05
    theirs, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = quantize_nf4(weight, double_quant=double_quant)
    assert torch.equal(ours.packed, theirs.reshape(-1))  # the 4-bit codes, bit for bit
    if double_quant:
        assert ours.offset == pytest.approx(state.offset.item())
        torch.testing.assert_close(ours.stats_absmax, state.state2.absmax)
        # the block maxima's 8-bit codes are the nearest (as bitsandbytes' torch backend picks them); its CPU
        # kernel's approximate binary search takes the neighbouring code for a few of them
        step = (ours.absmax.long() - state.absmax.long()).abs()
        assert step.max() <= 1 and (step > 0).float().mean() <= 0.02
        torch.testing.assert_close(dequantize_nf4(ours), functional.dequantize_4bit(theirs, state),
                                   rtol=0, atol=2e-3 * weight.abs().max().item())
    else:
        torch.testing.assert_close(ours.absmax, state.absmax)
        assert torch.equal(dequantize_nf4(ours), functional.dequantize_4bit(theirs, state))
    assert torch.equal(dynamic_map(), functional.create_dynamic_map(signed=True))


def test_nf4_round_trip_is_the_tables() -> None:
    """Without the oracle: each value comes back as the nearest code times its block's maximum."""
    weight = torch.randn(4, 64)
    q = quantize_nf4(weight, double_quant=False)
    back = dequantize_nf4(q)
    for row in range(4):
        scale = weight[row].abs().max()
        for value, restored in zip(weight[row], back[row]):
            nearest = min(NF4_CODE, key=lambda c: abs(c - value.item() / scale.item()))
            assert restored.item() == pytest.approx(nearest * scale.item(), rel=1e-6)
    assert q.nbytes * 8 / weight.numel() == pytest.approx(4.5)  # 4 bits + a float32 per 64
    assert quantize_nf4(torch.randn(256, 256)).nbytes * 8 / 65536 < 4.14  # double quantization


def test_nf4_linears_hold_about_an_eighth(tmp_path: Path) -> None:
    model = load_model(make_model(tmp_path / "m", "llama-gqa"), dtype=torch.float32).model
    linears = {n: m.weight.numel() * 4 for n, m in model.named_modules()
               if type(m) is torch.nn.Linear and not n.endswith("lm_head")}
    x = torch.randn(3, model.config.hidden_size)
    reference = model.model.layers[0].self_attn.q_proj(x)
    assert quantize_linears(model) == len(linears)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    stored = sum(m.quantized().nbytes for m in quantized.values())
    assert stored <= 0.135 * sum(linears.values())  # ~4.1-4.5 bits of 32 (small tensors pay more for maxima)
    out = quantized["model.layers.0.self_attn.q_proj"](x)
    assert (out - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_qlora_trains_and_the_adapter_fits_the_float_base(enigma, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = make_model(tmp_path / "base", "llama-gqa")
    data = tmp_path / "corpus.txt"
    data.write_text(CORPUS * 4)
    done = enigma("train", "--method", "lora", "--qlora", "--lora-rank", "8", "--target", "all-linear",
                  "--data", str(data), "--model", str(base), "--out", str(tmp_path / "out"), "--seq-len", "32",
                  "--batch-size", "4", "--max-steps", "30", "--lr", "3e-3", "--threads", "1", "--eval-interval",
                  "30", "--merge")
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    losses = [float(m) for m in re.findall(r"^step \d+/\d+\s+loss ([\d.]+)", log, re.M)]
    assert losses[-1] < losses[0], log
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == "all-linear"
    tuned = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "out")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    ids = torch.tensor([[1, 30, 31, 32]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-4)
