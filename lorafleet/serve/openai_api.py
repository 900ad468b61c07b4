"""OpenAI-compatible endpoints of the lorafleet runtime.

``POST /openai/v1/chat/completions`` and ``POST /openai/v1/completions`` (both also with
``stream: true``: server-sent events ending in ``data: [DONE]``), and
``GET /openai/v1/models``, which lists the base, every adapter and every route (``parent``
= the base). ``model`` names the base, an adapter or a route of the runtime's
:class:`~lorafleet.serve.routes.RouteTable`; the adapter that answered is in the
``x-lorafleet-adapter`` response header. A full queue answers 429 and a request past its
deadline 503, both with ``Retry-After``; a client that disconnects stops its row's
decoding. Every answer of the completion routes is counted with its status in
:class:`~lorafleet.serve.metrics.ServingMetrics`, whatever produced it: a refusal, a
client's mistake, or an exception (a 500, ``code: internal_error``, also when it ends a
stream that already began).
Decoding is always greedy: sampling parameters
(``temperature``, ``top_p``, ...) are accepted and ignored. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``.

The published OpenAPI schema is what the handlers accept: the request bodies (strict
JSON types, the server's limits as ``maximum`` / ``maxLength``) and every status a route
answers. With API keys configured (:mod:`lorafleet.serve.auth`) every route here needs
``Authorization: Bearer KEY`` and keeps to its key's rate.

KServe's own OpenAI endpoints need vLLM, so the runtime mounts this router on KServe's app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from abc import abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from lorafleet.engine.generation import FinishReason, GenerationRequest, GenerationResult
from lorafleet.errors import LorafleetError, first_problem, validation_problems
from lorafleet.serve.admin import request_body
from lorafleet.serve.auth import ApiKeys
from lorafleet.serve.batching import Overloaded
from lorafleet.serve.limits import RequestLimits
from lorafleet.serve.metrics import UNKNOWN_MODEL

if TYPE_CHECKING:
    from lorafleet.serve.model import LorafleetRuntime

__all__ = ["ChatCompletionRequest", "CompletionRequest", "ErrorResponse", "openai_router"]

log = logging.getLogger(__name__)


def _no_text_or_bool(value: Any) -> Any:
    if isinstance(value, str | bool):
        raise ValueError("Input should be a valid integer")
    return value


# A token budget, a JSON integer >= 1: 5, and 5.0 too (JSON Schema's "integer" admits it),
# but not "5" or true.
Budget = Annotated[int, Field(strict=False, ge=1), BeforeValidator(_no_text_or_bool)]


class StreamOptions(BaseModel):
    """``stream_options`` of a streamed request."""

    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class _CompletionRequest(BaseModel):
    """Fields both endpoints share; unknown fields are ignored. Types are strict (``"5"`` is
    not a number, ``1`` not a boolean), as the published schema says. (Pydantic models are
    ABCs.)"""

    model_config = ConfigDict(strict=True)
    object: ClassVar[str]
    chunk_object: ClassVar[str]
    id_prefix: ClassVar[str]
    # The first event of a stream, before any text (the chat API announces the role).
    opening_choice: ClassVar[dict[str, Any] | None] = None

    model: str
    max_tokens: Budget | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: generate max_tokens tokens whatever the model's eos says.
    ignore_eos: bool = False

    @abstractmethod
    def generation_request(self, adapter: str | None, max_new_tokens: int) -> GenerationRequest:
        """The request for the generator."""

    @abstractmethod
    def prompt_chars(self) -> int:
        """The prompt's length in characters (what :class:`RequestLimits` bounds)."""

    @abstractmethod
    def choice(self, text: str, finish_reason: FinishReason) -> dict[str, Any]:
        """The choice of a whole response."""

    @abstractmethod
    def chunk_choice(self, text: str, finish_reason: FinishReason | None) -> dict[str, Any]:
        """The choice of one stream event: new text, or the finish reason at the end."""

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_CompletionRequest):
    """Body of ``POST /openai/v1/chat/completions``."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    opening_choice = {
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Budget | None = None

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)

    def generation_request(self, adapter: str | None, max_new_tokens: int) -> GenerationRequest:
        return GenerationRequest(
            messages=[m.model_dump() for m in self.messages],
            adapter=adapter,
            max_new_tokens=self.max_completion_tokens or self.max_tokens or max_new_tokens,
            stop=self.stops,
            ignore_eos=self.ignore_eos,
        )

    def choice(self, text: str, finish_reason: FinishReason) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return {"message": message, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: FinishReason | None) -> dict[str, Any]:
        return {
            "delta": {"content": text} if text else {},
            "logprobs": None,
            "finish_reason": finish_reason,
        }


class CompletionRequest(_CompletionRequest):
    """Body of ``POST /openai/v1/completions``: one prompt string, no chat template."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    prompt: str = Field(min_length=1)

    def prompt_chars(self) -> int:
        return len(self.prompt)

    def generation_request(self, adapter: str | None, max_new_tokens: int) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt,
            adapter=adapter,
            max_new_tokens=self.max_tokens or max_new_tokens,
            stop=self.stops,
            ignore_eos=self.ignore_eos,
        )

    def choice(self, text: str, finish_reason: FinishReason) -> dict[str, Any]:
        return {"text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: FinishReason | None) -> dict[str, Any]:
        return self.choice(text, finish_reason)


class Usage(BaseModel):
    """Token counts of one answer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Answer(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(_Answer):
    """A whole chat completion (``stream: false``)."""

    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason


class Completion(_Answer):
    """A whole text completion (``stream: false``)."""

    object: Literal["text_completion"]
    choices: list[TextChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None


class ModelList(BaseModel):
    """``GET /openai/v1/models``."""

    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error answer of the OpenAI routes: ``{"error": {...}}``."""

    error: ErrorDetail


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


def _request_body(schema: type[_CompletionRequest], limits: RequestLimits) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a completion route: the request model's JSON schema
    with the server's limits, so the published schema admits what the server accepts."""
    body = request_body(schema)
    props = body["content"]["application/json"]["schema"]["properties"]
    for budget in ("max_tokens", "max_completion_tokens"):
        for branch in props.get(budget, {}).get("anyOf", []):
            if branch.get("type") == "integer":
                branch["maximum"] = limits.max_tokens
    # Each text alone; all of a chat's messages together are checked too (400 prompt_over_limit).
    texts = [props["messages"]["items"]["properties"]["content"]] if "messages" in props else []
    texts += [props["prompt"]] if "prompt" in props else []
    for text in texts:
        text["maxLength"] = limits.max_prompt_chars
    return body


def _error(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    body = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _timed_out(runtime: LorafleetRuntime) -> str:
    return f"request timed out after {runtime.request_timeout_s:g} s (server busy); retry later"


def _internal_error(call: _MeteredCall, exc: Exception) -> str:
    """Log a server fault with its traceback; the client's one line names only its type."""
    log.error("completion for %r failed", call.adapter, exc_info=exc)
    return f"the server failed to answer ({type(exc).__name__}); the server log has the details"


async def _until_disconnected(http: Request, poll_s: float = 0.25) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(poll_s)


class _MeteredCall:
    """One completion request on its way through the runtime, for metrics and headers.

    Labelled :data:`UNKNOWN_MODEL` until :meth:`label` names the model and the adapter (a
    request refused before its body was read has neither); counted once, by :meth:`done`.
    """

    def __init__(self, runtime: LorafleetRuntime) -> None:
        self.runtime = runtime
        self.model = self.adapter = UNKNOWN_MODEL
        self.start = time.perf_counter()
        self.headers: dict[str, str] = {}
        self.counted = False

    def label(self, model: str, adapter: str) -> None:
        self.model, self.adapter = model, adapter
        self.headers = {"x-lorafleet-adapter": adapter}

    def done(self, status: int, result: GenerationResult | None = None) -> None:
        if self.counted:
            return
        self.counted = True
        tokens = (result.prompt_tokens, result.completion_tokens) if result else (0, 0)
        self.runtime.metrics.observe(
            self.model, self.adapter, status, time.perf_counter() - self.start, *tokens
        )

    def retry_headers(self) -> dict[str, str]:
        return {**self.headers, "retry-after": str(self.runtime.batcher.retry_after_s())}


async def _stream(
    call: _MeteredCall,
    body: _CompletionRequest,
    future: asyncio.Future[GenerationResult],
    texts: asyncio.Queue[str | None],
    head: dict[str, Any],
) -> AsyncIterator[str]:
    def chunk(choice: dict[str, Any]) -> str:
        return _event({**head, "object": body.chunk_object, "choices": [{"index": 0, **choice}]})

    # Deltas are queued on the loop before the result is set, so None comes last.
    future.add_done_callback(lambda _: texts.put_nowait(None))
    status, result, error = 499, None, None  # 499 stays if the client goes away mid-stream
    try:
        if body.opening_choice is not None:
            yield chunk(body.opening_choice)
        async with asyncio.timeout(call.runtime.request_timeout_s):
            while (text := await texts.get()) is not None:
                yield chunk(body.chunk_choice(text, None))
        result, status = future.result(), 200
    except TimeoutError:
        status, error = 503, _timed_out(call.runtime)
    except LorafleetError as exc:  # the adapter was unloaded while the request queued
        status, error = 404, str(exc)
    except Exception as exc:  # a server fault, after the 200 went out: the client is told
        status, error = 500, _internal_error(call, exc)
    finally:
        future.cancel()  # no-op when done; stops the row when the client went away
        call.done(status, result)
    if error is not None:
        yield _event({"error": {"message": error, "code": status}})
        return
    yield chunk(body.chunk_choice("", result.finish_reason))
    if body.stream_options is not None and body.stream_options.include_usage:
        # OpenAI's usage event: the last before [DONE], with no choices.
        yield _event({**head, "object": body.chunk_object, "choices": [], "usage": _usage(result)})
    yield "data: [DONE]\n\n"


def _body_too_large(size: int, limits: RequestLimits) -> Response:
    return _error(
        400,
        f"request body is {size} bytes; the limit is {limits.max_body_bytes} "
        "(lorafleet serve --max-body-bytes)",
        code="body_too_large",
    )


def _over_limits(
    body: _CompletionRequest, request: GenerationRequest, limits: RequestLimits
) -> Response | None:
    """A 400 naming the limit a parsed request breaks, or ``None``."""
    if request.max_new_tokens > limits.max_tokens:
        param = (
            "max_completion_tokens"
            if getattr(body, "max_completion_tokens", None)
            else "max_tokens"
        )
        return _error(
            400,
            f"{param} is {request.max_new_tokens}; the limit is {limits.max_tokens} "
            "(lorafleet serve --max-tokens-limit)",
            param=param,
            code="max_tokens_over_limit",
        )
    chars = body.prompt_chars()
    if chars > limits.max_prompt_chars:
        param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        return _error(
            400,
            f"{param} is {chars} characters; the limit is {limits.max_prompt_chars} "
            "(lorafleet serve --max-prompt-chars)",
            param=param,
            code="prompt_over_limit",
        )
    return None


class _Endpoints:
    """The route handlers of :func:`openai_router`, bound to one runtime.

    Args:
        runtime: the runtime that answers.
        default_max_tokens: the generation budget when a request sets none.
    """

    def __init__(
        self, runtime: LorafleetRuntime, default_max_tokens: int, api_keys: ApiKeys | None
    ) -> None:
        self.runtime = runtime
        self.default_max_tokens = default_max_tokens
        self.api_keys = api_keys
        self.created = int(time.time())

    def refuse(self, http: Request) -> Response | None:
        """The 401/429 answer for a request without a valid key or over its key's rate;
        ``None`` when no keys are configured or the request may go on."""
        if self.api_keys is None:
            return None
        refusal = self.api_keys.admit(http.headers.get("authorization"))
        if refusal is None:
            return None
        self.runtime.metrics.reject(refusal.reason)
        return JSONResponse(refusal.body(), refusal.status, refusal.headers())

    async def chat_completions(self, http: Request) -> Response:
        """``POST /openai/v1/chat/completions``."""
        return await self.complete(http, ChatCompletionRequest)

    async def completions(self, http: Request) -> Response:
        """``POST /openai/v1/completions``."""
        return await self.complete(http, CompletionRequest)

    async def models(self, http: Request) -> Response:
        """``GET /openai/v1/models``: the base, every adapter and every route, by name only
        (``root`` is the name too: where the weights live on disk is nobody's business but
        the server's)."""
        refused = self.refuse(http)
        if refused is not None:
            return refused
        runtime = self.runtime
        data = [self._card(runtime.name, runtime.name, None)]
        data += [self._card(name, name, runtime.name) for name in runtime.adapters]
        data += [
            self._card(name, route["targets"][0]["adapter"], runtime.name)
            for name, route in runtime.routes.as_dict().items()
        ]
        return JSONResponse({"object": "list", "data": data})

    def _card(self, name: str, root: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "lorafleet",
            "root": root,
            "parent": parent,
        }

    async def complete(self, http: Request, schema: type[_CompletionRequest]) -> Response:
        """Answer a completion request and count the answer, whatever raised on the way: an
        exception is a 500 (``code: internal_error``), logged with its traceback."""
        call = _MeteredCall(self.runtime)
        try:
            response = await self._complete(http, schema, call)
        except Exception as exc:
            call.done(500)
            message = _internal_error(call, exc)
            return _error(500, message, code="internal_error", headers=call.headers)
        if not isinstance(response, StreamingResponse):  # a stream counts itself as it ends
            call.done(response.status_code)
        return response

    async def _complete(
        self, http: Request, schema: type[_CompletionRequest], call: _MeteredCall
    ) -> Response:
        """Parse a completion request, route it, queue it and answer (streamed or whole)."""
        refused = self.refuse(http)
        if refused is not None:
            return refused
        runtime = self.runtime
        limits = runtime.limits
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            return _body_too_large(int(declared), limits)
        raw = await http.body()
        if len(raw) > limits.max_body_bytes:
            return _body_too_large(len(raw), limits)
        try:
            body = schema.model_validate_json(raw)
        except ValidationError as exc:
            loc, _ = validation_problems(exc)[0]
            param = ".".join(map(str, loc)) or None
            return _error(400, first_problem(exc, "body"), param=param)
        served = runtime.routes.resolve(body.model, http.headers)
        try:
            adapter = runtime.adapter_for(served)
        except KeyError:
            # A route whose target is missing here is the route's failure, and counted as
            # such (a canary must see it); any other name stays out of the labels.
            if body.model in runtime.routes:
                call.label(body.model, served)
            return _error(
                404,
                f"The model `{body.model}` does not exist.",
                param="model",
                code="model_not_found",
                headers=call.headers,
            )
        call.label(body.model, served)
        injected = await runtime.faults.inject(served)  # canary drills only; no fault: None
        if injected is not None:
            message = f"injected fault on {served!r} (canary drill, /admin/faults)"
            return _error(injected, message, code="injected_fault", headers=call.headers)
        request = body.generation_request(adapter, min(self.default_max_tokens, limits.max_tokens))
        refused = _over_limits(body, request, limits)
        if refused is not None:
            return refused
        head = {
            "id": f"{body.id_prefix}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body.model,
        }
        texts: asyncio.Queue[str | None] = asyncio.Queue()
        try:
            future = runtime.batcher.enqueue(request, texts.put_nowait if body.stream else None)
        except Overloaded as exc:
            return _error(429, str(exc), code="overloaded", headers=call.retry_headers())
        if body.stream:
            return StreamingResponse(
                _stream(call, body, future, texts, head),
                media_type="text/event-stream",
                headers=call.headers,
            )
        return await self._whole_answer(http, call, body, future, head)

    async def _whole_answer(
        self,
        http: Request,
        call: _MeteredCall,
        body: _CompletionRequest,
        future: asyncio.Future[GenerationResult],
        head: dict[str, Any],
    ) -> Response:
        """Wait for a queued request's result, its deadline or its client's disconnect."""
        watch = asyncio.create_task(_until_disconnected(http))
        try:
            await asyncio.wait(
                [future, watch],
                timeout=self.runtime.request_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            watch.cancel()
        if not future.done():
            future.cancel()  # timed out, or the client went away: drop the work
            if watch.done() and not watch.cancelled():
                return Response(status_code=499)
            message = _timed_out(self.runtime)
            return _error(503, message, code="timeout", headers=call.retry_headers())
        try:
            result = future.result()
        except LorafleetError as exc:  # the adapter was unloaded while the request queued
            return _error(404, str(exc), param="model", code="model_not_found")
        call.done(200, result)
        choice = {"index": 0, **body.choice(result.text, result.finish_reason)}
        return JSONResponse(
            {**head, "object": body.object, "choices": [choice], "usage": _usage(result)},
            headers=call.headers,
        )


def openai_router(
    runtime: LorafleetRuntime, default_max_tokens: int = 128, api_keys: ApiKeys | None = None
) -> APIRouter:
    """The OpenAI-compatible routes for a loaded runtime, under ``/openai/v1``.

    Args:
        runtime: the runtime that answers.
        default_max_tokens: the generation budget when a request sets none.
        api_keys: the keys the routes require; open to anyone when ``None``.

    Returns:
        A router to include in the server's FastAPI app.
    """
    endpoints = _Endpoints(runtime, default_max_tokens, api_keys)
    router = APIRouter(prefix="/openai/v1")
    # 200: JSON, or server-sent events with `stream: true`. 400: a malformed request or one
    # over a limit; 401/429: API keys; 404: no such model; 429/503: overloaded / timed out;
    # 500: a server fault.
    answers = _errors(400, 401, 404, 429, 500, 503)
    stream = {"text/event-stream": {"schema": {"type": "string"}}}
    for path, schema, answer, handler in (
        ("/chat/completions", ChatCompletionRequest, ChatCompletion, endpoints.chat_completions),
        ("/completions", CompletionRequest, Completion, endpoints.completions),
    ):
        router.post(
            path,
            responses={200: {"model": answer, "content": stream}, **answers},
            openapi_extra={"requestBody": _request_body(schema, runtime.limits)},
        )(handler)
    router.get("/models", responses={200: {"model": ModelList}, **_errors(401, 429)})(
        endpoints.models
    )
    return router
