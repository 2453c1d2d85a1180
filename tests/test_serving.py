"""The OpenAI-compatible server against the official `openai` SDK and raw HTTP, with the real default model."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from tests.test_serving_support import LiveServer, no_eos  # noqa: E402

pytestmark = pytest.mark.slow
MSG = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(default_model):
    s = LiveServer({"gpt4": default_model}, max_batch=8, max_queue=16)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, **kw):
    return client.chat.completions.create(**{"model": "gpt4", "messages": MSG, "max_tokens": 12, "temperature": 0, **kw})


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["gpt4"]
    assert client.models.retrieve("gpt4").id == "gpt4"
    assert server.health() == 200


def test_chat_completion_shape(client, default_model):
    r = chat(client)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "gpt4"
    assert r.system_fingerprint.startswith("fp_") and abs(r.created - time.time()) < 120
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    prompt = default_model.tokenizer.apply_chat_template(MSG, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens <= len(prompt) + 12


def test_chat_matches_the_core_generate(client, default_model):
    """Greedy server output equals the package's own generate() (independent decode loop)."""
    prompt = default_model.tokenizer.apply_chat_template(MSG, add_generation_prompt=True)
    ids = default_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    ids = [t for t in ids.tolist() if t not in default_model.generation_config.eos_ids]
    assert chat(client).choices[0].message.content == default_model.tokenizer.decode(ids, skip_special_tokens=True)


def test_completions_several_prompts(client):
    r = client.completions.create(model="gpt4", prompt=["The capital of France is", "1, 2, 3,"], max_tokens=5,
                                  temperature=0)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    single = client.completions.create(model="gpt4", prompt="1, 2, 3,", max_tokens=5, temperature=0)
    assert r.choices[1].text == single.choices[0].text and r.choices[1].text
    ids = client.completions.create(model="gpt4", prompt=[16, 28, 217], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_echo_with_logprobs_scores_the_prompt_like_the_model(client, default_model):
    """completions with echo, logprobs and max_tokens 0 (how lm-eval-harness scores through an API)."""
    ids = default_model.tokenizer.encode("The capital of France is Paris.")
    r = client.completions.create(model="gpt4", prompt=ids, echo=True, logprobs=2, max_tokens=0, temperature=0)
    (c,) = r.choices
    assert c.text == default_model.tokenizer.decode(ids) and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    with torch.no_grad():
        logits = default_model(torch.tensor([ids])).logits[0, :-1].float()  # (S-1, V)
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), want, atol=2e-3, rtol=0)
    streamed = list(client.completions.create(model="gpt4", prompt=ids, echo=True, logprobs=2, max_tokens=0,
                                              temperature=0, stream=True))
    assert streamed[0].choices[0].text == c.text
    assert streamed[0].choices[0].logprobs.token_logprobs == lp.token_logprobs
    assert streamed[-1].choices[0].finish_reason == "length"
    more = client.completions.create(model="gpt4", prompt=ids, echo=True, logprobs=1, max_tokens=3, temperature=0)
    m = more.choices[0]
    assert m.text.startswith(c.text) and len(m.logprobs.tokens) == len(ids) + 3
    assert m.logprobs.token_logprobs[0] is None
    assert m.logprobs.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="gpt4", prompt=ids, max_tokens=0)


def test_stream_concatenates_to_the_whole_reply(client):
    whole = chat(client, max_tokens=24)
    chunks = list(chat(client, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_equals_whole(client):
    kw = dict(model="gpt4", prompt="Once upon a time", max_tokens=16, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices) == whole


def test_n_choices_and_seed_determinism(client):
    kw = dict(n=3, temperature=1.0, max_tokens=10, seed=1234)
    a, b = chat(client, **kw), chat(client, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.system_fingerprint == b.system_fingerprint
    assert len({c.message.content for c in a.choices}) > 1, "choices of one request must differ"
    other = chat(client, **{**kw, "seed": 99})
    assert [c.message.content for c in other.choices] != [c.message.content for c in a.choices]
    streamed = chat(client, stream=True, **kw)
    texts = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in a.choices]


def test_stop_strings_across_token_boundaries(client, default_model):
    full = chat(client, max_tokens=24).choices[0].message.content
    # A stop string that starts inside one token and ends inside a later one.
    tokens = [default_model.tokenizer.decode([t]) for t in default_model.tokenizer.encode(full)]
    start = len(tokens[0]) + len(tokens[1]) - 1
    stop = full[start:start + 4]
    assert len(stop) == 4 and stop not in full[:start]
    r = chat(client, max_tokens=24, stop=[stop, "ZZZ-never"])
    assert r.choices[0].message.content == full[:start] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, max_tokens=24, stop=stop, stream=True)
                       if c.choices)
    assert streamed == full[:start]


def test_logprobs_are_the_models_log_softmax(client, default_model):
    r = chat(client, max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    prompt = default_model.tokenizer.apply_chat_template(MSG, add_generation_prompt=True)
    with torch.no_grad():
        expected = torch.log_softmax(default_model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    first = content[0]
    top = torch.topk(expected, 3)
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
    assert first.token == default_model.tokenizer.decode([int(top.indices[0])])  # greedy = the most likely
    assert first.logprob == pytest.approx(float(top.values[0]), abs=1e-3)
    assert bytes(first.bytes).decode() == first.token
    text = client.completions.create(model="gpt4", prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3 and lp.text_offset[0] == 0


def test_json_mode_gives_valid_json(client):
    messages = [{"role": "user", "content": "Reply with a JSON object with keys name and age for Alice, 30."}]
    for temperature in (0, 0.8):
        r = client.chat.completions.create(model="gpt4", messages=messages, max_tokens=60, temperature=temperature,
                                           seed=3, response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError):  # OpenAI's rule: the messages must mention JSON
        chat(client, response_format={"type": "json_object"})


def test_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, model="gpt-4o")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=9000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        chat(client, messages=[])
    with pytest.raises(openai.BadRequestError):
        chat(client, messages=[{"role": "wizard", "content": "hi"}])


# ---- concurrency ---------------------------------------------------------------------------------------
PROMPTS = ["Write a haiku about rain.", "What is 2+2?", "Say hello in French.", "List two fruits.",
           "Describe the sea in one sentence.", "Who wrote Hamlet?"]


def stream_text(url, prompt, max_tokens=16):
    body = {"model": "gpt4", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    text, done = "", False
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                text += "".join(c["delta"].get("content", "") for c in chunk["choices"])
    assert done
    return text


def test_concurrent_streams_equal_one_at_a_time(server):
    alone = [stream_text(server.url, p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: stream_text(server.url, p), PROMPTS))
    assert together == alone
    assert server.wait_idle()


def test_disconnect_frees_the_row(server, default_model):
    body = {"model": "gpt4", "messages": MSG, "max_tokens": 400, "temperature": 0, "stream": True,
            "logit_bias": no_eos(default_model)}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert server.engine().active == 1
    assert server.wait_idle(5), "a closed stream must free its row"
    # Non-streaming: the client gives up (timeout) and the server notices.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
    assert server.wait_idle(5)
    assert server.health() == 200


def test_queue_overflow_is_429(default_model):
    s = LiveServer({"gpt4": default_model}, max_batch=1, max_queue=1)
    try:
        # 2000 tokens: the running reply must outlast every request below (300 ended in between once, in CI-like
        # load); closing the streams cancels both replies, so the test does not wait for them.
        body = {"model": "gpt4", "messages": MSG, "max_tokens": 2000, "temperature": 0, "stream": True,
                "logit_bias": no_eos(default_model)}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as running:
            # Keep the line iterator: a dropped one closes the connection, which cancels the reply (the cause of
            # this test's rare failures, when the second request arrived after the cancellation freed the row).
            running_lines = running.iter_lines()
            next(running_lines)
            with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as queued:
                assert queued.status_code == 200
                # On a loaded machine the second request can take seconds to reach the queue; until it does, a
                # third would be queued too (and wait out the 2000 tokens) rather than refused.
                deadline = time.monotonic() + 30
                while s.engine().queue_depth < 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert s.engine().queue_depth == 1, "the second request never reached the queue"
                r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
                client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    client.chat.completions.create(model="gpt4", messages=MSG, max_tokens=2)
        assert s.wait_idle(5)
        metrics = httpx.get(s.url + "/metrics").text
        assert 'gpt4_requests_total{route="/v1/chat/completions",status="429"} 2' in metrics
        assert "gpt4_queue_depth 0" in metrics and "gpt4_generation_tokens_total" in metrics
        assert "gpt4_time_to_first_token_seconds_count" in metrics
    finally:
        s.close()


def test_api_key_and_body_limit(default_model):
    s = LiveServer({"gpt4": default_model}, api_key="sk-test", max_body_bytes=50_000)
    try:
        assert s.health() == 200
        for path in ("/v1/models", "/metrics", "/", "/static/app.js"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert "basic" in httpx.get(s.url + "/").headers["www-authenticate"].lower()
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sk-test"}).status_code == 200
        assert httpx.get(s.url + "/", auth=("anyone", "sk-test")).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test", max_retries=0)
        assert good.chat.completions.create(model="gpt4", messages=MSG, max_tokens=2).choices
        big = {"model": "gpt4", "messages": [{"role": "user", "content": "x" * 60_000}]}
        r = httpx.post(s.url + "/v1/chat/completions", json=big, headers={"Authorization": "Bearer sk-test"})
        assert r.status_code == 413 and "error" in r.json()
    finally:
        s.close()


def test_health_is_503_while_loading(default_model):
    release = threading.Event()

    def loader():
        release.wait(30)
        return {"gpt4": default_model}

    s = LiveServer(loader)
    try:
        assert s.health() == 503
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "gpt4", "messages": MSG})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        deadline = time.monotonic() + 10
        while s.health() != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.health() == 200
    finally:
        s.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_drains_and_exits(default_model):
    """The real `gpt4 serve` process: SIGTERM lets a running stream finish, refuses new work, exits 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "gpt4", "serve", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        body = {"model": "gpt4", "messages": MSG, "max_tokens": 30, "temperature": 0, "stream": True,
                "logit_bias": no_eos(default_model), "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        usage = json.loads([x for x in rest if x.startswith("data: {")][-1][6:])["usage"]
        assert usage["completion_tokens"] == 30
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
