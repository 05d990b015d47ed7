"""enigma-plugin-dpo against TRL 1.16: the same tokens, the same loss and rewards, and training that works."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tiny_models import make_model

from enigma.errors import BadRequestError
from enigma.loader import load_model
from enigma.tokenizer import Tokenizer
from enigma_dpo import dpo_loss, tokenize_pair
from enigma_dpo.data import collate
from enigma_dpo.trainer import DPOTrainer, sequence_logps

trl = pytest.importorskip("trl", reason="TRL is the oracle (requirements-dev.txt installs it)")
transformers = pytest.importorskip("transformers")

RECORDS = [{"prompt": f"Question {i}: {'what ' * (i % 3)}is a list?", "chosen": " A mutable sequence.",
            "rejected": " A fish" + " x" * i} for i in range(6)]
CHAT = [{"prompt": [{"role": "user", "content": f"Name a Python type ({i})."}],
         "chosen": [{"role": "assistant", "content": "dict"}],
         "rejected": [{"role": "assistant", "content": "a fish " * (1 + i % 2)}]} for i in range(4)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("dpo") / "model", "llama-gqa", template="chatml")


def trl_trainer(folder: Path, records: list[dict], loss_type: str, beta: float, tmp: Path):
    from datasets import Dataset

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    policy = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():  # the policy has moved from the reference
        generator = torch.Generator().manual_seed(0)
        for parameter in policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder)
    args = trl.DPOConfig(output_dir=str(tmp / "trl"), beta=beta, loss_type=[loss_type], report_to="none",
                         use_cpu=True, bf16=False, max_length=256, per_device_train_batch_size=len(records))
    return trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(records),
                          processing_class=tokenizer)


@pytest.mark.parametrize("records", [RECORDS, CHAT], ids=["standard", "conversational"])
def test_tokens_equal_trls(records: list[dict], folder: Path, tmp_path: Path) -> None:
    theirs = trl_trainer(folder, records, "sigmoid", 0.1, tmp_path).train_dataset
    tokenizer = Tokenizer(folder)
    for index, record in enumerate(records):
        ours = tokenize_pair(record, tokenizer, where=f"record {index}")
        assert (ours.prompt, ours.chosen, ours.rejected) == (
            theirs[index]["prompt_ids"], theirs[index]["chosen_ids"], theirs[index]["rejected_ids"])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_and_rewards_equal_trls(loss_type: str, folder: Path, tmp_path: Path) -> None:
    beta = 0.2
    trainer = trl_trainer(folder, RECORDS, loss_type, beta, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(RECORDS))])
    trainer.model.eval()  # the metrics land under "eval"; the models have no dropout either way
    with torch.no_grad():
        expected_loss = trainer._compute_loss(trainer.model, batch, False).item()
    expected = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    tokenizer = Tokenizer(folder)
    pairs = [tokenize_pair(r, tokenizer, where="") for r in RECORDS]
    reference = load_model(folder, dtype=torch.float32).model
    policy = load_model(folder, dtype=torch.float32).model
    policy.load_state_dict(trainer.model.state_dict())  # transformers' Llama and enigma's share the names
    DPOTrainer.score_reference(reference, pairs, 0, batch_size=4)
    ours_batch = collate(pairs, 0)
    with torch.no_grad():
        logps = sequence_logps(policy, ours_batch)
    n = len(pairs)
    loss, metrics = dpo_loss(logps[:n], logps[n:], ours_batch["ref_logps"][:n], ours_batch["ref_logps"][n:],
                             beta=beta, loss_type=loss_type, chosen_lengths=ours_batch["lengths"][:n],
                             rejected_lengths=ours_batch["lengths"][n:])
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert metrics[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-5), name


def test_dpo_raises_the_margin(enigma, folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 2))
    done = enigma("train", "--method", "dpo", "--data", str(data), "--model", str(folder), "--out",
                  str(tmp_path / "out"), "--seq-len", "64", "--batch-size", "4", "--max-steps", "12", "--lr", "1e-3",
                  "--beta", "0.1", "--threads", "1", "--eval-interval", "100", "--save-interval", "100",
                  "--warmup-steps", "0")
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    margins = [float(m) for m in re.findall(r"rewards/margins (-?[\d.]+)", log)]
    accuracies = [float(m) for m in re.findall(r"rewards/accuracies ([\d.]+)", log)]
    assert margins and margins[-1] > 0.1 and accuracies[-1] == 1.0, log
    tokenizer = Tokenizer(folder)
    pairs = [tokenize_pair(r, tokenizer, where="") for r in RECORDS]
    batch = collate(pairs, 0)
    with torch.no_grad():
        before = sequence_logps(load_model(folder, dtype=torch.float32).model, batch)
        after = sequence_logps(load_model(tmp_path / "out", dtype=torch.float32).model, batch)
    n = len(pairs)
    assert ((after[:n] - before[:n]) - (after[n:] - before[n:])).mean() > 0  # chosen gained on rejected


def test_lora_dpo_writes_an_adapter(enigma, folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    done = enigma("train", "--method", "dpo", "--lora", "--lora-rank", "4", "--target", "q_proj,v_proj,o_proj",
                  "--loss", "ipo", "--data", str(data), "--model", str(folder), "--out", str(tmp_path / "out"),
                  "--seq-len", "64", "--batch-size", "2", "--max-steps", "4", "--lr", "1e-3", "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 4
    peft = pytest.importorskip("peft")
    peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder), tmp_path / "out")


def test_bad_preference_records(enigma, folder: Path, tmp_path: Path, caplog) -> None:
    from enigma_dpo import read_preferences

    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": "q", "rejected": "no"}) + "\n")
    with pytest.raises(BadRequestError, match=r"prefs\.jsonl:2: the record has no 'chosen'"):
        read_preferences([data], Tokenizer(folder), max_length=64)
    data.write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    read_preferences([data], Tokenizer(folder), max_length=64)
    assert "prefs.jsonl:1: chosen and rejected are the same" in caplog.text
    bad = enigma("train", "--method", "dpo", "--loss", "kto", "--data", str(data), "--model", str(folder),
                 "--out", str(tmp_path / "o"))
    assert bad.returncode == 1 and "dpo.loss" in bad.stderr and "sigmoid, ipo, hinge" in bad.stderr


def test_the_seeds_python_call(folder: Path, tmp_path: Path) -> None:
    from enigma_dpo import train_dpo

    out = train_dpo(str(folder), RECORDS, out=str(tmp_path / "aligned"), epochs=1, batch_size=3, seq_len=64,
                    threads=1, beta=0.2, loss="hinge")
    assert (Path(out) / "model.safetensors").exists()
    record = json.loads((Path(out) / "enigma_training.json").read_text())
    assert record["steps"] == 2 and record["config"]["options"]["loss"] == "hinge"


def test_precomputed_reference_logps_are_used(folder: Path) -> None:
    tokenizer = Tokenizer(folder)
    record = {**RECORDS[0], "ref_chosen_logps": -12.5, "ref_rejected_logps": -30.0}
    pair = tokenize_pair(record, tokenizer, where="x")
    DPOTrainer.score_reference(load_model(folder, dtype=torch.float32).model, [pair], 0, batch_size=2)
    assert (pair.ref_chosen_logps, pair.ref_rejected_logps) == (-12.5, -30.0)
    with pytest.raises(BadRequestError, match="give both ref_chosen_logps and ref_rejected_logps"):
        tokenize_pair({**RECORDS[0], "ref_chosen_logps": -1.0}, tokenizer, where="x")
