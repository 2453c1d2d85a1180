"""Prompt lookup decoding: drafts copied from the text, checked in one pass, the same tokens as plain decoding."""

import inspect
import textwrap

import pytest
import torch

import gpt4.generation as generation
from gpt4 import GenerationConfig, GPT4LMHeadModel
from gpt4.generation import generate_tokens
from gpt4.generation.lookup import PromptLookup
from gpt4.generation.sampling import verify_draft

from .conftest import tiny_model


def test_a_draft_is_what_followed_the_latest_occurrence_of_the_longest_matching_tail():
    #                     0  1  2  3  4  5  6  7  8  9
    lookup = PromptLookup([5, 6, 7, 1, 6, 7, 2, 3, 6, 7], max_ngram=3)
    assert lookup.draft(3) == [2, 3, 6]  # "6 7" last occurred at 4-5 (not at 1-2), followed by 2 3 6
    lookup.append(2)  # tail "6 7 2" occurred at 4-6: followed by 3 6 7 2
    assert lookup.draft(10) == [3, 6, 7, 2]  # runs into the text's tail: up to its end
    assert lookup.draft(0) == []
    lookup.append(9)  # "2 9" never occurred, and single tokens are not matched
    assert lookup.draft(3) == []
    assert PromptLookup([1, 2, 3], max_ngram=3).draft(3) == []  # the tail never matches itself


def test_the_draft_check_keeps_the_prefix_greedy_decoding_agrees_with():
    scores = torch.full((4, 10), -1.0)
    scores[0, 3], scores[1, 5], scores[2, 8], scores[3, 1] = 1, 1, 1, 1  # argmax after each position: 3 5 8 1
    assert verify_draft(scores, [3, 5, 7], do_sample=False) == (2, 8)  # 3, 5 kept; 8 instead of 7
    assert verify_draft(scores, [3, 5, 8], do_sample=False) == (3, 1)  # all kept, then the model's own
    assert verify_draft(scores, [4, 5, 8], do_sample=False) == (0, 3)
    assert verify_draft(scores[:1], [], do_sample=False) == (0, 3)


def test_a_sampled_draft_check_draws_each_token_from_the_models_distribution():
    # The first emitted token is the draft's if kept, else the redraw: its frequencies must be p's, whatever the
    # draft (a likely token, an unlikely one).
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = probs.log().expand(2, 4)
    generator = torch.Generator().manual_seed(0)
    draws = 12000
    for draft in (0, 3):
        counts = torch.zeros(4)
        for _ in range(draws):
            kept, token = verify_draft(scores, [draft], do_sample=True, generator=generator)
            counts[draft if kept else token] += 1
        # 4 standard deviations of a binomial count: fails for a rule that keeps drafts too often or too rarely
        assert torch.all((counts / draws - probs).abs() < 4 * (probs * (1 - probs) / draws).sqrt()), (draft, counts)


def _oracle_drafts(monkeypatch, truth: list[int], prompt_length: int, kept: list[int]):
    """Make PromptLookup draft the true continuation (plain decoding's), with a wrong first token in every third
    draft and a wrong last one in every fourth, so that verification keeps whole drafts, parts of drafts and
    nothing; records the kept counts."""
    calls = []

    def draft(self, max_tokens):
        done = len(self.tokens) - prompt_length
        guess = list(truth[done:done + max_tokens])
        calls.append(None)
        wrong = 0 if len(calls) % 3 == 0 else -1 if len(calls) % 4 == 0 else None
        if guess and wrong is not None:
            guess[wrong] = (guess[wrong] + 1) % 90
        return guess

    real_verify = generation.verify_draft

    def verify(scores, draft, *args):
        result = real_verify(scores, draft, *args)
        kept.append(result[0])
        return result

    monkeypatch.setattr(PromptLookup, "draft", draft)
    monkeypatch.setattr(generation, "verify_draft", verify)


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa-untied", "mistral"])
@pytest.mark.parametrize("penalties", [{}, dict(repetition_penalty=1.3, presence_penalty=0.5,
                                                frequency_penalty=0.4, logit_bias={3: 2.0})])
def test_decoding_with_drafts_gives_the_tokens_of_plain_greedy_decoding(family, penalties, monkeypatch):
    model = tiny_model(family)  # fp32: the multi-position pass rounds like the one-token step
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23]  # longer than mistral's window of 8
    config = GenerationConfig(max_new_tokens=20, eos_token_id=None, **penalties)
    plain = [s[0] for s in generate_tokens(model, [prompt], config)]
    kept = []
    _oracle_drafts(monkeypatch, plain, len(prompt), kept)
    for lookup in (1, 3, 7):
        kept.clear()
        steps = list(generate_tokens(model, [prompt], config.update(prompt_lookup_num_tokens=lookup)))
        assert [s[0] for s in steps] == plain and all(len(s) == 1 for s in steps)
        assert max(kept) == lookup and 0 in kept and sum(kept) >= len(plain) // 3  # whole drafts, none, many tokens
        assert lookup == 1 or any(0 < k < lookup for k in kept)  # and parts


def test_decoding_with_drafts_stops_at_eos_stop_strings_and_the_length_budget(monkeypatch):
    model = tiny_model("llama-gqa-untied")
    prompt = [5, 6, 7, 5, 6]
    free = [s[0] for s in generate_tokens(model, [prompt], GenerationConfig(max_new_tokens=16, eos_token_id=None))]
    _oracle_drafts(monkeypatch, free, len(prompt), [])
    eos = free[6]  # inside a draft: tokens after it must not be emitted
    config = GenerationConfig(max_new_tokens=16, eos_token_id=eos, prompt_lookup_num_tokens=4)
    assert [s[0] for s in generate_tokens(model, [prompt], config)] == free[:free.index(eos) + 1]
    for budget in (1, 2, 5, 9):
        config = GenerationConfig(max_new_tokens=budget, eos_token_id=None, prompt_lookup_num_tokens=4)
        assert [s[0] for s in generate_tokens(model, [prompt], config)] == free[:budget]


def test_sampled_decoding_keeps_drafts_of_the_tokens_it_would_draw(monkeypatch):
    model = tiny_model("qwen2")
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    greedy_config = GenerationConfig(max_new_tokens=12, eos_token_id=None, repetition_penalty=1.2)
    greedy = [s[0] for s in generate_tokens(model, [prompt], greedy_config)]
    # The tiny model's logits are nearly flat: at this temperature sampling draws greedy's tokens (with the
    # sampling rule: each draft token kept with probability p), so drafts of greedy's tokens are kept.
    config = greedy_config.update(do_sample=True, temperature=1e-4, top_k=5, seed=7, prompt_lookup_num_tokens=3)
    runs, kept = [], []
    for _ in range(2):  # the same drafts each time: the draws depend on them
        with monkeypatch.context() as patch:
            _oracle_drafts(patch, greedy, len(prompt), kept)
            runs.append([s[0] for s in generate_tokens(model, [prompt], config)])
    assert runs[0] == runs[1] == greedy and sum(kept) > 0


def test_generation_config_checks_the_lookup_fields():
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        GenerationConfig(prompt_lookup_num_tokens=-1)
    with pytest.raises(ValueError, match="max_matching_ngram_size"):
        GenerationConfig(max_matching_ngram_size=1)


@pytest.fixture(scope="module")
def fp32_default_model():
    return GPT4LMHeadModel.from_pretrained("gpt4", dtype=torch.float32, quant="none")


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.1])
def test_the_default_model_copies_code_in_fewer_passes_with_the_same_tokens(fp32_default_model, repetition_penalty,
                                                                            monkeypatch):
    model = fp32_default_model
    request = ("Rename the variable `margin` to `common_prefix` in this function and return the full code:\n\n"
               + inspect.getsource(textwrap.dedent))
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True)
    config = GenerationConfig(max_new_tokens=60, eos_token_id=model.tokenizer.eos_token_id,
                              repetition_penalty=repetition_penalty)
    plain = [s[0] for s in generate_tokens(model, [prompt], config)]
    passes = []
    real_hidden_states = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda *a, **k: passes.append(1) or real_hidden_states(*a, **k))
    real_decode = model.decode_logits
    monkeypatch.setattr(model, "decode_logits", lambda *a, **k: passes.append(1) or real_decode(*a, **k))
    drafted = [s[0] for s in generate_tokens(model, [prompt], config.update(prompt_lookup_num_tokens=3))]
    assert drafted == plain and len(plain) == 60
    # The code is copied: far fewer passes than tokens without a penalty. A penalty of 1.1 discourages copying
    # (58 passes for 60 tokens, plain decoding's prefill and 59 steps making 60).
    assert len(passes) < (0.5 if repetition_penalty == 1.0 else 1) * len(plain), len(passes)
