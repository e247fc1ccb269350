"""The HTTP layer: OpenAI's routes on starlette, over the engine.

    POST /v1/completions        text completions; "stream": true sends server-sent events
    POST /v1/chat/completions   chat, rendered with the model's chat template
    GET  /v1/models             the one model served
    GET  /health                the engine's slots, queue and counters (no key needed)

A request becomes sequences (one per prompt and choice) that the engine runs; their outputs
come back through an asyncio queue (the engine's thread hands them to this event loop). A
client that goes away, streaming or not, cancels its sequences at once, so their slots are
free at the next step. Every error is OpenAI's error body with a 4xx/5xx status; the server
goes on serving.
"""
import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm.config import ModelConfig
from llm.errors import UserError
from llm.infer.generate import TextStream, prompt_tokens
from llm.model.chat import END_OF_TURN, ChatTemplate, check_messages
from llm.model.tokenizer import Tokenizer
from llm.serve.engine import Engine
from llm.serve.protocol import (BadRequest, ChatCompletions, ChatRequest, Common, CompletionRequest, Completions,
                                error_body, parse, sse, usage)
from llm.serve.scheduler import QueueFull
from llm.serve.sequence import Output, Sequence

log = logging.getLogger("uvicorn.error")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions; chat: the rest of the context


@dataclass
class Served:
    """What the server serves, and how."""
    name: str
    config: ModelConfig
    tokenizer: Tokenizer
    template: ChatTemplate | None  # None: no chat endpoint for this model
    engine: Engine
    device: torch.device
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def build_app(served: Served) -> Starlette:
    api = Api(served)

    @asynccontextmanager
    async def lifespan(app):
        yield
        served.engine.stop()  # after uvicorn's graceful shutdown: what is left is cancelled

    routes = [Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat, methods=["POST"]),
              Route("/v1/models", api.models), Route("/health", api.health)]
    handlers = {BadRequest: bad_request, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


async def bad_request(request: Request, e: BadRequest) -> Response:
    return JSONResponse(e.body(), e.status, headers=e.headers)


async def http_error(request: Request, e: HTTPException) -> Response:  # unknown route, wrong method
    return JSONResponse(error_body(e.detail, "invalid_request_error"), e.status_code, headers=e.headers)


async def server_error(request: Request, e: Exception) -> Response:
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), 500)


class Api:
    def __init__(self, served: Served):
        self.served = served
        self.engine = served.engine

    async def health(self, request: Request) -> Response:
        alive = self.engine.thread.is_alive()
        status = {"status": "ok" if alive else "engine stopped", **self.engine.stats()}
        return JSONResponse(status, 200 if alive else 503)

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        model = {"id": self.served.name, "object": "model", "created": self.served.created, "owned_by": "llm-toolkit",
                 "max_model_len": self.served.config.block_size}
        return JSONResponse({"object": "list", "data": [model]})

    async def completions(self, request: Request) -> Response:
        self.authorize(request)
        body = parse(CompletionRequest, await request.body())
        prompts = self.completion_prompts(body.prompt)
        max_tokens = self.max_tokens([ids for ids, _ in prompts], body.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt",
                                     lowest=0 if body.echo else 1)
        stop_ids = set() if body.ignore_eos or self.served.tokenizer.eot_id is None else {self.served.tokenizer.eot_id}
        job = Job(self, body, Completions(self.served.name, self.token_text, body.logprobs is not None),
                  echo=[text if body.echo else "" for _, text in prompts])
        job.add(prompts, max_tokens, stop_ids, body.stops(), body.logprobs,
                prompt_logprobs=body.echo and body.logprobs is not None)
        return await job.respond(request)

    async def chat(self, request: Request) -> Response:
        self.authorize(request)
        body = parse(ChatRequest, await request.body())
        ids = self.chat_prompt(body.messages)
        max_tokens = self.max_tokens([ids], body.requested_max_tokens(), None, "messages", lowest=1)
        stop_ids, turn_ends = chat_stops(self.served.tokenizer, self.served.template)
        job = Job(self, body, ChatCompletions(self.served.name, self.token_text, body.logprobs), echo=[""])
        job.add([(ids, "")], max_tokens, set() if body.ignore_eos else stop_ids, body.stops() + turn_ends,
                (body.top_logprobs or 0) if body.logprobs else None)
        return await job.respond(request)

    def authorize(self, request: Request):
        """--api_key, sent as OpenAI clients send it: Authorization: Bearer KEY."""
        if self.served.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.served.api_key.encode()):
            raise BadRequest("invalid or missing API key (send 'Authorization: Bearer KEY')", status=401,
                             code="invalid_api_key")

    def completion_prompts(self, prompt) -> list[tuple[list[int], str]]:
        """Each prompt's token ids and text (what echo returns)."""
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        result = []
        for p in prompt:
            if isinstance(p, str):
                try:
                    result.append((prompt_tokens(self.served.tokenizer, p), p))
                except ValueError as e:
                    raise BadRequest(str(e), "prompt")
                continue
            if not all(0 <= t < self.served.config.vocab_size for t in p):
                raise BadRequest(f"token ids must be in 0..{self.served.config.vocab_size - 1}", "prompt")
            result.append((p, self.served.tokenizer.decode(p)))
        return result

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation through the chat template, tokenized as transformers does (the template
        writes any BOS itself: no special tokens added)."""
        if self.served.template is None:
            raise BadRequest("this model has no chat template: use /v1/completions", "messages")
        try:
            text = self.served.template.render(check_messages([text_content(m) for m in messages]),
                                          add_generation_prompt=True)
        except UserError as e:
            raise BadRequest(str(e), "messages")
        ids = self.served.tokenizer.hf.encode(text, add_special_tokens=False).ids
        if not ids:
            raise BadRequest("the conversation renders to no tokens", "messages")
        return ids

    def max_tokens(self, prompts: list[list[int]], requested: int | None, default: int | None, param: str,
                   lowest: int) -> int:
        """Tokens to generate per sequence: as requested, else the default within what the context leaves."""
        context, longest = self.served.config.block_size, max(len(p) for p in prompts)
        n = requested if requested is not None else min(default or context, context - longest)
        if longest + max(n, lowest) > context:
            asked = f" and max_tokens={n} asks for {n} more" if requested is not None else ""
            raise BadRequest(f"this model's context is {context} tokens: the prompt has {longest}{asked}; shorten "
                             "the prompt or lower max_tokens", param, code="context_length_exceeded")
        return n

    def token_text(self, token: int) -> str:
        return self.served.tokenizer.decode([token])


def chat_stops(tokenizer: Tokenizer, template: ChatTemplate) -> tuple[set[int], tuple[str, ...]]:
    """Where an assistant's turn ends: the end-of-sequence token and the end-of-turn tokens the
    tokenizer has, and as text the end-of-turn markers the template writes (they are not tokens of
    a tokenizer trained before they were added)."""
    ids = {tokenizer.hf.token_to_id(t) for t in END_OF_TURN} | {tokenizer.eot_id}
    return ids - {None}, tuple(t for t in END_OF_TURN if t in template.source)


def text_content(message) -> dict:
    """A message whose content is a list of text parts, as one string (the templates take text)."""
    if isinstance(message, dict) and isinstance(message.get("content"), list):
        parts = message["content"]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            raise BadRequest("only text content is supported", "messages")
        return {**message, "content": "".join(p["text"] for p in parts)}
    return message


class Job:
    """One HTTP request's sequences and the queue their outputs come back through."""

    def __init__(self, api: Api, body: Common, shape: Completions, echo: list[str]):
        self.api, self.body, self.shape = api, body, shape
        self.echo = echo  # per prompt: text put before its choices' text
        self.seqs: list[Sequence] = []
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.deliver = handoff(asyncio.get_running_loop(), self.queue)

    def add(self, prompts, max_tokens: int, stop_ids: set, stops: tuple, logprobs: int | None,
            prompt_logprobs: bool = False):
        tokenizer, device = self.api.served.tokenizer, self.api.served.device
        sampling, n = self.body.sampling(), self.body.n
        for p, (ids, _) in enumerate(prompts):
            for c in range(n):
                seed = secrets.randbits(63) if self.body.seed is None else (self.body.seed + c) % 2**63
                generator = None if sampling.temperature == 0 else torch.Generator(device).manual_seed(seed)
                self.seqs.append(Sequence(p * n + c, ids, max_tokens, TextStream(tokenizer, stops, ids), self.deliver,
                                          sampling, generator, frozenset(stop_ids), logprobs, prompt_logprobs))

    async def respond(self, request: Request) -> Response:
        scheduler = self.api.engine.scheduler
        if len(self.seqs) > scheduler.slots + scheduler.max_waiting:
            raise BadRequest(f"this request needs {len(self.seqs)} sequences (prompts x n); the server holds at "
                             f"most {scheduler.slots + scheduler.max_waiting} at once", "n")
        try:
            self.api.engine.submit(self.seqs)
        except QueueFull:
            raise BadRequest("the server is busy: every slot and queue place is taken; retry shortly", status=429,
                             type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        if self.body.stream:
            return EventStream(self.events(), on_close=lambda: self.api.engine.cancel(self.seqs))
        try:
            result = await until_disconnected(request, self.collect())
        finally:
            self.api.engine.cancel(self.seqs)  # those not finished: the client went away
        return JSONResponse(result) if result is not None else Response(status_code=499)

    async def outputs(self) -> AsyncIterator[tuple[Output, str, list]]:
        """Each output with its text and log-probabilities, the echoed prompt put before the first."""
        started, left = set(), len(self.seqs)
        while left:
            out = await self.queue.get()
            left -= out.finish_reason is not None
            text, tokens = out.text, out.tokens
            if out.index not in started:
                started.add(out.index)
                text = self.echo[out.index // self.body.n] + text
                tokens = (out.prompt or []) + tokens
            yield out, text, tokens

    async def collect(self) -> dict:
        texts, tokens = [[] for _ in self.seqs], [[] for _ in self.seqs]
        async for out, text, new in self.outputs():
            texts[out.index].append(text)
            tokens[out.index] += new
        if any(s.finish_reason == "error" for s in self.seqs):
            raise RuntimeError("generation failed (the server's log has the traceback)")
        choices = [self.shape.choice(s.index, "".join(texts[s.index]), tokens[s.index], s.finish_reason)
                   for s in self.seqs]
        return self.shape.response(choices, self.usage())

    async def events(self) -> AsyncIterator[str]:
        usage_field = {"usage": None} if self.body.include_usage() else {}
        for chunk in self.shape.first_chunks(len(self.seqs)):
            yield sse({**chunk, **usage_field})
        async for out, text, tokens in self.outputs():
            if out.finish_reason == "error":
                yield sse(error_body("generation failed (the server's log has the traceback)", "server_error"))
                return
            yield sse({**self.shape.chunk(out.index, text, tokens, out.finish_reason), **usage_field})
        if usage_field:
            yield sse({**self.shape.head(chunk=True), "choices": [], "usage": self.usage()})
        yield sse("[DONE]")

    def usage(self) -> dict:
        prompts = sum(len(s.prompt_ids) for s in self.seqs[:: self.body.n])
        return usage(prompts, sum(len(s.ids) for s in self.seqs))


def handoff(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[Output], None]:
    """How the engine's thread puts an output into this event loop's queue."""
    def deliver(out: Output):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, out)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody waits
            pass
    return deliver


async def wait_for_disconnect(receive):
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work):
    """The result of `work`, or None if the client disconnects first (work is then cancelled)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            t.cancel()
    return task.result() if task.done() and not task.cancelled() else None


class EventStream(StreamingResponse):
    """Server-sent events. The client is watched while the events wait for tokens, so one that goes
    away is noticed at once (not at the next write), and `on_close` runs however the stream ends."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        streaming = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (streaming, gone):
                t.cancel()
            self.on_close()
        if streaming.done() and not streaming.cancelled() and not isinstance(streaming.exception(), OSError):
            streaming.result()  # a failure of ours (not the client's going away) is raised, and logged
