"""Tokenizer details: sandboxed chat templates, incremental decoding of multi-byte text, batch encoding."""

import pytest

from gpt4.errors import GPT4Error
from gpt4.tokenizer import IncrementalDecoder, render_chat_template


def test_chat_template_cannot_reach_python_internals():
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception) as err:
        render_chat_template(hostile, [{"role": "user", "content": "hi"}])
    assert "unsafe" in str(err.value).lower() or "access" in str(err.value).lower()


def test_chat_template_errors_are_clear():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with the user') }}{% endif %}"
    with pytest.raises(GPT4Error, match="Conversations must start with the user"):
        render_chat_template(template, [{"role": "assistant", "content": "x"}])
    with pytest.raises(GPT4Error, match="list of"):
        render_chat_template(template, "not a list")


def test_incremental_decoder_never_splits_a_character(default_model):
    tok = default_model.tokenizer
    text = "Mushrooms 🍄 and turtles 🐢 — naïve café, 普林塞斯"
    ids = tok.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_batch_encoding_pads_on_the_left(default_model):
    tok = default_model.tokenizer
    batch = tok(["Hello there, how are you?", "Hi"], return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[1, 0] == 0 and mask[1, -1] == 1 and mask[0].all()
    assert ids[1, -1].item() == tok.encode("Hi")[-1]
