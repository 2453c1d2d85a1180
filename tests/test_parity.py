"""Parity with transformers on tiny random checkpoints of each family, in both directions of conversion."""

import pytest
import torch

from gpt4 import GPT4Config, GPT4LMHeadModel

from .conftest import FAMILIES, tiny_model

transformers = pytest.importorskip("transformers")


def _ids(vocab, batch=2, length=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ours_saved_loads_in_transformers_with_same_logits_and_greedy_tokens(family, tmp_path):
    ours = tiny_model(family)
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids).logits
    assert got.shape == expected.shape == (2, 20, ours.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    prompt = ids[:1, :6]
    want = theirs.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0,
                           attention_mask=torch.ones_like(prompt))
    have = ours.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(have, want)


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa-untied", "qwen2"])
def test_transformers_saved_checkpoint_loads_with_same_logits(family, tmp_path):
    hf_config = transformers.AutoConfig.for_model(**GPT4Config(**FAMILIES[family]).to_hf_dict())
    torch.manual_seed(3)
    theirs = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    theirs.save_pretrained(tmp_path)
    ours = GPT4LMHeadModel.from_pretrained(tmp_path)
    ids = _ids(ours.config.vocab_size, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_sharded_save_round_trips(tmp_path):
    ours = tiny_model("llama-gqa-untied")
    ours.save_pretrained(tmp_path, max_shard_size=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    again = GPT4LMHeadModel.from_pretrained(tmp_path)
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_matches_transformers(tmp_path):
    ours = tiny_model("llama-gqa-untied")
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _ids(ours.config.vocab_size, length=10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        want = theirs(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, 4:], want[1, 4:], atol=1e-4, rtol=1e-4)
