"""The OpenAI shapes: request bodies (typed and checked with pydantic), errors, responses, chunks.

A body is checked in two passes: its JSON types (strict: "1" is not a number, true is not an
integer; an unknown field is refused, not ignored), then its values. Either failure is a
BadRequest, which the HTTP layer answers with OpenAI's error body:
{"error": {"message", "type", "param", "code"}}. OpenAI fields this server does not implement
(penalties, logit_bias, best_of, suffix, tools) are accepted at their neutral values, so the
requests of clients that always send them (LangChain) work, and refused otherwise.
"""
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llm.infer.generate import Sampling
from llm.serve.sequence import TokenLogprob

MAX_N = 128  # choices per request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", protected_namespaces=())


class StreamOptions(Body):
    include_usage: bool = Field(False, description="a boolean")


class Common(Body):
    model: str | None = Field(None, description="a string (any name: this server serves one model)")
    max_tokens: int | None = Field(None, description="an integer")
    temperature: float | None = Field(None, description="a number >= 0 (0: greedy)")
    top_p: float | None = Field(None, description="a number in (0, 1]")
    top_k: int | None = Field(None, description="an integer (0 or -1: no limit)")
    stop: str | list[str] | None = Field(None, description="a string or a list of strings")
    seed: int | None = Field(None, description="an integer")
    n: int = Field(1, description="an integer")
    stream: bool = Field(False, description="a boolean")
    stream_options: StreamOptions | None = Field(None, description='an object: {"include_usage": boolean}')
    ignore_eos: bool = Field(False, description="a boolean (go on past the end-of-sequence token)")
    frequency_penalty: float | None = Field(None, description="a number (0 only: not supported)")
    presence_penalty: float | None = Field(None, description="a number (0 only: not supported)")
    logit_bias: dict[str, float] | None = Field(None, description="an object (empty only: not supported)")
    user: str | None = Field(None, description="a string")

    def check(self):
        if not 1 <= self.n <= MAX_N:
            raise BadRequest(f"n must be between 1 and {MAX_N}, got {self.n}", "n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                raise BadRequest(f"{name} is not supported (0 only)", name)
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported", "logit_bias")
        if any(not s for s in self.stops()) or len(self.stops()) > MAX_STOP:
            raise BadRequest(f"stop must be at most {MAX_STOP} non-empty strings", "stop")
        try:
            self.sampling()
        except ValueError as e:
            raise BadRequest(str(e), str(e).split()[0])

    def sampling(self) -> Sampling:
        top_k = None if self.top_k in (None, 0, -1) else self.top_k
        return Sampling(1.0 if self.temperature is None else self.temperature, top_k, self.top_p)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Common):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids or a list of lists of token ids")
    echo: bool = Field(False, description="a boolean")
    logprobs: int | None = Field(None, description=f"an integer in 0..{MAX_TOP_LOGPROBS}")
    best_of: int | None = Field(None, description="an integer (equal to n only: not supported)")
    suffix: str | None = Field(None, description="null (not supported)")

    def check(self):
        super().check()
        if isinstance(self.prompt, list) and (not self.prompt or any(p == [] for p in self.prompt)):
            raise BadRequest("prompt must not be an empty list", "prompt")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "logprobs")
        if self.best_of not in (None, self.n):
            raise BadRequest("best_of is not supported (it may only equal n)", "best_of")
        if self.suffix is not None:
            raise BadRequest("suffix is not supported", "suffix")
        # echo with max_tokens 0 scores the prompt alone (evaluation harnesses)
        lowest = 0 if self.echo else 1
        if self.max_tokens is not None and self.max_tokens < lowest:
            raise BadRequest(f"max_tokens must be at least {lowest}, got {self.max_tokens}", "max_tokens")


class ChatRequest(Common):
    messages: list[dict] = Field(description='a list of messages: {"role": ..., "content": ...}')
    logprobs: bool = Field(False, description="a boolean")
    top_logprobs: int | None = Field(None, description=f"an integer in 0..{MAX_TOP_LOGPROBS}")
    max_completion_tokens: int | None = Field(None, description="an integer")
    response_format: dict | None = Field(None, description='an object ({"type": "text"} only)')
    tools: list | None = Field(None, description="a list (empty only: tools are not supported)")
    tool_choice: str | dict | None = Field(None, description='"none" (tools are not supported)')
    parallel_tool_calls: bool | None = Field(None, description="a boolean")

    def check(self):
        super().check()
        for name in ("max_tokens", "max_completion_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BadRequest(f"{name} must be at least 1, got {getattr(self, name)}", name)
        if self.top_logprobs is not None and not (self.logprobs and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise BadRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, with logprobs true",
                             "top_logprobs")
        if self.response_format not in (None, {"type": "text"}):
            raise BadRequest('response_format is not supported (only {"type": "text"})', "response_format")
        if self.tools or self.tool_choice not in (None, "none"):
            raise BadRequest("tools are not supported", "tools")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse(cls: type[Common], raw: bytes) -> Common:
    """A request body -> a checked request, or BadRequest saying what is wrong, in one line."""
    try:
        data = json.loads(raw, parse_constant=not_json)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        request = cls.model_validate(data)
    except ValidationError as e:
        raise describe(cls, e.errors(include_url=False)[0], data)
    request.check()
    return request


def not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON number")  # Python's json reads NaN and Infinity


def describe(cls: type[Body], error: dict, data: dict) -> BadRequest:
    """A pydantic error as one line: the field, what it must be (its description), what it was."""
    path = ".".join(str(part) for part in error["loc"])
    name = str(error["loc"][0]) if error["loc"] else None
    if error["type"] == "extra_forbidden":
        return BadRequest(f"unknown field {path!r}", path)
    if error["type"] == "missing":
        return BadRequest(f"{path!r} is required", path)
    field = cls.model_fields.get(name)
    if field is None:
        return BadRequest(f"{path}: {error['msg']}", path)
    return BadRequest(f"{name} must be {field.description}, got {json.dumps(data.get(name))[:80]}", name)


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Completions:
    """/v1/completions: text choices, with the legacy logprobs object (tokens, token_logprobs,
    top_logprobs, text_offset; offsets count the characters of the tokens before, from the start of
    the choice's text, an echoed prompt included)."""

    object, chunk_object, prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, model: str, token_text: Callable[[int], str], logprobs: bool):
        self.id, self.created, self.model = request_id(self.prefix), int(time.time()), model
        self.token_text, self.logprobs = token_text, logprobs
        self.offsets = defaultdict(int)  # per choice: where its next token starts

    def head(self, chunk: bool = False) -> dict:
        return {"id": self.id, "object": self.chunk_object if chunk else self.object, "created": self.created,
                "model": self.model}

    def choice(self, index: int, text: str, tokens: list[TokenLogprob], finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": self.logprob_object(index, tokens),
                "finish_reason": finish_reason}

    def first_chunks(self, n: int) -> list[dict]:
        return []

    def chunk(self, index: int, text: str, tokens: list[TokenLogprob], finish_reason: str | None) -> dict:
        return {**self.head(chunk=True), "choices": [self.choice(index, text, tokens, finish_reason)]}

    def response(self, choices: list[dict], usage: dict) -> dict:
        return {**self.head(), "choices": choices, "usage": usage}

    def logprob_object(self, index: int, tokens: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None
        strings = [self.token_text(t.id) for t in tokens]
        offsets = []
        for s in strings:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(s)
        tops = [None if t.logprob is None else self.top_dict([*t.top, (t.id, t.logprob)]) for t in tokens]
        return {"tokens": strings, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": tops,
                "text_offset": offsets}

    def top_dict(self, pairs: list[tuple[int, float]]) -> dict[str, float]:
        """The most likely tokens and the chosen one, by text. Where two tokens read the same (two
        halves of characters, both U+FFFD) the larger log-probability stays: a chosen token is then
        reported greedy only if it is (lm-evaluation-harness compares it with the maximum)."""
        top = {}
        for token, logprob in pairs:
            text = self.token_text(token)
            top[text] = max(logprob, top.get(text, logprob))
        return top


class ChatCompletions(Completions):
    """/v1/chat/completions: assistant messages; streamed as deltas, the role first."""

    object, chunk_object, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def choice(self, index: int, text: str, tokens: list[TokenLogprob], finish_reason: str | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self.logprob_object(index, tokens), "finish_reason": finish_reason}

    def first_chunks(self, n: int) -> list[dict]:
        return [{**self.head(chunk=True), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
            for i in range(n)]

    def chunk(self, index: int, text: str, tokens: list[TokenLogprob], finish_reason: str | None) -> dict:
        delta = {"content": text} if text or finish_reason is None else {}
        return {**self.head(chunk=True), "choices": [
            {"index": index, "delta": delta, "logprobs": self.logprob_object(index, tokens),
             "finish_reason": finish_reason}]}

    def logprob_object(self, index: int, tokens: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                            for t in tokens]}


def sse(data: Any) -> str:
    """One server-sent event, as OpenAI's API sends them."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
