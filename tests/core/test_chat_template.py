"""Chat templates render as transformers renders them, inside a sandbox."""

from __future__ import annotations

import pytest

from enigma import BadRequestError
from enigma.chat_template import render_chat
from enigma.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Name a prime.  "},
     {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another, with ünïcode 🚀"}],
]


@pytest.mark.parametrize("template", ["llama3", "chatml"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers(tiny_model, template, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    folder = tiny_model("llama-gqa", template=template)
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = Tokenizer(folder).apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == expected


def test_chat_prompt_tokens_equal_transformers(tiny_model):
    from transformers import AutoTokenizer

    folder = tiny_model("llama-gqa", template="llama3")
    reference = AutoTokenizer.from_pretrained(folder)
    expected = reference.apply_chat_template(CONVERSATIONS[1], tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    tokenizer = Tokenizer(folder)
    text = tokenizer.apply_chat_template(CONVERSATIONS[1])
    assert tokenizer.encode(text, add_special_tokens=False) == list(expected)


def test_fallback_template_when_model_has_none(tiny_model):
    tokenizer = Tokenizer(tiny_model("llama-gqa", template=None))
    assert tokenizer.chat_template is None
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]) == "User: Hi\n\nAssistant:"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'user'}) %}{{ x }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
def test_escaping_the_sandbox_is_refused(template):
    with pytest.raises(BadRequestError, match="unsafe operation and was refused"):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_template_raise_exception_and_bad_messages():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    with pytest.raises(BadRequestError, match="refused these messages: first must be user"):
        render_chat(template, [{"role": "assistant", "content": "x"}])
    with pytest.raises(BadRequestError, match=r"messages\[1\] must be an object with a 'role'"):
        render_chat(template, [{"role": "user", "content": "x"}, "hello"])
    with pytest.raises(BadRequestError, match="not valid Jinja"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}])


def test_tokenizer_reads_special_tokens_and_eos(tiny_model):
    tokenizer = Tokenizer(tiny_model("llama-gqa"))
    assert tokenizer.special_tokens["bos_token"] == "<|begin_of_text|>"
    assert tokenizer.eos_token_ids == (1,)
    assert tokenizer.encode("hello")[0] == 0
    assert tokenizer.decode(tokenizer.encode("héllo 🚀")) == "héllo 🚀"
