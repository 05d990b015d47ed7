"""Training data: every format in, exact token blocks out, clear errors for bad records."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import chat_template, write_tokenizer

from enigma.datasets import (
    IGNORE_INDEX,
    DataOptions,
    DatasetError,
    ExampleEncoder,
    StreamingBlocks,
    TokenBlocks,
    expand_sources,
    load_blocks,
    read_records,
)
from enigma.errors import NotFoundError
from enigma.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder, template="chatml")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    return Tokenizer(folder)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def encode_one(tokenizer, tmp_path, record):
    path = write_jsonl(tmp_path / "one.jsonl", [record])
    return ExampleEncoder(tokenizer).encode(next(read_records([path])))


def trained_text(tokenizer, example):
    return tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX],
                            skip_special_tokens=False)


def test_plain_text_file_is_one_document_ending_in_eos(tokenizer, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("Café naïve 東京 🚀 and a list is mutable.", encoding="utf-8")
    example = ExampleEncoder(tokenizer).encode(next(read_records([path])))
    assert example.input_ids[-1] == 1 and example.labels == example.input_ids
    assert tokenizer.decode(example.input_ids) == path.read_text(encoding="utf-8")


def test_jsonl_text_records(tokenizer, tmp_path):
    example = encode_one(tokenizer, tmp_path, {"text": "a tuple is not mutable"})
    assert tokenizer.decode(example.input_ids) == "a tuple is not mutable"


def test_chat_records_train_on_assistant_turns_only(tokenizer, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    example = encode_one(tokenizer, tmp_path, {"messages": messages})
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert tokenizer.decode(example.input_ids, skip_special_tokens=False) == full
    assert trained_text(tokenizer, example) == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"


def test_sharegpt_and_alpaca_records_become_the_same_chat(tokenizer, tmp_path):
    sharegpt = encode_one(tokenizer, tmp_path, {"conversations": [
        {"from": "human", "value": "Name a fruit\n\nred"}, {"from": "gpt", "value": "Apple"}]})
    alpaca = encode_one(tokenizer, tmp_path, {"instruction": "Name a fruit", "input": "red", "output": "Apple"})
    assert sharegpt == alpaca
    assert trained_text(tokenizer, alpaca) == "Apple<|im_end|>\n"


def test_llama3_template_masks_header_and_keeps_end_of_turn(tmp_path):
    folder = tmp_path / "llama3"
    write_tokenizer(folder, template="llama3")
    tokenizer = Tokenizer(folder)
    example = encode_one(tokenizer, tmp_path, {"messages": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Yo"}]})
    assert trained_text(tokenizer, example) == "Yo<|eot_id|>"
    assert chat_template("llama3")


def test_json_array_files(tokenizer, tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]))
    assert [r.data["output"] for r in read_records([path])] == ["b", "d"]


def test_packing_covers_every_target_once(tokenizer, tmp_path):
    texts = [f"document number {i} says something about lists and tuples." for i in range(40)]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    options = DataOptions(seq_len=16, val_fraction=0.0)
    blocks = TokenBlocks(expand_sources([path]), tokenizer, options)
    ids, labels = blocks.train
    assert ids.shape[1] == 17 and torch.equal(ids, labels)
    # consecutive blocks overlap by exactly one token: the stream is recovered
    stream = torch.cat([ids[0], *(row[1:] for row in ids[1:])]).tolist()
    encoder = ExampleEncoder(tokenizer)
    expected = [t for r in read_records([path]) for t in encoder.encode(r).input_ids]
    assert stream == expected[: len(stream)] and len(expected) - len(stream) < 17


def test_without_packing_each_example_is_padded_without_loss(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": "short"}, {"text": "a bit longer text here"}])
    blocks = TokenBlocks(expand_sources([path]), tokenizer, DataOptions(seq_len=32, packing=False,
                                                                          val_fraction=0.0))
    ids, labels = blocks.train
    assert ids.shape == (2, 33)
    first_len = len(tokenizer.encode("short")) + 1
    assert (labels[0, first_len:] == IGNORE_INDEX).all() and (labels[0, :first_len] != IGNORE_INDEX).all()


def test_validation_split_is_disjoint_and_stable(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"sample {i} " * 8} for i in range(200)])
    options = DataOptions(seq_len=8, val_fraction=0.2)
    a = TokenBlocks(expand_sources([path]), tokenizer, options)
    b = TokenBlocks(expand_sources([path]), tokenizer, options)
    assert a.val is not None and 0.1 < a.val[0].shape[0] / (a.num_train_blocks + a.val[0].shape[0]) < 0.3
    assert torch.equal(a.val[0], b.val[0]) and torch.equal(a.train[0], b.train[0])


def test_batches_resume_at_any_position(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"sample {i} " * 8} for i in range(100)])
    for streaming in (False, True):
        blocks = load_blocks([path], tokenizer, DataOptions(seq_len=8, val_fraction=0.1), streaming=streaming,
                             shuffle_buffer=16)
        stream = blocks.train_batches(4, seed=3)
        first = [next(stream)[0] for _ in range(30)]  # crosses epoch boundaries
        resumed = blocks.train_batches(4, seed=3, start=17)
        assert all(torch.equal(next(resumed)[0], expected) for expected in first[17:])
        other_seed = next(blocks.train_batches(4, seed=4))[0]
        assert not torch.equal(other_seed, first[0])


def test_streaming_sees_the_same_blocks_as_in_memory(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"sample {i} " * 8} for i in range(60)])
    options = DataOptions(seq_len=8, val_fraction=0.1)
    memory = TokenBlocks(expand_sources([path]), tokenizer, options)
    streaming = StreamingBlocks(expand_sources([path]), tokenizer, options, shuffle_buffer=8)
    per_epoch = memory.num_train_blocks
    batches = streaming.train_batches(1, seed=0)
    seen = sorted(tuple(next(batches)[0][0].tolist()) for _ in range(per_epoch))
    assert seen == sorted(tuple(row.tolist()) for row in memory.train[0])
    assert torch.equal(torch.cat([b[0] for b in streaming.val_batches(4)]), memory.val[0])


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "ok"}\n{"text": "broken\n', "bad.jsonl:2: invalid JSON"),
    ('{"instruction": "x"}\n', "bad.jsonl:1: missing field 'output'"),
    ('{"instruction": 3, "output": "y"}\n', "bad.jsonl:1: field 'instruction' must be a string, not int"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "field messages[0].role is 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', "has no assistant turn"),
    ('{"conversations": [{"from": "gpt", "value": 5}]}\n', "field conversations[0].value must be a string"),
    ('{"prompt": "x"}\n', "bad.jsonl:1: record has none of the fields"),
    ('[1, 2]\n', "bad.jsonl:1: a record must be a JSON object, not list"),
])
def test_malformed_records_name_file_line_and_field(tokenizer, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TokenBlocks(expand_sources([path]), tokenizer, DataOptions(seq_len=4))


def test_missing_data_and_too_little_data(tokenizer, tmp_path):
    with pytest.raises(NotFoundError, match="matches no file"):
        expand_sources([tmp_path / "nothing*.txt"])
    path = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "hi"}])
    with pytest.raises(DatasetError, match="lower --seq-len"):
        TokenBlocks(expand_sources([path]), tokenizer, DataOptions(seq_len=512))
