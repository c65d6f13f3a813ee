"""`mobilemoe serve`: an OpenAI-compatible HTTP server over one loaded model, on aiohttp.

    GET  /v1/models             the one model, named after its checkpoint directory (or --name)
    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    POST /v1/chat/completions   {"model", "messages", ...} rendered with the checkpoint's chat template

`stream: true` answers as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
The model and its KV cache exist once, so requests are served one at a time in arrival order (an
asyncio.Lock, FIFO): a second request waits in the queue instead of sharing the cache. Generation runs on
one worker thread, so the event loop keeps accepting requests and answering /v1/models meanwhile. Every
error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a 4xx status
for bad requests (500 for a bug); the server keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from aiohttp import web

from mobilemoe.infer.generate import Sampling, generate_tokens
from mobilemoe.model import Transformer
from mobilemoe.tokenizer import Tokenizer
from mobilemoe.ui import console

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class APIError(Exception):
    """A request the server refuses: becomes an OpenAI-style JSON error with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status)


@dataclass
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]


@dataclass
class Generated:
    text: str
    finish_reason: str  # "stop" (stop token or string) or "length" (max_tokens or the context's end)
    tokens: int


class Server:
    """One model behind the OpenAI routes; `app()` is the aiohttp application."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str, cache_dtype: torch.dtype | None = None,
                 max_context: int | None = None):
        self.model, self.tokenizer, self.name, self.cache_dtype = model, tokenizer, name, cache_dtype
        self.max_context = max_context or model.cfg.max_seq_len
        self.created = int(time.time())
        self.lock = asyncio.Lock()  # one generation at a time: the model has one KV cache
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mobilemoe-generate")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_openai_errors])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.on_cleanup.append(self._shutdown)
        return app

    async def _shutdown(self, app: web.Application) -> None:
        self.worker.shutdown(wait=True)

    # --- routes -----------------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string (one prompt per request)", "prompt")
        gen = self._generation_request(body, self.tokenizer.encode(prompt, start=True), DEFAULT_COMPLETION_TOKENS)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}

        def choice(text: str, finish: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if body.get("stream"):
            return await self._stream(request, gen, meta, lambda piece: choice(piece, None),
                                      lambda finish: choice("", finish))
        out = await self._generate(gen, _ignore)
        return web.json_response({**meta, "choices": [choice(out.text, out.finish_reason)],
                                  "usage": _usage(gen, out)})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        ids = self._encode_messages(body.get("messages"))
        gen = self._generation_request(body, ids, None)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name}
        if body.get("stream"):
            def delta(content: str | None, finish: str | None = None, role: bool = False) -> dict:
                d = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
                return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}

            chunk_meta = {**meta, "object": "chat.completion.chunk"}
            return await self._stream(request, gen, chunk_meta, delta, lambda finish: delta(None, finish),
                                      first=delta(None, role=True))
        out = await self._generate(gen, _ignore)
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
                  "finish_reason": out.finish_reason}
        return web.json_response({**meta, "choices": [choice], "usage": _usage(gen, out)})

    # --- request parsing --------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is None:
            raise APIError(400, "'model' is required; GET /v1/models lists the one this server has", "model")
        if model != self.name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.name}'", "model",
                           "model_not_found")
        return body

    def _encode_messages(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        plain = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: only text parts have a meaning here
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise APIError(400, f"messages[{i}]: only text content parts are supported", "messages")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string", "messages")
            plain.append({"role": m["role"], "content": content})
        return self.tokenizer.encode_chat(plain, add_generation_prompt=True)[0]

    def _generation_request(self, body: dict[str, Any], prompt: list[int], default_max: int | None
                            ) -> GenerationRequest:
        def number(key: str, default: float, low: float, high: float, kind: type = float) -> Any:
            value = body.get(key)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
                raise APIError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got "
                                    f"{json.dumps(value)}", key)
            if not low <= value <= high:
                raise APIError(400, f"'{key}' must be between {low} and {high}, got {value}", key)
            return kind(value)

        if not prompt:
            raise APIError(400, "the prompt encodes to no tokens", "prompt")
        room = self.max_context - len(prompt)
        if room <= 0:
            raise APIError(400, f"the prompt has {len(prompt)} tokens but the model's context holds "
                                f"{self.max_context}; shorten it", "messages" if default_max is None else "prompt",
                           "context_length_exceeded")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = number(key, default_max or room, 1, 2**31, int)
        number("n", 1, 1, 1, int)  # one choice per request
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
        sampling = Sampling(temperature=number("temperature", 1.0, 0.0, 2.0), top_p=number("top_p", 1.0, 0.0, 1.0),
                            seed=number("seed", 0, -2**63, 2**63 - 1, int))
        if sampling.top_p == 0:  # OpenAI accepts top_p 0; keep the single most likely token
            sampling.temperature = 0.0
        return GenerationRequest(prompt, min(max_tokens, room), sampling, stop)

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "mobilemoe"}

    # --- generation ---------------------------------------------------------------------------------------
    async def _generate(self, gen: GenerationRequest, on_piece: Callable[[str], Awaitable[None]]) -> Generated:
        """Wait for the model, generate on the worker thread, hand each new text piece to `on_piece`."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        cancelled = threading.Event()
        async with self.lock:
            future = loop.run_in_executor(self.worker, self._run, gen,
                                          lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece), cancelled)
            future.add_done_callback(lambda _: pieces.put_nowait(None))
            try:
                while (piece := await pieces.get()) is not None:
                    await on_piece(piece)
            finally:  # a client that went away stops its generation; the next request waits for the thread
                cancelled.set()
                result = await future
        return result

    def _run(self, gen: GenerationRequest, emit: Callable[[str], None], cancelled: threading.Event) -> Generated:
        """Worker thread: generate, decode incrementally, emit text that is final (complete characters, no
        possible start of a stop string)."""
        stop_ids = self.tokenizer.stop_ids()
        hold = max((len(s) for s in gen.stop), default=1) - 1
        out: list[int] = []
        shown, finish = "", "length"
        for token in generate_tokens(self.model, gen.prompt, gen.max_tokens, gen.sampling, stop_ids,
                                     max_context=self.max_context, cache_dtype=self.cache_dtype):
            if cancelled.is_set():
                break
            if token in stop_ids:
                finish = "stop"
                break
            out.append(token)
            text = self.tokenizer.decode(out)
            cut = min((i for i in (text.find(s) for s in gen.stop) if i >= 0), default=-1)
            if cut >= 0:
                finish = "stop"
                break
            if text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
                continue
            final = len(text) - hold
            if final > len(shown):
                emit(text[len(shown):final])
                shown = text[:final]
        text = self.tokenizer.decode(out)
        cut = min((i for i in (text.find(s) for s in gen.stop) if i >= 0), default=len(text))
        text = text[:cut]
        if len(text) > len(shown):
            emit(text[len(shown):])
        return Generated(text, finish, len(out))

    async def _stream(self, request: web.Request, gen: GenerationRequest, meta: dict,
                      piece_choice: Callable[[str], dict], final_choice: Callable[[str], dict],
                      first: dict | None = None) -> web.StreamResponse:
        """Server-sent events: one chunk per text piece, a final chunk with the finish reason, [DONE]."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(choice: dict) -> None:
            await response.write(f"data: {json.dumps({**meta, 'choices': [choice]})}\n\n".encode())

        if first is not None:
            await send(first)
        out = await self._generate(gen, lambda piece: send(piece_choice(piece)))
        await send(final_choice(out.finish_reason))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _ignore(piece: str) -> None:
    return None


def _usage(gen: GenerationRequest, out: Generated) -> dict:
    return {"prompt_tokens": len(gen.prompt), "completion_tokens": out.tokens,
            "total_tokens": len(gen.prompt) + out.tokens}


@web.middleware
async def _openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every failure as OpenAI's JSON error shape; the server itself keeps running."""
    try:
        return await handler(request)
    except APIError as err:
        return err.response()
    except web.HTTPException as err:  # unknown route (404), wrong method (405), body too large (413)
        if err.status < 400:
            raise
        return APIError(err.status, f"{request.method} {request.path}: {err.reason}").response()
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as err:  # a bug: say so to the client and the console, keep serving
        console.print_exception()
        return APIError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").response()


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run until interrupted."""
    console.print(f"serving '{server.name}' on http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)")
    web.run_app(server.app(), host=host, port=port, print=None)
