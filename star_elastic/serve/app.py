"""An OpenAI-compatible HTTP server over one elastic checkpoint (`star-elastic serve CKPT`).

    GET  /v1/models             one entry per budget; its id is the budget's name
    POST /v1/completions        {"model": "0.5", "prompt": "...", "max_tokens": 16, "stream": false, ...}
    POST /v1/chat/completions   {"model": "1.0", "messages": [{"role": "user", "content": "..."}], ...}

The request's `model` picks the budget. Every budget is a view of the one loaded parent, so
requests at different budgets share a single copy of the weights. Generations are batched
(batching.py): concurrent requests, at the same or at different budgets, join the running batch
between decode steps; each waits on a worker thread while the event loop keeps accepting requests
and streaming tokens. A client that disconnects (streaming or not) frees its slot at once.
Elastic budget control through the API: `"think_budget": "0.5"` (with optional
`max_think_tokens`, `think_marker`) thinks with that budget and answers with `model`.
A streamed chunk carries all the text ready when it is sent (under load, several tokens' worth);
`"stream_options": {"include_usage": true}` ends the stream with OpenAI's usage chunk.

Bad requests get a 4xx JSON error `{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import StarElasticError
from .batching import BatchedEngine
from .engine import DEFAULT_MARKER, ElasticEngine

DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 256}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# ----------------------------------------------------------------------------- request parsing

def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be a number from {lo} to {hi}, got {json.dumps(v)}", name)
    return float(v)


def _int(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f"at least {lo}" if hi is None else f"from {lo} to {hi}"
        raise ApiError(400, f"'{name}' must be an integer {bound}, got {json.dumps(v)}", name)
    return v


def _budget(engine: ElasticEngine, body: dict, name: str) -> str:
    v = body.get(name)
    if not isinstance(v, str) or not v:
        raise ApiError(400, f"'{name}' is required: one of the budgets {', '.join(engine.budgets)}", name)
    if v not in engine.budgets:  # a budget between two trained ones is served as the router's architecture for it
        try:
            engine.view(v)
        except StarElasticError as e:
            raise ApiError(404, f"model {v!r} does not exist: this server's budgets are {', '.join(engine.budgets)}, "
                                f"or one between two of them ({e})", name, "model_not_found") from None
    return v


def _chat_ids(engine: ElasticEngine, messages) -> torch.Tensor:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}", "messages")
    clean = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI's content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role' and text 'content'", "messages")
        clean.append({"role": m["role"], "content": content})
    tok = engine.tokenizer
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(clean, add_generation_prompt=True, return_dict=False)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:  # no template: the contents, one per line
        ids = tok("\n".join(m["content"] for m in clean), add_special_tokens=False)["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


def _prompt_ids(engine: ElasticEngine, prompt) -> torch.Tensor:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = engine.parent.config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ApiError(400, f"'prompt' token ids must be in [0, {vocab})", "prompt")
        return torch.tensor([prompt], dtype=torch.long)
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or a list of token ids; one prompt per request)", "prompt")
    return torch.tensor([engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)


def parse_request(engine: ElasticEngine, body, kind: str) -> dict:
    """The generation arguments of a completions / chat request, or ApiError with a clear message."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _budget(engine, body, "model")
    ids = _chat_ids(engine, body.get("messages")) if kind == "chat" else _prompt_ids(engine, body.get("prompt"))
    ctx = engine.context_length
    n_prompt = ids.shape[1]
    if n_prompt == 0:
        raise ApiError(400, "the prompt is empty", "messages" if kind == "chat" else "prompt")
    if n_prompt >= ctx:
        raise ApiError(400, f"the prompt is {n_prompt} tokens, over the model's context of {ctx} tokens",
                       "messages" if kind == "chat" else "prompt", "context_length_exceeded")
    name = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _int(body, name, None, 1, ctx)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS[kind], ctx - n_prompt)
    if n_prompt + max_tokens > ctx:
        raise ApiError(400, f"the prompt ({n_prompt} tokens) plus {name} ({max_tokens}) is over the model's context "
                            f"of {ctx} tokens", name, "context_length_exceeded")
    if _int(body, "n", 1, 1) != 1:
        raise ApiError(400, "'n' must be 1 (one completion per request)", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                    and isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' must be an object with at most 'include_usage': true or false",
                       "stream_options")
    if options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
    args = dict(model=model, ids=ids, max_tokens=max_tokens, stream=stream, stop=stop or [],
                include_usage=bool((options or {}).get("include_usage")),
                temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), seed=_int(body, "seed", None, 0), think=None)
    if body.get("think_budget") is not None:  # elastic budget control: think small, answer with `model`
        think = _budget(engine, body, "think_budget")
        max_think = _int(body, "max_think_tokens", min(1024, ctx - n_prompt - max_tokens), 1)
        marker = body.get("think_marker", DEFAULT_MARKER)
        if not isinstance(marker, str):
            raise ApiError(400, "'think_marker' must be a string", "think_marker")
        if n_prompt + max_think + max_tokens + len(engine.tokenizer(marker, add_special_tokens=False)["input_ids"]) > ctx:
            raise ApiError(400, f"prompt ({n_prompt}) + max_think_tokens ({max_think}) + {name} ({max_tokens}) is "
                                f"over the model's context of {ctx} tokens", "max_think_tokens", "context_length_exceeded")
        args["think"] = dict(budget=think, max_tokens=max_think, marker=marker)
    return args


# ----------------------------------------------------------------------------- the app

class Detokenizer:
    """Text deltas of a growing token list, decoding a few tokens at a time rather than the whole list at every
    token (quadratic in the answer's length). A token's text depends on the tokens before it (a leading space, the
    bytes of one character split over tokens), so a delta is the text of tokens[prefix:] less that of
    tokens[prefix:read], where `prefix` trails by one emitted delta (the approach of TGI and vLLM)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""
        self.prefix = self.read = 0  # tokens[prefix:read]: the context of the next delta, already sent

    def add(self, token: int) -> str:
        self.tokens.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before, text = decode(self.tokens[self.prefix:self.read]), decode(self.tokens[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before):  # the rest of a character, or nothing shown yet
            return ""
        delta = text[len(before):]
        self.prefix, self.read, self.sent = self.read, len(self.tokens), self.sent + delta
        return delta


def _truncate_at_stop(text: str, stops: list[str], start: int = 0) -> tuple[str, bool]:
    """`text` cut before the first stop string found at or after `start`."""
    cut = min((i for i in (text.find(s, start) for s in stops if s) if i >= 0), default=None)
    return (text, False) if cut is None else (text[:cut], True)


def _stop_prefix_at_end(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that begins one of `stops` (0 if none does)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


class StreamEnd(NamedTuple):
    what: str  # "done" (value: the generation) or "error" (value: the exception)
    value: object
    stopped: bool  # a stop string ended the text


async def text_deltas(queue: asyncio.Queue, detok: Detokenizer, stops: list[str]):
    """The text of a streamed generation: reads ("token", id) items from `queue` until a ("done", generation) or
    ("error", exception) item, and yields each new piece of text (cut before a stop string, and holding back an
    end that may begin one until the next tokens say), then a `StreamEnd`.
    Everything already queued goes out as one piece: under load the event loop falls behind the batch, and a chunk
    per token would add as much HTTP work again as it has fallen behind by."""
    sent, stopped, longest_stop = "", False, max((len(s) for s in stops), default=0)
    while True:
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        seen, end = len(detok.sent), None
        for what, value in items:
            if what != "token":
                end = (what, value)
                break
            detok.add(value)
        if not stopped:
            # a stop string not in the text before can only begin where the new text reaches it
            text, stopped = _truncate_at_stop(detok.sent, stops, max(0, seen - longest_stop + 1))
            # text that may be the start of a stop string waits for the next tokens, unless the stream ends
            upto = len(text) if stopped or end else len(text) - _stop_prefix_at_end(text, stops)
            if upto > len(sent):
                yield text[len(sent):upto]
                sent = text[:upto]
        if end is not None:
            yield StreamEnd(*end, stopped)
            return


def create_app(engine: ElasticEngine) -> FastAPI:
    """The app over `engine`; a plain `ElasticEngine` is wrapped in a `BatchedEngine` sharing its weights and views."""
    app = FastAPI(title="star-elastic", version="1")
    if not isinstance(engine, BatchedEngine):
        engine = BatchedEngine.of(engine)
    # a thread per request in flight, blocked while the scheduler batches its generation with the others
    workers = max(64, 4 * engine.scheduler.slots * len(engine.budgets))
    worker = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="star-elastic-gen")
    app.state.engine, app.state.worker = engine, worker
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.kind, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return error_response(400, f"invalid request: {e.errors()[0].get('msg', 'bad value') if e.errors() else e}")

    @app.exception_handler(Exception)
    async def _internal_error(request, e):
        return error_response(500, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                              "server_error")

    async def read_json(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        entries = {b["name"]: b for b in engine.ckpt.manifest["budgets"]}
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "star-elastic",
             "params": entries[name].get("params"), "active_params": entries[name].get("active_params")}
            for name in engine.budgets]}

    def run(args: dict, on_token=None, cancel: threading.Event | None = None):
        """The generation of one request, on a worker thread; setting `cancel` ends it (its slot freed)."""
        if args["think"] is None:
            return engine.generate(args["model"], args["ids"], args["max_tokens"], args["temperature"], args["top_p"],
                                   args["seed"], args["stop"], on_token, cancel)
        t = args["think"]
        return engine.think_then_answer(args["ids"], t["budget"], args["model"], t["max_tokens"], args["max_tokens"],
                                        t["marker"], args["temperature"], args["top_p"], args["seed"],
                                        None if on_token is None else (lambda tok, phase: on_token(tok)), cancel)

    def give_up(cancel: threading.Event):
        cancel.set()
        engine.scheduler.wake()  # leave now, not at the next step

    async def until_done(request: Request, future, cancel: threading.Event):
        """The result of a non-streaming generation; a client that disconnects meanwhile cancels it."""
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    return future.result()
                if await request.is_disconnected():
                    give_up(cancel)
        finally:
            if not future.done():  # the handler itself was cancelled
                give_up(cancel)

    def texts(args: dict, gen) -> tuple[str, str, str]:
        """(reasoning, answer, finish_reason) of a finished generation."""
        tok = engine.tokenizer
        answer, hit = _truncate_at_stop(tok.decode(gen.tokens, skip_special_tokens=True), args["stop"])
        reasoning = tok.decode(gen.thinking, skip_special_tokens=True) if args["think"] else ""
        return reasoning, answer, "stop" if hit else gen.finish_reason

    def usage(args: dict, gen) -> dict:
        n_prompt, n_new = args["ids"].shape[1], len(gen.tokens) + len(gen.thinking)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}

    async def respond(request: Request, kind: str):
        args = parse_request(engine, await read_json(request), kind)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        base = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": args["model"]}
        if args["stream"]:
            return StreamingResponse(stream(args, kind, base), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        cancel = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(worker, run, args, None, cancel)
        gen = await until_done(request, future, cancel)
        reasoning, answer, finish = texts(args, gen)
        if kind == "chat":
            message = {"role": "assistant", "content": answer}
            if args["think"]:
                message["reasoning_content"] = reasoning
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": reasoning + answer, "finish_reason": finish, "logprobs": None}
        return {**base, "choices": [choice], "usage": usage(args, gen)}

    async def stream(args: dict, kind: str, base: dict):
        """Server-sent events in OpenAI's chunk format; a closed connection stops the generation."""
        loop, queue, closed = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        detok = Detokenizer(engine.tokenizer)

        def on_token(tok: int):
            loop.call_soon_threadsafe(queue.put_nowait, ("token", tok))
            return closed.is_set()

        def work():
            try:
                gen = run(args, on_token, closed)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", gen))
            except Exception as e:  # reported in the stream: the headers are already sent
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

        base = {**base, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def chunk(text: str | None, finish=None, role=False) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

        future = loop.run_in_executor(worker, work)
        try:
            if kind == "chat":
                yield chunk(None, role=True)
            async for item in text_deltas(queue, detok, args["stop"]):
                if isinstance(item, str):
                    yield chunk(item)
                elif item.what == "error":
                    yield f"data: {json.dumps({'error': {'message': f'internal error: {item.value}', 'type': 'server_error'}})}\n\n"
                else:
                    yield chunk(None, finish="stop" if item.stopped else item.value.finish_reason)
                    if args["include_usage"]:  # OpenAI's last chunk: no choices, the request's token counts
                        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage(args, item.value)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            give_up(closed)  # a client that went away: its request leaves the batch, its slot freed
            del future

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, "chat")

    return app


def serve(engine: ElasticEngine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    import uvicorn

    uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level)


__all__ = ["ApiError", "Detokenizer", "StarElasticError", "StreamEnd", "create_app", "serve", "text_deltas"]
