"""The OpenAI-compatible HTTP API (FastAPI) over one continuous-batching engine per served model.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET /metrics, and the chat
page at /. Every error, including the ones FastAPI and Starlette raise themselves, is answered in OpenAI's
envelope {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GPT4Error
from .engine import (Delta, Draining, Engine, Failed, Finish, PromptLogprobs, QueueFull, Request as EngineRequest,
                     SamplingParams)
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger("gpt4.serving")
STATIC = Path(__file__).parent / "static"
PAGE_PATHS = ("/", "/static/")  # answered 401 with a Basic challenge, so a browser asks for the key


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_body_bytes: int = 4 * 1024 * 1024
    prompt_lookup: int = 0  # draft tokens checked a step for a request decoding alone (Engine)


@dataclass
class Served:
    name: str
    model: object
    engine: Engine


@dataclass
class State:
    config: ServerConfig
    metrics: Metrics = field(default_factory=Metrics)
    served: dict[str, Served] = field(default_factory=dict)
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    fingerprint: str = ""

    def model(self, name: str) -> Served:
        if not self.ready:
            raise APIError(503, "The model is still loading; retry in a few seconds (see GET /health).",
                           type="server_error", code="model_loading", headers={"Retry-After": "2"})
        if name not in self.served:
            raise APIError(404, f"The model '{name}' does not exist. Served models: {', '.join(self.served)}.",
                           param="model", code="model_not_found")
        return self.served[name]


def create_app(models: dict[str, object] | Callable[[], dict[str, object]],
               config: ServerConfig | None = None, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The app for named models, or for a loader called in the background (GET /health is 503 until done).
    on_ready is called once the models serve (after loading and, for compiled models, compiling)."""
    state = State(config or ServerConfig())

    def install(loaded: dict[str, object]) -> None:
        for name, model in loaded.items():
            engine = Engine(model, state.config.max_batch, state.config.max_queue,
                            on_step=state.metrics.generated, prompt_lookup=state.config.prompt_lookup).start()
            state.served[name] = Served(name, model, engine)
        names = "|".join(f"{n}:{m.config.model_type}:{m.dtype}" for n, m in loaded.items())
        state.fingerprint = "fp_" + hashlib.sha256(f"{names}|torch {torch.__version__}".encode()).hexdigest()[:10]
        state.ready = True
        if on_ready is not None:
            on_ready()

    def load_in_background() -> None:
        try:
            install(models())
        except GPT4Error as e:
            state.load_error = str(e)
            log.error("could not load the model: %s", e)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if callable(models):
            threading.Thread(target=load_in_background, name="gpt4-load", daemon=True).start()
        else:
            install(models)
        yield
        state.draining = True
        for served in state.served.values():
            await asyncio.to_thread(served.engine.stop)

    app = FastAPI(title="gpt4 OpenAI-compatible API", version="1", lifespan=lifespan)
    app.state.gpt4 = state
    _install_error_handlers(app)

    @app.get("/health")
    async def health():
        if state.load_error:
            return JSONResponse({"status": "error", "message": state.load_error}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "draining" if state.draining else "ok", "models": list(state.served)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        engines = [s.engine for s in state.served.values()]
        return PlainTextResponse(state.metrics.render(queue=sum(e.queue_depth for e in engines),
                                                      running=sum(e.active for e in engines)),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        if not state.ready:
            state.model("")  # raises the 'still loading' error
        return {"object": "list", "data": [_model_card(s) for s in state.served.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        return _model_card(state.model(name))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        served = state.model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages[{i}]")}
                    for i, m in enumerate(body.messages)]
        if body.response_format and body.response_format.type == "json_object" \
                and not any("json" in m["content"].lower() for m in messages):
            raise APIError(400, "'messages' must contain the word 'json' in some form, to use 'response_format' "
                                "of type 'json_object'.", param="messages")
        try:
            prompt = served.model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # the template's own raise_exception (e.g. roles out of order)
            raise APIError(400, f"The messages do not fit this model's chat template: {e}", param="messages")
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = _sampling(body, served, [prompt], max_tokens, "messages")
        params.logprobs, params.top_logprobs = bool(body.logprobs), body.top_logprobs or 0
        params.json_mode = bool(body.response_format and body.response_format.type == "json_object")
        job = Job(state, served, "chat", [prompt], params, body.n or 1, request)
        return await job.respond(bool(body.stream), bool(body.stream_options and body.stream_options.include_usage))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        served = state.model(body.model)
        tok = served.model.tokenizer
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported by this server.", param="suffix")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise APIError(400, "best_of other than n is not supported by this server.", param="best_of")
        raw = body.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in raw]
        if any(not p for p in prompts):
            raise APIError(400, "The prompt is empty; give at least one token of text.", param="prompt")
        if any(t >= served.model.config.vocab_size for p in prompts for t in p):
            raise APIError(400, f"A prompt token id is outside the vocabulary [0, {served.model.config.vocab_size}).",
                           param="prompt")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 generates nothing; it is only allowed with echo (to score the prompt).",
                           param="max_tokens")
        params = _sampling(body, served, prompts, 16 if body.max_tokens is None else body.max_tokens, "prompt")
        params.logprobs, params.top_logprobs = body.logprobs is not None, body.logprobs or 0
        params.prompt_logprobs = bool(body.echo) and params.logprobs
        echo = [tok.decode(p) for p in prompts] if body.echo else None
        job = Job(state, served, "text", prompts, params, body.n or 1, request, echo=echo)
        return await job.respond(bool(body.stream), bool(body.stream_options and body.stream_options.include_usage))

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return Guard(app, state)


def _model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "gpt4",
            "context_length": served.model.config.max_position_embeddings}


def _sampling(body, served: Served, prompts: list[list[int]], max_tokens: int | None, what: str) -> SamplingParams:
    """SamplingParams from the fields chat and completions share; checks the context length."""
    context = served.model.config.max_position_embeddings
    longest = max(map(len, prompts))
    wanted = max_tokens if max_tokens is not None else context - longest
    if longest + max(wanted, 0 if max_tokens == 0 else 1) > context:  # 0: prompt scoring (echo) only
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{longest + wanted} tokens ({longest} in the {what}, {wanted} in the completion). "
                            f"Please reduce the length of the {what} or completion.",
                       param=what, code="context_length_exceeded")
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= served.model.config.vocab_size:
            raise APIError(400, f"logit_bias key {key!r} is not a token id of this model "
                                f"(0..{served.model.config.vocab_size - 1}).", param="logit_bias")
        bias[int(key)] = float(value)
    n = body.n or 1
    if n > served.engine.max_batch:
        raise APIError(400, f"n={n} is more than this server's {served.engine.max_batch} batch rows "
                            "(start it with a larger --max-batch).", param="n")
    return SamplingParams(
        max_tokens=wanted, temperature=1.0 if body.temperature is None else float(body.temperature),
        top_p=1.0 if body.top_p is None else float(body.top_p), top_k=body.top_k or None,
        presence_penalty=float(body.presence_penalty or 0), frequency_penalty=float(body.frequency_penalty or 0),
        repetition_penalty=float(body.repetition_penalty or 1.0), logit_bias=bias or None, stop=body.stop_list(),
        seed=body.seed)


class Job:
    """One API request: its engine requests (one per prompt), the events they send, the response."""

    def __init__(self, state: State, served: Served, kind: str, prompts: list[list[int]], params: SamplingParams,
                 n: int, http: Request, echo: list[str] | None = None):
        self.state, self.served, self.kind, self.http, self.n, self.echo = state, served, kind, http, n, echo
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.prompt_tokens = sum(map(len, prompts))
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emitter(j):
            def emit(event):  # engine thread -> event loop
                if not loop.is_closed():
                    loop.call_soon_threadsafe(self.events.put_nowait, (j, event))
            return emit

        self.requests = [EngineRequest(p, params, emitter(j), n=n) for j, p in enumerate(prompts)]
        self.prompt_scores: list[list | None] = [None] * len(prompts)  # per prompt, when echo asks for logprobs
        self.params = params
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.completion_tokens = 0

    def submit(self) -> None:
        if self.state.draining:
            raise APIError(503, "The server is shutting down; retry against another instance.", type="server_error",
                           code="server_shutting_down")
        try:
            for r in self.requests:
                self.served.engine.submit(r)
        except (QueueFull, Draining) as e:
            self.cancel()
            if isinstance(e, Draining):
                raise APIError(503, "The server is shutting down.", type="server_error", code="server_shutting_down")
            raise APIError(429, "The server is busy: its request queue is full. Retry after a moment.",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.state.metrics.prompt(self.prompt_tokens)

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    async def events_until_done(self):
        """Yield (choice index, event) until every choice finished; Failed ends the job."""
        left = len(self.requests) * self.n
        while left:
            j, event = await self.events.get()
            if isinstance(event, Failed):
                yield None, event
                return
            if isinstance(event, PromptLogprobs):
                self.prompt_scores[j] = event.tokens
                yield j * self.n, event  # streaming sends the echo with its logprobs now
                continue
            index = j * self.n + event.index
            if isinstance(event, Finish):
                left -= 1
                self.completion_tokens += event.completion_tokens
            elif self.first_token is None and event.text:
                self.first_token = time.perf_counter()
                self.state.metrics.ttft(self.first_token - self.start)
            yield index, event

    async def respond(self, stream: bool, include_usage: bool):
        self.submit()
        if stream:
            return StreamingResponse(self._sse(include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole()

    # ---- non-streaming -------------------------------------------------------------------------------
    async def _whole(self):
        total = len(self.requests) * self.n
        texts, tokens, reasons = [""] * total, [[] for _ in range(total)], [None] * total
        if self.echo:
            for i in range(total):
                texts[i] = self.echo[i // self.n]
        events = self.events_until_done()
        watcher = asyncio.ensure_future(self._watch_disconnect())
        try:
            async for index, event in events:
                if isinstance(event, Failed):
                    raise APIError(500, event.message, type="server_error")
                if isinstance(event, Delta):
                    texts[index] += event.text
                    tokens[index] += event.tokens
                elif isinstance(event, Finish):
                    reasons[index] = event.reason
        finally:
            watcher.cancel()
            self.cancel()  # no-op when finished; frees the rows when the client went away
        if "cancelled" in reasons:  # the client went away: nobody reads an answer
            return Response(status_code=499)
        self.state.metrics.latency(time.perf_counter() - self.start)
        choices = []
        for i in range(total):
            if self.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i], "refusal": None},
                                "logprobs": self._chat_logprobs(tokens[i]), "finish_reason": reasons[i]})
            else:
                scored = self.prompt_scores[i // self.n] or []
                choices.append({"index": i, "text": texts[i], "logprobs": self._text_logprobs(scored + tokens[i], 0),
                                "finish_reason": reasons[i]})
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.served.name, "system_fingerprint": self.state.fingerprint,
                "choices": choices, "usage": self._usage()}

    async def _watch_disconnect(self):
        while True:
            await asyncio.sleep(0.1)
            if await self.http.is_disconnected():
                self.cancel()
                return

    # ---- streaming -----------------------------------------------------------------------------------
    async def _sse(self, include_usage: bool):
        try:
            total = len(self.requests) * self.n
            offsets = [len(self.echo[i // self.n]) if self.echo else 0 for i in range(total)]
            if self.kind == "chat":
                for i in range(total):
                    yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None}], include_usage)
            elif self.echo and not self.params.prompt_logprobs:  # else sent with its logprobs after the prefill
                for i in range(total):
                    yield self._chunk([{"index": i, "text": self.echo[i // self.n], "logprobs": None,
                                        "finish_reason": None}], include_usage)
            async for index, event in self.events_until_done():
                if isinstance(event, Failed):
                    yield _sse(error_body(event.message, "server_error"))
                    break
                if isinstance(event, PromptLogprobs):
                    echo, logprobs = self.echo[index // self.n], self._text_logprobs(event.tokens, 0)
                    yield self._chunk([{"index": i, "text": echo, "logprobs": logprobs, "finish_reason": None}
                                       for i in range(index, index + self.n)], include_usage)
                    continue
                if isinstance(event, Delta):
                    if self.kind == "chat":
                        choice = {"index": index, "delta": {"content": event.text},
                                  "logprobs": self._chat_logprobs(event.tokens), "finish_reason": None}
                    else:
                        choice = {"index": index, "text": event.text,
                                  "logprobs": self._text_logprobs(event.tokens, offsets[index]), "finish_reason": None}
                        offsets[index] += len(event.text)
                elif event.reason == "cancelled":
                    break
                else:
                    choice = ({"index": index, "delta": {}, "logprobs": None, "finish_reason": event.reason}
                              if self.kind == "chat" else
                              {"index": index, "text": "", "logprobs": None, "finish_reason": event.reason})
                yield self._chunk([choice], include_usage)
            else:
                if include_usage:
                    yield self._chunk([], False, usage=self._usage())
                self.state.metrics.latency(time.perf_counter() - self.start)
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # the client disconnected, or we are done: either way the rows are free

    def _chunk(self, choices: list[dict], include_usage: bool, usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.served.name, "system_fingerprint": self.state.fingerprint,
                "choices": choices}
        if include_usage or usage is not None:
            body["usage"] = usage
        return _sse(body)

    def _usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    # ---- logprobs ------------------------------------------------------------------------------------
    def _token(self, token_id: int) -> tuple[str, list[int]]:
        text = self.served.model.tokenizer.decode([token_id])
        return text, list(text.encode("utf-8"))

    def _chat_logprobs(self, tokens) -> dict | None:
        if not self.params.logprobs:
            return None
        content = []
        for t in tokens:
            text, raw = self._token(t.token_id)
            top = [dict(zip(("token", "bytes"), self._token(i)), logprob=lp) for i, lp in t.top]
            content.append({"token": text, "logprob": t.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": content, "refusal": None}

    def _text_logprobs(self, tokens, offset: int) -> dict | None:
        if not self.params.logprobs:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            text, _ = self._token(t.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append(None if t.top is None else {self._token(i)[0]: lp for i, lp in t.top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# ---- errors ------------------------------------------------------------------------------------------
UNION_TAGS = {"int", "float", "str", "bool", "list", "dict", "none"}
DICT_FIELDS = {"logit_bias"}  # their keys are user data, not part of the parameter name


def _param(loc) -> str | None:
    """OpenAI-style parameter path ('messages[0].content') from a pydantic error location."""
    out = ""
    for x in loc:
        if x == "body" and not out:
            continue
        if isinstance(x, int):
            out += f"[{x}]"
            continue
        if x in UNION_TAGS or any(c in x for c in "[]-("):  # which member of a Union failed: not a field
            break
        out += ("." if out else "") + x
        if x in DICT_FIELDS:
            break
    return out or None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            message = f"We could not parse the JSON body of your request: {first.get('msg')}."
            return JSONResponse(error_body(message), status_code=400)
        param = _param(first.get("loc", ()))
        message = f"Invalid value for '{param or 'body'}': {first.get('msg')}."
        return JSONResponse(error_body(message, param=param or None, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
            return JSONResponse(error_body(message, code="unknown_url"), status_code=404)
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"The server had an error while processing your request ({type(e).__name__}).",
                                       "server_error"), status_code=500)


class Guard:
    """ASGI wrapper: API key check, body size limit (read fully before the app sees it), request metrics."""

    def __init__(self, app: FastAPI, state: State):
        self.app, self._state = app, state

    def __getattr__(self, name):  # behave like the FastAPI app for callers (openapi(), routes, ...)
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, start = scope["path"], time.perf_counter()
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            key = self._state.config.api_key
            if key and path != "/health" and not _authorized(dict(scope["headers"]), key):
                page = path == "/" or path.startswith("/static/")
                headers = {"WWW-Authenticate": 'Basic realm="gpt4"'} if page else {}
                message = "Incorrect API key provided. Give it as 'Authorization: Bearer KEY'." \
                    if b"authorization" in dict(scope["headers"]) else \
                    "You didn't provide an API key. Give it as 'Authorization: Bearer KEY'."
                await _reply(send_counted, 401, error_body(message, code="invalid_api_key"), headers)
                return
            if scope["method"] == "POST" and path.startswith("/v1/"):
                # Bodies are JSON whatever the header says (`curl -d` sends a form content type).
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")]}
            body = await _read_body(scope, receive, self._state.config.max_body_bytes)
            if body is None:
                await _reply(send_counted, 413, error_body(
                    f"The request body is larger than this server's {self._state.config.max_body_bytes} bytes.",
                    code="request_too_large"))
                return
            await self.app(scope, _replay(body, receive), send_counted)
        finally:
            self._state.metrics.request(_route(path), status["code"], time.perf_counter() - start)


def _authorized(headers: dict, key: str) -> bool:
    value = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, credential = value.partition(" ")
    credential = credential.strip()
    if scheme.lower() == "basic":  # browsers: any user name, the key as password
        try:
            credential = base64.b64decode(credential, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credential.encode("utf-8"), key.encode("utf-8"))


async def _read_body(scope, receive, limit: int) -> bytes | None:
    """The whole body, or None when it exceeds limit (by Content-Length or by what arrives)."""
    headers = dict(scope["headers"])
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: the real channel, so disconnects are seen
    return replay


async def _reply(send, status: int, body: dict, headers: dict | None = None) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def _route(path: str) -> str:
    known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")
    return path if path in known else ("/static" if path.startswith("/static/") else "other")
