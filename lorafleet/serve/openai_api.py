"""OpenAI-compatible endpoints of the lorafleet runtime.

``POST /openai/v1/chat/completions`` and ``POST /openai/v1/completions`` (both also with
``stream: true``: server-sent events ending in ``data: [DONE]``), and
``GET /openai/v1/models``, which lists the base and every adapter (``parent`` = the base).
``model`` names the base or an adapter. Decoding is always greedy: sampling parameters
(``temperature``, ``top_p``, ...) are accepted and ignored. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``.

KServe's own OpenAI endpoints need vLLM, so the runtime mounts this router on KServe's app.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from abc import abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from lorafleet.generation import FinishReason, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from lorafleet.serve.runtime import LorafleetRuntime

__all__ = ["ChatCompletionRequest", "CompletionRequest", "openai_router"]


class _CompletionRequest(BaseModel):
    """Fields both endpoints share; unknown fields are ignored. (Pydantic models are ABCs.)"""

    object: ClassVar[str]
    chunk_object: ClassVar[str]
    id_prefix: ClassVar[str]
    # The first event of a stream, before any text (the chat API announces the role).
    opening_choice: ClassVar[dict[str, Any] | None] = None

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False

    @abstractmethod
    def generation_request(self, adapter: str | None, max_new_tokens: int) -> GenerationRequest:
        """The request for the generator."""

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
    max_completion_tokens: int | None = Field(None, ge=1)

    def generation_request(self, adapter: str | None, max_new_tokens: int) -> GenerationRequest:
        return GenerationRequest(
            messages=[m.model_dump() for m in self.messages],
            adapter=adapter,
            max_new_tokens=self.max_completion_tokens or self.max_tokens or max_new_tokens,
            stop=self.stops,
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

    def generation_request(self, adapter: str | None, max_new_tokens: int) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt,
            adapter=adapter,
            max_new_tokens=self.max_tokens or max_new_tokens,
            stop=self.stops,
        )

    def choice(self, text: str, finish_reason: FinishReason) -> dict[str, Any]:
        return {"text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: FinishReason | None) -> dict[str, Any]:
        return self.choice(text, finish_reason)


def _error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(
    runtime: LorafleetRuntime,
    body: _CompletionRequest,
    request: GenerationRequest,
    head: dict[str, Any],
) -> AsyncIterator[str]:
    def chunk(choice: dict[str, Any]) -> str:
        return _event({**head, "object": body.chunk_object, "choices": [{"index": 0, **choice}]})

    texts: asyncio.Queue[str | None] = asyncio.Queue()
    task = asyncio.create_task(runtime.generate(request, on_delta=texts.put_nowait))
    # Deltas are queued on the loop before the result is set, so None comes last.
    task.add_done_callback(lambda _: texts.put_nowait(None))
    if body.opening_choice is not None:
        yield chunk(body.opening_choice)
    while (text := await texts.get()) is not None:
        yield chunk(body.chunk_choice(text, None))
    yield chunk(body.chunk_choice("", task.result().finish_reason))
    yield "data: [DONE]\n\n"


def openai_router(runtime: LorafleetRuntime, default_max_tokens: int = 128) -> APIRouter:
    """The OpenAI-compatible routes for a loaded runtime, under ``/openai/v1``.

    Args:
        runtime: the runtime that answers.
        default_max_tokens: the generation budget when a request sets none.

    Returns:
        A router to include in the server's FastAPI app.
    """
    router = APIRouter(prefix="/openai/v1")
    created = int(time.time())

    async def complete(http: Request, schema: type[_CompletionRequest]) -> Response:
        try:
            body = schema.model_validate_json(await http.body())
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(map(str, err["loc"])) or None
            return _error(400, f"{param or 'body'}: {err['msg']}", param=param)
        try:
            adapter = runtime.adapter_for(body.model)
        except KeyError:
            return _error(
                404,
                f"The model `{body.model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        request = body.generation_request(adapter, default_max_tokens)
        head = {
            "id": f"{body.id_prefix}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body.model,
        }
        if body.stream:
            return StreamingResponse(
                _stream(runtime, body, request, head), media_type="text/event-stream"
            )
        result = await runtime.generate(request)
        choice = {"index": 0, **body.choice(result.text, result.finish_reason)}
        return JSONResponse(
            {**head, "object": body.object, "choices": [choice], "usage": _usage(result)}
        )

    @router.post("/chat/completions")
    async def chat_completions(http: Request) -> Response:
        return await complete(http, ChatCompletionRequest)

    @router.post("/completions")
    async def completions(http: Request) -> Response:
        return await complete(http, CompletionRequest)

    @router.get("/models")
    async def models() -> dict[str, Any]:
        def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "lorafleet",
                "root": root,
                "parent": parent,
            }

        data = [card(runtime.name, str(runtime.base_dir), None)]
        data += [card(name, str(path), runtime.name) for name, path in runtime.adapters.items()]
        return {"object": "list", "data": data}

    return router
