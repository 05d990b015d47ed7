"""enigma-tiny: installed as a plugin, runs offline, and has learned the Python docs' English."""

from __future__ import annotations

import json
import math
import random

import pytest

from enigma import LLM, SamplingParams
from enigma.plugins import get_host

# Written for this test in the documentation's style, not copied from it.
PARAGRAPH = ("The function returns a new list containing the items of the sequence in sorted order. "
             "If the optional argument is given, it is used to compare the elements of the list.")


@pytest.fixture(scope="module")
def llm():
    return LLM("enigma-tiny")


def test_registered_through_the_model_hook_and_small():
    import enigma_tiny

    models = {impl.name: impl for impl in get_host().registry.implementations("model")}
    assert models["enigma-tiny"].distribution == "enigma-plugin-tiny"
    folder = enigma_tiny.model_path()
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    record = json.loads((folder / "training.json").read_text())
    assert record["validation_perplexity"] > 1 and record["build_minutes"] < 40


def test_recommends_its_sampling_settings(llm):
    assert llm.sampling_defaults() == {"temperature": 0.6, "top_p": 0.9}


def perplexity(llm, text):
    ids = llm.tokenizer.encode(text)
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    logprobs = [entry[token].logprob for token, entry in zip(ids[1:], out.prompt_logprobs[1:])]
    return math.exp(-sum(logprobs) / len(logprobs))


def test_prefers_english_in_the_docs_style_to_the_same_words_shuffled(llm):
    words = PARAGRAPH.split()
    shuffled = " ".join(random.Random(0).sample(words, len(words)))
    real, scrambled = perplexity(llm, PARAGRAPH), perplexity(llm, shuffled)
    assert real * 4 < scrambled, (real, scrambled)


def test_writes_text_and_answers_through_its_chat_template(llm):
    text = llm.generate("The list type", SamplingParams(max_tokens=24, temperature=0))[0].outputs[0].text
    assert len(text.split()) >= 8 and sum(c.isalpha() for c in text) > len(text) / 2
    answer = llm.chat([{"role": "user", "content": "What does os.path.join do?"}],
                      SamplingParams(max_tokens=80, temperature=0))[0].outputs[0]
    assert answer.finish_reason == "stop" and "<|im_end|>" not in answer.text
    assert answer.text.split()[0][0].isupper()  # answers in the docs' voice: "Return ..."


def test_its_draft_is_small_registered_and_accepted(llm):
    """enigma-tiny-draft: ≤ 5 MB, enigma-tiny's vocabulary, and as a draft for enigma-tiny it gives
    enigma-tiny's greedy tokens with most of its drafts accepted (a random draft would see almost none)."""
    import enigma_tiny

    models = {impl.name: impl for impl in get_host().registry.implementations("model")}
    assert models["enigma-tiny-draft"].distribution == "enigma-plugin-tiny"
    folder = enigma_tiny.draft_path()
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 5 * 2**20
    record = json.loads((folder / "training.json").read_text())
    assert record["teacher"] == "enigma-tiny" and record["steps"] > 0
    speculative = LLM("enigma-tiny", speculative_model="enigma-tiny-draft", num_speculative_tokens=4)
    params = SamplingParams(temperature=0, max_tokens=64)
    prompt = "A tuple is an immutable sequence. Tuples are written as"
    assert (speculative.generate([prompt], params)[0].outputs[0].token_ids
            == llm.generate([prompt], params)[0].outputs[0].token_ids)
    assert speculative.engine.stats()["spec_decode_draft_acceptance_rate"] > 0.4
