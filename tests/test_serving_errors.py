"""Malformed and hostile requests: each gets a 4xx in OpenAI's envelope, none a 5xx, and the server stays healthy."""

import json

import httpx
import pytest

from tests.test_serving_support import LiveServer

pytestmark = pytest.mark.slow
MSG = [{"role": "user", "content": "hi"}]
OK = {"model": "gpt4", "messages": MSG, "max_tokens": 2}
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"

# (method, path, body: dict -> JSON, str/bytes -> raw, headers, expected status, expected param or None)
CASES = [
    ("POST", CHAT, "{not json", {}, 400, None),
    ("POST", CHAT, "", {}, 400, None),
    ("POST", CHAT, b"\xff\xfe\x00garbage", {}, 400, None),
    ("POST", CHAT, "[1, 2, 3]", {}, 400, None),
    ("POST", CHAT, "null", {}, 400, None),
    ("POST", CHAT, {"messages": MSG}, {}, 400, "model"),
    ("POST", CHAT, {"model": "gpt4"}, {}, 400, "messages"),
    ("POST", CHAT, {**OK, "messages": []}, {}, 400, "messages"),
    ("POST", CHAT, {**OK, "messages": "hi"}, {}, 400, "messages"),
    ("POST", CHAT, {**OK, "messages": [{"role": "wizard", "content": "hi"}]}, {}, 400, None),
    ("POST", CHAT, {**OK, "messages": [{"content": "hi"}]}, {}, 400, None),
    ("POST", CHAT, {**OK, "messages": [{"role": "user", "content": 5}]}, {}, 400, None),
    ("POST", CHAT, {**OK, "messages": [{"role": "user"}]}, {}, 400, "messages[0].content"),
    ("POST", CHAT, {**OK, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x/y.png"}}]}]}, {}, 400, "messages[0].content[0].type"),
    ("POST", CHAT, {**OK, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, {}, 400, None),
    ("POST", CHAT, {**OK, "model": 42}, {}, 400, "model"),
    ("POST", CHAT, {**OK, "model": "no-such-model"}, {}, 404, "model"),
    ("POST", CHAT, {**OK, "temperature": "hot"}, {}, 400, "temperature"),
    ("POST", CHAT, {**OK, "temperature": "0.5"}, {}, 400, "temperature"),
    ("POST", CHAT, {**OK, "temperature": -1}, {}, 400, "temperature"),
    ("POST", CHAT, {**OK, "temperature": 2.5}, {}, 400, "temperature"),
    ("POST", CHAT, {**OK, "top_p": 1.5}, {}, 400, "top_p"),
    ("POST", CHAT, {**OK, "max_tokens": 0}, {}, 400, "max_tokens"),
    ("POST", CHAT, {**OK, "max_tokens": -5}, {}, 400, "max_tokens"),
    ("POST", CHAT, {**OK, "max_tokens": 1.5}, {}, 400, "max_tokens"),
    ("POST", CHAT, {**OK, "max_tokens": True}, {}, 400, "max_tokens"),
    ("POST", CHAT, {**OK, "max_tokens": 10 ** 30}, {}, 400, None),
    ("POST", CHAT, {**OK, "max_completion_tokens": 100000}, {}, 400, "messages"),
    ("POST", CHAT, {**OK, "n": 0}, {}, 400, "n"),
    ("POST", CHAT, {**OK, "n": 1000}, {}, 400, "n"),
    ("POST", CHAT, {**OK, "n": 64}, {}, 400, "n"),  # more than the server's batch rows
    ("POST", CHAT, {**OK, "stop": ["a", "b", "c", "d", "e"]}, {}, 400, "stop"),
    ("POST", CHAT, {**OK, "stop": [1]}, {}, 400, "stop"),
    ("POST", CHAT, {**OK, "stop": ""}, {}, 400, "stop"),
    ("POST", CHAT, {**OK, "presence_penalty": 3}, {}, 400, "presence_penalty"),
    ("POST", CHAT, {**OK, "frequency_penalty": -2.5}, {}, 400, "frequency_penalty"),
    ("POST", CHAT, {**OK, "logit_bias": {"abc": 1}}, {}, 400, "logit_bias"),
    ("POST", CHAT, {**OK, "logit_bias": {"99999999": 1}}, {}, 400, "logit_bias"),
    ("POST", CHAT, {**OK, "logit_bias": {"5": 500}}, {}, 400, "logit_bias"),
    ("POST", CHAT, {**OK, "logit_bias": {"-1": 5}}, {}, 400, "logit_bias"),
    ("POST", CHAT, {**OK, "logit_bias": [1, 2]}, {}, 400, "logit_bias"),
    ("POST", CHAT, {**OK, "top_logprobs": 5}, {}, 400, None),
    ("POST", CHAT, {**OK, "logprobs": True, "top_logprobs": 21}, {}, 400, "top_logprobs"),
    ("POST", CHAT, {**OK, "seed": "abc"}, {}, 400, "seed"),
    ("POST", CHAT, {**OK, "stream": "yes"}, {}, 400, "stream"),
    ("POST", CHAT, {**OK, "stream_options": {"include_usage": True}}, {}, 400, None),
    ("POST", CHAT, {**OK, "response_format": {"type": "xml"}}, {}, 400, None),
    ("POST", CHAT, {**OK, "messages": [{"role": "user", "content": "x " * 9000}]}, {}, 400, "messages"),
    ("POST", CHAT, {**OK, "messages": [{"role": "user", "content": "{{ 7*7 }}{% raise %}"}]}, {}, 200, None),
    ("POST", CHAT, {**OK, "messages": [{"role": "user", "content": "\u0000\ud7ff\U0001F600" * 10}]}, {}, 200, None),
    ("POST", CHAT, json.dumps(OK), {"content-type": "text/plain"}, 200, None),
    ("POST", CHAT, "[" * 100000, {}, 400, None),
    ("POST", TEXT, {"model": "gpt4"}, {}, 400, "prompt"),
    ("POST", TEXT, {"model": "gpt4", "prompt": ""}, {}, 400, "prompt"),
    ("POST", TEXT, {"model": "gpt4", "prompt": []}, {}, 400, "prompt"),
    ("POST", TEXT, {"model": "gpt4", "prompt": [10 ** 9]}, {}, 400, "prompt"),
    ("POST", TEXT, {"model": "gpt4", "prompt": [[1, 2], []]}, {}, 400, "prompt"),
    ("POST", TEXT, {"model": "gpt4", "prompt": [1, "a"]}, {}, 400, "prompt"),
    ("POST", TEXT, {"model": "gpt4", "prompt": "x", "logprobs": 6}, {}, 400, "logprobs"),
    ("POST", TEXT, {"model": "gpt4", "prompt": "x", "suffix": "y"}, {}, 400, "suffix"),
    ("POST", TEXT, {"model": "gpt4", "prompt": "x", "best_of": 3}, {}, 400, "best_of"),
    ("GET", CHAT, None, {}, 405, None),
    ("DELETE", "/v1/models", None, {}, 405, None),
    ("GET", "/v1/nope", None, {}, 404, None),
    ("GET", "/v1/models/unknown", None, {}, 404, "model"),
    ("GET", "/../../etc/passwd", None, {}, 404, None),
    ("GET", "/static/../app.py", None, {}, 404, None),
]


@pytest.fixture(scope="module")
def server(default_model):
    s = LiveServer({"gpt4": default_model}, max_batch=4, max_body_bytes=200_000)
    yield s
    s.close()


def send(url, method, path, body, headers):
    content = json.dumps(body).encode() if isinstance(body, dict) else (
        body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body)
    if isinstance(body, dict) or (isinstance(body, str) and "content-type" not in headers):
        headers = {"content-type": "application/json", **headers}
    with httpx.Client(timeout=60) as c:
        return c.request(method, url + path, content=content, headers=headers)


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c[0]}-{c[1]}" for i, c in enumerate(CASES)])
def test_bad_request(server, case):
    method, path, body, headers, status, param = case
    r = send(server.url, method, path, body, headers)
    assert r.status_code == status, r.text
    if status >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if param is not None:
            assert error["param"] == param, error


def test_hostile_transport(server):
    """Raw sockets: a truncated body, a lying Content-Length, a huge header line, an early close."""
    import socket

    host, port = server.url[len("http://"):].split(":")
    payloads = [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"model\"",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{\"model\": \"gpt4\"}",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"NONSENSE\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]
    for raw in payloads:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            try:
                reply = sock.recv(200)
            except (socket.timeout, ConnectionResetError):
                reply = b""
        assert not reply.startswith(b"HTTP/1.1 5"), reply


def test_server_is_healthy_afterwards(server):
    assert server.health() == 200
    assert server.wait_idle(10)
    r = httpx.post(server.url + CHAT, json={**OK, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert ' status="5' not in httpx.get(server.url + "/metrics").text
