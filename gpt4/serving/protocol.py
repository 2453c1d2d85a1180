"""OpenAI request bodies as pydantic models (strict types, OpenAI's ranges) and the error envelope.

Types are strict ("0.5" is not a temperature, true is not an integer) because OpenAI rejects such bodies with
400 too; unknown fields are ignored so that clients sending newer OpenAI fields keep working.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

Num = Union[StrictInt, StrictFloat]


class APIError(Exception):
    """An error answered in OpenAI's envelope with the given HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Body):  # accepted by the schema so the error can say plainly that images are unsupported
    type: Literal["image_url", "input_audio", "file", "refusal"]


Content = Union[StrictStr, list[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]], None]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content = None
    name: StrictStr | None = None

    def text(self, where: str) -> str:
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise APIError(400, f"{where}.content is required for role '{self.role}'.", param=f"{where}.content")
        if isinstance(self.content, str):
            return self.content
        for j, part in enumerate(self.content):
            if isinstance(part, ImagePart):
                raise APIError(400, f"{where}.content[{j}] is of type '{part.type}'; this model reads text only.",
                               param=f"{where}.content[{j}].type")
        return "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object"]


class _Sampling(_Body):
    """Fields shared by chat and completions."""
    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Num, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Num, Field(ge=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    presence_penalty: Annotated[Num, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Num, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[StrictStr, Annotated[Num, Field(ge=-100, le=100)]] | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # Extensions (vLLM / llama.cpp spelling) for small models that loop without them.
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    repetition_penalty: Annotated[Num, Field(gt=0, le=10)] | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stops):
            raise APIError(400, "stop strings must not be empty.", param="stop")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


PromptIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)] | PromptIds \
        | Annotated[list[PromptIds], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None  # 0 with echo: score the prompt only
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: StrictBool | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=20)] | None = None
    suffix: StrictStr | None = None
