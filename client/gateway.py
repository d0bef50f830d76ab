"""An OpenAI-compatible HTTP gateway in front of a `HelixClient` (aiohttp): `GET /v1/models`,
`POST /v1/completions` and `POST /v1/chat/completions`, each with `stream: true` as server-sent
events. Errors come in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the
status OpenAI uses: 400 for a bad request, 404 for an unknown model, 503 when the swarm cannot
serve (no route, or every failover failed).

Only what the swarm does is accepted: one choice (`n` = 1), no log-probabilities, no echo, no
frequency or presence penalties (use the `repetition_penalty` extension); anything else is
refused by name rather than ignored."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from helix_p2p.errors import HelixError
from helix_p2p.web import StateView, add_dashboard_routes, add_metrics_route

from .client import GenerationResult, HelixClient, Token
from .errors import BadRequestError, GenerationFailedError, NoRouteError
from .metrics import GatewayMetrics
from .view import view_time

DEFAULT_MAX_TOKENS = 16
#: parameters the gateway takes (beyond model, prompt / messages): OpenAI's and two extensions
COMMON = {
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream", "n", "user",
    "top_k", "repetition_penalty", "stream_options", "frequency_penalty", "presence_penalty",
}  # fmt: skip
#: accepted only at their neutral value
NEUTRAL = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": None, "echo": False,
           "best_of": 1, "suffix": None, "logit_bias": None, "tools": None, "tool_choice": None,
           "top_logprobs": None, "response_format": None}  # fmt: skip


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


@dataclass(frozen=True)
class Request:
    chat: bool
    prompt: str | list[int] | None
    messages: list[dict[str, str]] | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool


def _number(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise bad(f"'{key}' must be a number in [{lo:g}, {hi:g}], got {value!r}", key)
    return float(value)


def parse_request(body: Any, chat: bool, model_id: str, max_length: int) -> Request:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required", "model")
    if model != model_id:
        raise ApiError(404, f"the model '{model}' does not exist; this gateway serves '{model_id}'",
                       "invalid_request_error", "model", "model_not_found")  # fmt: skip
    field = "messages" if chat else "prompt"
    allowed = COMMON | set(NEUTRAL) | {"model", field}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"unsupported parameter(s): {', '.join(unknown)}", unknown[0], "unsupported_parameter")
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] != neutral and not (neutral is None and body[key] in (None, False)):
            raise bad(f"'{key}' is not supported (only {neutral!r})", key, "unsupported_parameter")
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    if field not in body:
        raise bad(f"'{field}' is required", field)
    if chat:
        raw = body["messages"]
        if not isinstance(raw, list) or not raw:
            raise bad("'messages' must be a non-empty list", "messages")
        messages = []
        for m in raw:
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise bad("each message needs a string 'role' and a string 'content'", "messages")
            messages.append({"role": m["role"], "content": m["content"]})
    else:
        raw = body["prompt"]
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], (str, list)):
            raw = raw[0]
        if isinstance(raw, str) and raw:
            prompt = raw
        elif (
            isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw)
        ):
            prompt = list(raw)
        else:
            raise bad("'prompt' must be a non-empty string or list of token ids (one prompt)", "prompt")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key, DEFAULT_MAX_TOKENS)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad(f"'{key}' must be an integer >= 1, got {max_tokens!r}", key)
    if max_tokens >= max_length:
        raise bad(f"'{key}' is {max_tokens}, but the model's limit is {max_length} tokens in all",
                  key, "context_length_exceeded")  # fmt: skip
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad("'stop' must be a string or a list of up to 4 strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("'seed' must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("'stream' must be a boolean", "stream")
    top_k = body.get("top_k", 0) or 0
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise bad("'top_k' must be an integer >= 0", "top_k")
    return Request(
        chat=chat,
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=top_k,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-3, 10.0),
        seed=seed,
        stop=stops,
        stream=bool(stream),
    )


class Gateway:
    def __init__(self, client: HelixClient, model_id: str | None = None) -> None:
        self.client = client
        self.model_id = model_id or client.model_id
        self.created = int(time.time())
        self.metrics = GatewayMetrics()
        self.view = StateView(self.model_id)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        # the swarm's status page and /api/state, from the client's view of the swarm, and /metrics
        add_dashboard_routes(app, self.swarm_state)
        add_metrics_route(app, self.metrics.registry)
        return app

    def swarm_state(self) -> dict[str, Any]:
        snapshot = self.client.snapshot()
        plans = [] if snapshot.plan is None else [snapshot.plan]
        return self.view.update(snapshot.records, plans, view_time(snapshot, time.time()))

    async def models(self, _: web.Request) -> web.Response:
        model = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "helix"}
        return web.json_response({"object": "list", "data": [model]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.metrics.received("chat.completions" if chat else "completions")
        self.metrics.in_flight.inc()
        try:
            return await self._serve_one(request, chat)
        finally:
            self.metrics.in_flight.dec()

    async def _serve_one(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise bad("the request body is not valid JSON") from None
            parsed = parse_request(body, chat, self.model_id, self.client.max_length)
            kwargs = self._kwargs(parsed)
            if parsed.stream:
                return await self._stream(request, parsed, kwargs)
            result = await self.client.agenerate(parsed.prompt, messages=parsed.messages, **kwargs)
            self.metrics.served(result)
            return web.json_response(self._body(parsed, result))
        except ApiError as e:
            self.metrics.failed(e.code or e.kind)
            return e.response()
        except HelixError as e:
            error = _api_error(e)
            self.metrics.failed(error.code or error.kind)
            return error.response()

    def _kwargs(self, parsed: Request) -> dict[str, Any]:
        kwargs = {
            "max_new_tokens": parsed.max_tokens,
            "temperature": parsed.temperature,
            "top_p": parsed.top_p,
            "top_k": parsed.top_k,
            "repetition_penalty": parsed.repetition_penalty,
            "seed": parsed.seed,
            "stop": parsed.stop,
        }
        # the prompt's length is checked before anything is sent, so the error is a 400
        ids = self.client.encode(parsed.prompt, parsed.messages)
        if len(ids) + parsed.max_tokens > self.client.max_length:
            raise bad(
                f"the prompt ({len(ids)} tokens) and max_tokens ({parsed.max_tokens}) pass the model's "
                f"limit of {self.client.max_length} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        return kwargs

    def _body(self, parsed: Request, result: GenerationResult) -> dict[str, Any]:
        usage = {
            "prompt_tokens": len(result.prompt_token_ids),
            "completion_tokens": len(result.token_ids),
            "total_tokens": len(result.prompt_token_ids) + len(result.token_ids),
        }
        if parsed.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result.text},
                                      "finish_reason": result.finish_reason, "logprobs": None}  # fmt: skip
            kind = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": result.text,
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
            kind = "text_completion"
        return {"id": _id(parsed), "object": kind, "created": int(time.time()), "model": self.model_id,
                "choices": [choice], "usage": usage}  # fmt: skip

    async def _stream(
        self, request: web.Request, parsed: Request, kwargs: dict[str, Any]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        rid, created = _id(parsed), int(time.time())
        kind = "chat.completion.chunk" if parsed.chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> bytes:
            if parsed.chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if first:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": delta,
                    "finish_reason": finish,
                    "logprobs": None,
                }
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            doc = {"id": rid, "object": kind, "created": created, "model": self.model_id, "choices": [choice]}
            return f"data: {json.dumps(doc)}\n\n".encode()

        if parsed.chat:
            await response.write(chunk("", None, first=True))
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[Token | None] = asyncio.Queue()
        try:
            future = self.client.start(
                parsed.prompt,
                messages=parsed.messages,
                on_token=lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token),
                **kwargs,
            )
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(tokens.put_nowait, None))
            # one event per token (its text may be "" mid-character), as OpenAI streams
            while (token := await tokens.get()) is not None:
                await response.write(chunk(token.text, None))
            result = future.result()
            self.metrics.served(result)
            await response.write(chunk(None if parsed.chat else "", result.finish_reason))
        except HelixError as e:
            error = _api_error(e)
            self.metrics.failed(error.code or error.kind)
            doc = {
                "error": {
                    "message": error.message,
                    "type": error.kind,
                    "param": error.param,
                    "code": error.code,
                }
            }
            await response.write(f"data: {json.dumps(doc)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _id(parsed: Request) -> str:
    return ("chatcmpl-" if parsed.chat else "cmpl-") + uuid.uuid4().hex


def _api_error(e: HelixError) -> ApiError:
    if isinstance(e, BadRequestError):
        return bad(str(e))
    if isinstance(e, (NoRouteError, GenerationFailedError)):
        return ApiError(503, f"the swarm cannot serve this request now: {e}", "service_unavailable", None,
                        "swarm_unavailable")  # fmt: skip
    return ApiError(500, f"{type(e).__name__}: {e}", "server_error")


@contextmanager
def gateway_in_background(client: HelixClient, port: int, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve the gateway from an event loop of its own in a thread (tests, benchmarks, embedding in
    a program that is not async); yields the API's base URL and stops the server on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="helix-gateway", daemon=True)
    thread.start()
    runner = web.AppRunner(Gateway(client).app())

    async def up() -> None:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()

    try:
        asyncio.run_coroutine_threadsafe(up(), loop).result(30)
        yield f"http://{host}:{port}/v1"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
