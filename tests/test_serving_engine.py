"""The continuous-batching engine used directly: batched = sequential, joins and leaves, stop strings, JSON mode."""

import json
import threading
import time

import pytest

from gpt4.generation import GenerationConfig, generate_tokens
from gpt4.serving.engine import Delta, Engine, Failed, Finish, Request, SamplingParams, Sequence
from gpt4.serving.jsonmode import JSONPrefix
from tests.conftest import tiny_model


class Collector:
    """Gathers the events of one request (called on the engine thread)."""

    def __init__(self, n=1):
        self.n, self.text, self.tokens, self.reasons = n, [""] * n, [[] for _ in range(n)], [None] * n
        self.done = threading.Event()
        self.failed = None

    def __call__(self, event):
        if isinstance(event, Delta):
            self.text[event.index] += event.text
            self.tokens[event.index] += [t.token_id for t in event.tokens]
        elif isinstance(event, Finish):
            self.reasons[event.index] = event.reason
            if all(self.reasons):
                self.done.set()
        elif isinstance(event, Failed):
            self.failed = event.message
            self.done.set()


def run(engine, prompt, n=1, **params):
    c = Collector(n)
    r = Request(prompt, SamplingParams(**{"max_tokens": 12, "temperature": 0, "logprobs": True, **params}), c, n=n)
    engine.submit(r)
    return r, c


class Tok:
    """The engine only decodes text: a tiny one-character-per-token tokenizer is enough for tiny models."""
    all_special_ids = []
    vocab_size = 96

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + i % 90) for i in ids)


def reference(model, prompt, max_tokens):
    """Token ids from the core decode loop (one prompt alone), EOS dropped."""
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=model.generation_config.eos_ids,
                              pad_token_id=0, top_k=None)
    ids = [step[0] for step in generate_tokens(model, [prompt], config)]
    return [t for t in ids if t not in model.generation_config.eos_ids]


@pytest.fixture(scope="module")
def w4a8_default_model():
    """The defaults' model where our kernels run: bf16, w4a8, decode steps fused."""
    from gpt4 import GPT4LMHeadModel

    from .conftest import skip_without_w4a8

    skip_without_w4a8()
    model = GPT4LMHeadModel.from_pretrained("gpt4", dtype="bfloat16", quant="w4a8")
    assert model._fused_decode is not None
    return model


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["default_model", "w4a8_default_model"])
def test_batched_equals_sequential_with_joins_and_leaves(model_name, request):
    """Requests of different lengths join a running batch at different steps; greedy tokens equal one-at-a-time
    (also through the fused decode step, whose rows sit at different positions of a larger cache)."""
    default_model = request.getfixturevalue(model_name)
    tok = default_model.tokenizer
    texts = ["The capital of France is", "def add(a, b):", "Hi", "Water boils at a temperature of",
             "A long time ago in a galaxy far, far away, there", "1, 2, 3, 4,"]
    prompts = [tok.encode(t) for t in texts]
    lengths = [4, 10, 6, 8, 3, 7]  # different lengths: rows leave at different steps
    engine = Engine(default_model, max_batch=3, max_queue=8).start()  # 3 rows for 6 requests: joins mid-run
    try:
        collected = []
        for i, (p, m) in enumerate(zip(prompts, lengths)):
            collected.append(run(engine, p, max_tokens=m)[1])
            if i == 1:
                time.sleep(0.3)  # the first two are decoding when the rest arrive
        for c in collected:
            assert c.done.wait(60) and c.failed is None
    finally:
        engine.stop(30)
    for p, m, c in zip(prompts, lengths, collected):
        assert c.tokens[0] == reference(default_model, p, m)
        assert c.text[0] == tok.decode(c.tokens[0], skip_special_tokens=True)


def test_n_choices_share_the_prefill():
    """n greedy choices are identical to one greedy choice (the prompt rows are copied correctly)."""
    model = tiny_model("llama-gqa-untied")
    model.generation_config = GenerationConfig(eos_token_id=None)
    model.tokenizer = Tok()
    engine = Engine(model, max_batch=8).start()
    try:
        outs = [run(engine, p, n=n, max_tokens=20) for p, n in (([5, 6, 7], 3), ([9] * 11, 1), ([5, 6, 7], 1),
                                                                 ([1, 2], 2))]
        for _, c in outs:
            assert c.done.wait(30) and c.failed is None
    finally:
        engine.stop(30)
    assert outs[0][1].tokens == [outs[2][1].tokens[0]] * 3
    assert outs[3][1].tokens[0] == outs[3][1].tokens[1] and len(outs[0][1].tokens[0]) == 20
    config = GenerationConfig(max_new_tokens=20, do_sample=False, top_k=None)
    assert outs[1][1].tokens[0] == [s[0] for s in generate_tokens(model, [[9] * 11], config)]


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "int8"])
def test_a_bf16_or_int8_cache_serves_shared_prefills_and_leaving_rows(cache_dtype, monkeypatch):
    """The engine's row operations on a bf16 cache (a bf16 model on an AMX CPU) and on an int8 one (rows of values and
    scales): a prefill shared by n choices is copied to their rows, which then decode alike, and a row moves into the
    hole a finished one leaves."""
    import torch

    if cache_dtype == "bfloat16":
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
        model = tiny_model("llama-gqa-untied").to(torch.bfloat16)
    else:
        model = tiny_model("llama-gqa-untied", hidden_size=128)  # heads of 32: int8 rows hold groups of 32
        model.kv_cache_dtype = torch.int8
    model.generation_config = GenerationConfig(eos_token_id=None)
    model.tokenizer = Tok()
    assert model.new_cache(1, 8).keys[0].dtype == getattr(torch, cache_dtype)
    engine = Engine(model, max_batch=4).start()
    try:
        # Rows 0-1: the two choices; row 2 leaves after 5 tokens, and row 3 moves into it.
        outs = [run(engine, p, n=n, max_tokens=m)[1] for p, n, m in (([5, 6, 7], 2, 20), ([1, 2], 1, 5),
                                                                     ([9] * 11, 1, 40))]
        for c in outs:
            assert c.done.wait(60) and c.failed is None
    finally:
        engine.stop(30)
    assert outs[0].tokens[0] == outs[0].tokens[1] and len(outs[0].tokens[0]) == 20
    assert [len(outs[1].tokens[0]), len(outs[2].tokens[0])] == [5, 40] and outs[2].reasons == ["length"]


@pytest.mark.parametrize("params", [dict(), dict(stop="first"), dict(repetition_penalty=1.3, presence_penalty=0.4,
                                                                   frequency_penalty=0.3, logit_bias={3: 1.0})])
def test_a_request_decoding_alone_checks_drafts_with_the_tokens_of_plain_decoding(params, monkeypatch):
    """--prompt-lookup: a request alone gets drafts (whole, partly and not at all kept) and the same tokens, text,
    log-probabilities and finish as without; two choices decode together, one token a step."""
    from gpt4.serving import engine as engine_module

    from .test_prompt_lookup import _oracle_drafts

    model = tiny_model("mistral")  # a sliding window of 8 over a longer prompt
    model.generation_config = GenerationConfig(eos_token_id=None)
    model.tokenizer = Tok()
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23]

    produced = []  # tokens a step

    def serve(lookup, n=1, **extra):
        produced.clear()
        engine = Engine(model, max_batch=4, prompt_lookup=lookup, on_step=produced.append).start()
        try:
            _, c = run(engine, prompt, n=n, max_tokens=24, **extra)
            assert c.done.wait(60) and c.failed is None
        finally:
            engine.stop(30)
        return c

    free = serve(0)
    if params.get("stop") == "first":  # a stop string that a draft runs past: the text of the 10th token
        params = dict(stop=[Tok().decode([free.tokens[0][9]])])
    plain = serve(0, **params)
    _oracle_drafts(monkeypatch, free.tokens[0], len(prompt), [])
    kept = []
    real = engine_module.choose_over_draft
    monkeypatch.setattr(engine_module, "choose_over_draft",
                        lambda scores, token, *a: (lambda t: kept.append(t == token) or t)(real(scores, token, *a)))
    drafted = serve(3, **params)
    assert (drafted.tokens, drafted.text, drafted.reasons) == (plain.tokens, plain.text, plain.reasons)
    assert True in kept and False in kept and max(produced) > 1  # several tokens in some steps
    kept.clear()
    both = serve(3, n=2, **params)
    assert both.tokens == plain.tokens * 2 and not kept


@pytest.mark.slow
def test_cancel_leaves_within_a_step_and_others_continue(default_model):
    tok = default_model.tokenizer
    engine = Engine(default_model, max_batch=4).start()
    try:
        ban = {e: -100.0 for e in default_model.generation_config.eos_ids}
        long_req, long_c = run(engine, tok.encode("Count:"), max_tokens=500, logit_bias=ban)
        _, short_c = run(engine, tok.encode("The capital of France is"), max_tokens=8)
        deadline = time.monotonic() + 20
        while not long_c.tokens[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        long_req.cancel()
        deadline = time.monotonic() + 5
        while engine.active > (0 if short_c.done.is_set() else 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert short_c.done.wait(30) and short_c.reasons == ["length"]
        assert long_c.done.wait(5) and long_c.reasons == ["cancelled"]  # its end is reported: nobody hangs
        assert engine.active == 0 and len(long_c.tokens[0]) < 500
    finally:
        engine.stop(30)


def test_an_idle_engine_gives_its_kv_cache_memory_back(monkeypatch):
    """Idle for idle_release_s, the engine drops the cache and hands freed heap to the OS, once per busy spell (a
    server that once served a burst of long prompts stayed resident at 1.8 GB without the second step, 0.4 GB with
    it). A request in the meantime finds the cache still there."""
    import gpt4.serving.engine as engine_module

    trims = []
    monkeypatch.setattr(engine_module, "return_freed_memory", lambda: trims.append(engine.cache))
    model = tiny_model("gpt2")
    model.generation_config = GenerationConfig(eos_token_id=None)
    model.tokenizer = Tok()
    engine = Engine(model, max_batch=2, idle_release_s=0.5).start()
    try:
        for spell in (1, 2):
            _, c = run(engine, [5, 6, 7], max_tokens=4)
            assert c.done.wait(30) and c.failed is None
            cache = engine.cache
            _, c = run(engine, [8, 9], max_tokens=4)  # soon after: the same cache, nothing given back
            assert c.done.wait(30) and c.failed is None and engine.cache is cache and len(trims) == spell - 1
            deadline = time.monotonic() + 10
            while len(trims) < spell and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.7)  # no second trim while it stays idle
            assert trims == [None] * spell and engine.cache is None  # the cache was dropped before trimming
    finally:
        engine.stop(30)


def test_queue_bound_and_draining():
    from gpt4.serving.engine import Draining, QueueFull

    model = tiny_model("gpt2")
    model.generation_config = GenerationConfig(eos_token_id=None)
    model.tokenizer = Tok()
    engine = Engine(model, max_batch=1, max_queue=2)  # not started: requests stay queued
    for _ in range(2):
        engine.submit(Request([1, 2], SamplingParams(max_tokens=1), lambda e: None))
    with pytest.raises(QueueFull):
        engine.submit(Request([1, 2], SamplingParams(max_tokens=1), lambda e: None))
    engine.draining = True
    with pytest.raises(Draining):
        engine.submit(Request([1], SamplingParams(max_tokens=1), lambda e: None))


# ---- stop strings and text hold-back (no model needed) --------------------------------------------------
class Pieces:
    """A Sequence fed with given text pieces, recording what it emits."""

    def __init__(self, stops):
        self.events = []
        req = Request([1], SamplingParams(max_tokens=100, stop=stops), self.events.append)
        self.seq = Sequence.__new__(Sequence)
        self.seq.request, self.seq.index, self.seq.pending, self.seq.pending_tokens = req, 0, "", []
        self.seq.finish_reason = None

    def feed(self, *pieces):
        for p in pieces:
            self.seq.push_text(p, None)
            if self.seq.finish_reason:
                break
        else:
            self.seq.flush()
        return [e.text for e in self.events]


def test_stop_string_split_over_tokens_is_never_emitted():
    out = Pieces(["END"]).feed("Hello E", "N", "D more")
    assert "".join(out) == "Hello " and out[0] == "Hello "  # "E" was held, then dropped with the stop


def test_held_text_that_is_not_a_stop_goes_out():
    out = Pieces(["\n\nUser:"]).feed("a\n", "\nUs", "es", " x")
    assert "".join(out) == "a\n\nUses x"
    assert out[0] == "a"  # the newline that may start the stop string waits


def test_no_stops_means_no_holding():
    assert Pieces([]).feed("a", "b") == ["a", "b"]


# ---- JSON mode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ['{}', ' {"a": [1, -0.5, 2e10, true, false, null, "x\\"y\\u00e9"], "b": {}}\n',
                                  '{"k": [[], [{}]], "n": -0}'])
def test_json_prefix_accepts_valid_objects(text):
    json.loads(text)
    j = JSONPrefix()
    assert j.feed(text) and j.done


@pytest.mark.parametrize("text", ['[1]', '"s"', '{"a" 1}', '{"a": 01}', '{"a": 1,}', '{,}', '{"a": tru }',
                                  '{"a": "x\ny"}', '{} {}', '{"a": .5}', '{"a": 1.}', '{"a": -}', "{'a': 1}"])
def test_json_prefix_rejects_invalid(text):
    j = JSONPrefix()
    assert not (j.feed(text) and j.done)


def test_json_prefix_incomplete_is_not_done():
    j = JSONPrefix()
    assert j.feed('{"a": [1, 2') and not j.done
    assert j.accepts("]}") and not j.accepts("}")


@pytest.mark.slow
def test_json_mode_sampled_outputs_parse(default_model):
    tok = default_model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a dog as a JSON object."}],
                                     add_generation_prompt=True)
    engine = Engine(default_model, max_batch=4).start()
    try:
        _, c = run(engine, prompt, n=3, max_tokens=80, temperature=0.7, seed=7, json_mode=True, top_p=0.95)
        assert c.done.wait(120) and c.failed is None
    finally:
        engine.stop(30)
    for text, reason in zip(c.text, c.reasons):
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_tokens: still a prefix of a JSON object
            assert JSONPrefix().feed(text)
    assert "stop" in c.reasons
