"""The sft trainer: it learns, resumes exactly, checkpoints gradients correctly, saves HF folders."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from tiny_models import CORPUS, llama_config, write_tokenizer

from enigma import LLM, SamplingParams
from enigma.errors import ConfigError, NotFoundError
from enigma.training import TrainConfig, load_train_config, train
from enigma.training.attention import causal_lm_loss
from enigma.training.sft import build_model, lr_factor
from enigma.training.tokenizer import train_tokenizer

TINY_CONFIG = llama_config()


@pytest.fixture
def scratch(tmp_path):
    """A config.json and tokenizer to pre-train from, and a small corpus."""
    write_tokenizer(tmp_path / "tok", template="chatml")
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "corpus.txt").write_text(CORPUS * 4)
    return tmp_path


def scratch_config(root, **options):
    values = {"data": [str(root / "corpus.txt")], "model": str(root / "config.json"), "tokenizer": str(root / "tok"),
              "out": str(root / "out"), "seq_len": 32, "batch_size": 4, "lr": 3e-3, "val_fraction": 0.1,
              "log_interval": 1, "eval_interval": 5, "save_interval": 5}
    return TrainConfig(**{**values, **options})


def test_pretraining_lowers_the_loss_and_saves_a_loadable_model(scratch):
    events = []
    out = train(scratch_config(scratch, max_steps=40, warmup_steps=4), progress=events.append)
    losses = [e.loss for e in events if e.event == "step"]
    assert losses[-1] < losses[0] - 1.0
    vals = [e.val_loss for e in events if e.event == "eval"]
    assert vals[-1] < vals[0] and events[-1].event == "done"
    record = json.loads((out / "enigma_training.json").read_text())
    assert record["steps"] == 40 and math.isclose(record["val_perplexity"], math.exp(vals[-1]), rel_tol=1e-6)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 4]  # <|end_of_text|>, and <|im_end|> which ends ChatML turns
    llm = LLM(out)
    text = llm.generate("The quick brown", SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
    assert text  # the trained folder runs in enigma's own runtime


def test_saved_folder_matches_transformers(scratch):
    transformers = pytest.importorskip("transformers")
    out = train(scratch_config(scratch, max_steps=3))
    model, _, _ = build_model(str(out), seed=0)
    ids = torch.tensor([[5, 17, 99, 3, 250, 12, 7, 80]])
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        expected = hf(ids).logits[0]
        from enigma.training.attention import training_context

        hidden = model(ids[0], torch.arange(8), training_context(model.num_layers, 1, 8))
        actual = model.compute_logits(hidden)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_fine_tuning_a_model_folder(tiny_model, tmp_path):
    folder = tiny_model("qwen2")
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n" for i in range(40)))
    events = []
    out = train(TrainConfig(data=[str(tmp_path / "chats.jsonl")], model=str(folder), out=str(tmp_path / "out"),
                            seq_len=48, batch_size=4, max_steps=12, lr=1e-3, log_interval=1, val_fraction=0.0),
                progress=events.append)
    losses = [e.loss for e in events if e.event == "step"]
    assert losses[-1] < losses[0]
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2ForCausalLM"] and saved["tie_word_embeddings"]
    LLM(out).generate("What is 3 plus 3?", SamplingParams(max_tokens=4))


def test_gradient_checkpointing_gives_the_same_gradients(scratch):
    model, _, _ = build_model(str(scratch / "config.json"), seed=1)
    ids = torch.randint(0, 384, (2, 33), generator=torch.Generator().manual_seed(0))

    def gradients(layers):
        model.zero_grad()
        model.checkpointed_layers = frozenset(layers)
        loss, _ = causal_lm_loss(model, ids, ids)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients([])
    for layers in ([0, 1], [1]):
        checkpointed = gradients(layers)
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=0)


def test_checkpointed_layers_spec():
    config = TrainConfig(data=["x"], model="m", out="o", gradient_checkpointing="0,2-3")
    assert config.checkpointed_layers(4) == {0, 2, 3}
    assert TrainConfig(data=["x"], model="m", out="o", gradient_checkpointing="all").checkpointed_layers(3) == {0, 1, 2}
    with pytest.raises(ConfigError, match=r"names layers \[5\], but the model has layers 0-3"):
        TrainConfig(data=["x"], model="m", out="o", gradient_checkpointing="5").checkpointed_layers(4)
    with pytest.raises(ConfigError, match="expected none, all, or layer indices"):
        TrainConfig(data=["x"], model="m", out="o", gradient_checkpointing="first").checkpointed_layers(4)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(step, warmup=10, total=100, min_ratio=0.1) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))


def test_resume_in_process_matches_an_uninterrupted_run(scratch):
    full = train(scratch_config(scratch, out=str(scratch / "full"), max_steps=12, save_interval=4))
    partial = scratch_config(scratch, out=str(scratch / "part"), max_steps=12, save_interval=4)
    with pytest.raises(KeyboardInterrupt):
        train(partial, progress=lambda e: _interrupt_at(e, 6))
    assert (scratch / "part" / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    resumed = train(scratch_config(scratch, out=str(scratch / "part"), max_steps=12, save_interval=4, resume=True))
    assert_same_weights(full, resumed)


def _interrupt_at(event, step):
    if event.event == "step" and event.step == step:
        raise KeyboardInterrupt


def assert_same_weights(a, b):
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_run_errors_are_clear(scratch):
    with pytest.raises(NotFoundError, match="nothing to resume"):
        train(scratch_config(scratch, resume=True))
    train(scratch_config(scratch, max_steps=5, save_interval=2))
    with pytest.raises(ConfigError, match="already holds a run's checkpoints; pass --resume"):
        train(scratch_config(scratch, max_steps=5))
    with pytest.raises(NotFoundError, match="model 'nowhere' not found"):
        train(scratch_config(scratch, model="nowhere", out=str(scratch / "o2")))
    small = {**TINY_CONFIG, "vocab_size": 100}
    (scratch / "small.json").write_text(json.dumps(small))
    with pytest.raises(ConfigError, match="has 384 tokens but the model's vocab_size is 100"):
        train(scratch_config(scratch, model=str(scratch / "small.json"), out=str(scratch / "o3")))
    with pytest.raises(ConfigError, match="set max_steps"):
        scratch_config(scratch, streaming=True)
    with pytest.raises(ConfigError, match="must be greater than 0"):
        scratch_config(scratch, lr=0)


def test_train_config_file_and_overrides(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('[train]\ndata = "corpus/*.txt"\nmodel = "config.json"\nout = "run"\nlr = 1e-3\n')
    config = load_train_config(path, lr=5e-4, seq_len=None)
    assert config.data == ["corpus/*.txt"] and config.lr == 5e-4 and config.seq_len == 512
    path.write_text('data = ["a"]\nmodel = "m"\nout = "o"\nlearning_rate = 1\n')
    with pytest.raises(ConfigError, match="unknown option.*learning_rate"):
        load_train_config(path)
    with pytest.raises(ConfigError, match="training needs data, model"):
        load_train_config(None, out="o")


def test_tokenizer_trainer_round_trips_any_text(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    folder = train_tokenizer([tmp_path / "corpus.txt"], tmp_path / "tok", vocab_size=400)
    from enigma.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    assert tokenizer.vocab_size == 400
    for text in ["never seen: ŽŽŽ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \t\n tabs", CORPUS[:200]]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False)[0] == tokenizer.token_to_id("<|im_start|>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(Exception, match="too small"):
        train_tokenizer([tmp_path / "corpus.txt"], tmp_path / "t2", vocab_size=100)
