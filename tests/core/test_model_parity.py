"""Parity with transformers on random tiny models: logits, greedy tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from enigma import LLM, SamplingParams

ARCHS = ["llama-gqa", "llama3-rope", "llama-linear-rope", "mistral", "qwen2", "qwen2-window"]


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def prompt_ids(length: int, vocab: int, seed: int = 1) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [0, *torch.randint(7, vocab, (length - 1,), generator=generator).tolist()]


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_match_transformers(tiny_model, arch):
    from enigma.backends.torch_backend import TorchBackend
    from enigma.loader import load_model
    from enigma.runner import ModelRunner, SequenceChunk

    folder = tiny_model(arch)
    runner = ModelRunner(load_model(folder), TorchBackend(device="cpu"), block_size=4, num_blocks=8)
    ids = prompt_ids(24, runner.vocab_size)
    with torch.no_grad():
        expected = hf_model(folder)(torch.tensor([ids])).logits[0]
    # the prompt in two chunks (as chunked prefill runs it), through non-contiguous blocks
    table = [7, 2, 5, 0, 3, 1]
    first = runner.execute([SequenceChunk(ids[:10], 0, table, all_logits=True)]).full[0]
    second = runner.execute([SequenceChunk(ids[10:], 10, table, all_logits=True)]).full[0]
    torch.testing.assert_close(torch.cat([first, second]), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_and_logprobs_match_transformers(tiny_model, arch):
    folder = tiny_model(arch)
    llm = LLM(folder)
    ids = prompt_ids(11, llm.tokenizer.vocab_size, seed=2)
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32, logprobs=2)
    out = llm.generate([ids], params)[0].outputs[0]

    with torch.no_grad():
        reference = hf_model(folder).generate(
            torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=1)
    expected_tokens = reference.sequences[0, len(ids):].tolist()
    assert out.token_ids == expected_tokens
    assert out.finish_reason == "length"
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        expected = torch.log_softmax(reference.logits[step][0].float(), -1)
        assert math.isclose(entry[token].logprob, float(expected[token]), abs_tol=1e-4)
        # greedy takes the most likely token, unless min_tokens masked EOS above it
        assert entry[token].rank == int((expected > expected[token]).sum()) + 1
        assert entry[token].rank == 1 or int(expected.argmax()) == 1
        top2 = torch.topk(expected, 2).indices.tolist()
        assert set(top2) <= set(entry)


def test_prompt_logprobs_match_transformers(tiny_model):
    folder = tiny_model("llama-gqa")
    llm = LLM(folder)
    ids = prompt_ids(9, llm.tokenizer.vocab_size, seed=3)
    result = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=3))[0]
    with torch.no_grad():
        expected = torch.log_softmax(hf_model(folder)(torch.tensor([ids])).logits[0], -1)
    assert result.prompt_logprobs[0] is None
    for position in range(1, len(ids)):
        entry = result.prompt_logprobs[position]
        assert math.isclose(entry[ids[position]].logprob, float(expected[position - 1, ids[position]]),
                            abs_tol=1e-4)
        assert len(entry) in (3, 4)  # top-3, plus the prompt token when it is not among them


def test_minilm_embeddings_match_sentence_transformers():
    from sentence_transformers import SentenceTransformer
    from tiny_models import minilm_path

    texts = ["The cat sits on the mat.", "Paged attention keeps KV memory in blocks.",
             "naïve café résumé 🚀", "A much longer sentence " * 40]
    llm = LLM(minilm_path())
    ours = torch.tensor([item.outputs.embedding for item in llm.embed(texts)])
    reference = torch.tensor(SentenceTransformer(str(minilm_path()), device="cpu").encode(texts))
    cosine = torch.nn.functional.cosine_similarity(ours, reference)
    assert bool((cosine >= 0.9999).all()), cosine
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)  # Normalize module honoured
