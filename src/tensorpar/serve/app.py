"""The OpenAI-compatible HTTP API over a ``ServingEngine``: ``create_app(engine, api_key)``.

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming as server-sent events
or not), GET /v1/models, POST /tokenize and /detokenize, GET /version, GET /health (200 "ok", or
"degraded" naming the replicas that are down while others serve; 503 when none can), GET /metrics,
and POST /update_weights_from_disk (SGLang's: ``{"model_path": ...}`` replaces the weights in place,
``ServingBackend.load_weights``). With ``api_key`` set, /v1/*, /tokenize, /detokenize and
/update_weights_from_disk require ``Authorization: Bearer <api_key>``; /health, /metrics and
/version stay open.
The model answers to each of ``served_names`` (default: the name it was loaded by); responses
carry the first.

One API request with ``P`` prompts and ``n`` choices each is ``P * n`` engine requests ``{id}-{k}``
(choice ``k = p * n + i``). Their token events
reach the handler through a ``RequestStream``; whenever the handler stops early (the client
went away, an error) it aborts what is still running, so the engine frees those sequences.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tensorpar import __version__
from tensorpar.errors import TensorparError
from tensorpar.runtime.serving import ServingBackend
from tensorpar.serve import params, tools
from tensorpar.serve.bridge import ClientDisconnected, RequestStream
from tensorpar.serve.errors import DEFAULT_MAX_REQUEST_BYTES, APIError, BodyLimit, install_error_handlers
from tensorpar.serve.metrics import CONTENT_TYPE, Metrics, RequestCounter
from tensorpar.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingFields,
                                      TokenizeRequest, UpdateWeightsRequest)
from tensorpar.serve.responses import ChatFormat, CompletionFormat, Format, TokenText


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _sse(obj) -> str:
    data = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def _key_checker(api_key: str):
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        got = request.headers.get("authorization")
        if not got:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                           code="invalid_api_key")
        if not hmac.compare_digest(got.encode(), expected):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    return check


class RequestTracking:
    """ASGI middleware: every response carries ``X-Request-Id`` (the request's own, or a new one,
    as vLLM's ``--enable-request-id-headers``), and ``load`` counts the /v1 requests in flight
    (vLLM's ``GET /load``)."""

    def __init__(self, app, api: "Handlers"):
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id")
        rid = given if given and len(given) <= 256 else uuid.uuid4().hex.encode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        counted = scope["path"].startswith("/v1/")
        self.api.load += counted
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.api.load -= counted


class Handlers:
    """The handlers' shared state: the engine, its metrics, and token texts for logprobs."""

    def __init__(self, engine: ServingBackend, limits: params.Limits, names: list[str]):
        self.engine, self.metrics, self.limits, self.names = engine, Metrics(engine, names[0]), limits, names
        self.token_text = TokenText(engine.tokenizer)
        self.defaults = dict(getattr(engine, "sampling_defaults", None) or {})  # ``--generation-config``
        self.created = int(time.time())
        self.load = 0  # /v1 requests in flight (``RequestTracking``)

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.names:
            served = ", ".join(f"'{n}'" for n in self.names)
            raise APIError(404, f"The model '{model}' does not exist; this server serves {served}.", param="model",
                           code="model_not_found")

    def check_healthy(self) -> None:
        try:
            stats = self.engine.stats()
        except Exception as e:
            raise APIError(503, f"the engine is unavailable: {e}", code="engine_unavailable") from None
        if not stats.get("healthy", True):
            raise APIError(503, f"the engine is unavailable: {stats.get('error') or 'unhealthy'}",
                           code="engine_unavailable")

    async def run(self, request: Request, body: SamplingFields, fmt: Format, prompts: list[list[int]],
                  max_tokens: list[int], logprobs: int, arrived: float, prompt_logprobs: int | None = None) -> Response:
        """Generate for each prompt (``n`` choices each, prompt-major: choice ``p * n + i``)."""
        requests = [r for ids, most in zip(prompts, max_tokens)
                    for r in params.serve_requests(body, fmt.id, ids, most, logprobs, self.limits.max_n, prompt_logprobs,
                                                   self.engine.inputs.vocab_size, self.defaults, self.engine.tokenizer)]
        for k, r in enumerate(requests):  # engine request "{id}-{k}" is choice k
            r.request_id = f"{fmt.id}-{k}"
        self.check_healthy()
        for _ in prompts:
            self.metrics.request_n.observe(body.n or 1)
        prompt_tokens = sum(len(ids) for ids in prompts)
        stream = RequestStream(self.engine, requests, self.metrics, arrived, f"{request.method} {request.url.path}",
                               prompt_tokens)
        if body.stream:  # submitted once the stream starts: a client gone before then costs nothing
            return StreamingResponse(self._events(request, stream, fmt, prompt_tokens, len(requests)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._start(stream)
        return await self._collect(request, stream, fmt, prompt_tokens, len(requests))

    @staticmethod
    def _start(stream: RequestStream) -> None:
        try:
            stream.start()
        except Exception as e:
            stream.close()
            raise APIError(503, f"the engine refused the request: {e}", code="engine_unavailable") from None

    async def _collect(self, request, stream: RequestStream, fmt: Format, prompt_tokens: int, n: int):
        choices = [fmt.new_choice(i) for i in range(n)]
        stream.watch(request)  # nothing cancels a plain response when its client leaves
        try:
            while (item := await stream.next()) is not None:
                choices[item[0]].add(item[1])
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it
        finally:
            stream.close()
        errors = [c.error or "generation failed" for c in choices if c.finish_reason == "error"]
        if errors:  # the engine ends requests with "error" when a rank died or it is shutting down
            raise APIError(503, errors[0], code="engine_error")
        return JSONResponse(fmt.full(choices, prompt_tokens))

    async def _events(self, request, stream: RequestStream, fmt: Format, prompt_tokens: int, n: int):
        """Server-sent events; the server cancels this generator when the client disconnects."""
        spec = tuple(int(x) for x in request.scope.get("asgi", {}).get("spec_version", "2.0").split("."))
        if spec >= (2, 4):  # such servers do not cancel a stream on disconnect: watch for it
            stream.watch(request)
        choices = [fmt.new_choice(i) for i in range(n)]
        try:
            try:
                self._start(stream)
            except APIError as e:
                yield _sse(e.body())
                yield "data: [DONE]\n\n"
                return
            for i in range(n):
                if (chunk := fmt.opening(i)) is not None:
                    yield _sse(chunk)
            while (item := await stream.next()) is not None:
                i, ev = item
                offset = choices[i].add(ev)
                if fmt.continuous_usage:
                    fmt.live_usage = fmt.usage(prompt_tokens, choices)
                if ev.finished and ev.finish_reason == "error":
                    yield _sse(APIError(503, ev.error or "generation failed", code="engine_error").body())
                    stream.close()
                    break
                for chunk in fmt.piece(i, ev, offset):
                    yield _sse(chunk)
            else:
                if fmt.include_usage:
                    yield _sse(fmt.chunk([], fmt.usage(prompt_tokens, choices)))
            yield "data: [DONE]\n\n"
        except ClientDisconnected:
            return
        finally:
            stream.close()


def create_app(engine: ServingBackend, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, limits: params.Limits = params.Limits(),
               served_names: list[str] | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``engine`` (see the module docstring); a request body of
    more than ``max_request_bytes`` is answered 413, one asking more than ``limits`` 400."""
    app = FastAPI(title="tensorpar", version=__version__, strict_content_type=False)
    names = list(served_names or [engine.model_name])
    api = Handlers(engine, limits, names)
    app.state.api = api
    app.add_middleware(RequestCounter, metrics=api.metrics)
    app.add_middleware(RequestTracking, api=api)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    install_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_key_checker(api_key))] if api_key else [])

    def model_card(name: str) -> dict:
        """vLLM's model card: ``root`` the model as loaded, no ``parent`` (a base model)."""
        return {"id": name, "object": "model", "created": api.created, "owned_by": "tensorpar",
                "root": engine.model_name, "parent": None, "max_model_len": engine.max_model_len,
                "permission": [{"id": f"modelperm-{name}", "object": "model_permission", "created": api.created,
                                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                                "organization": "*", "group": None, "is_blocking": False}]}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in names]}

    @v1.get("/models/{model:path}")
    async def model(model: str):
        api.check_model(model)
        return model_card(model)

    def admitted(body, top_n: int | None, field: str) -> float:
        """When a request arrived, once its model and fields are checked."""
        arrived = time.perf_counter()
        api.check_model(body.model)
        params.refuse_unsupported(body)
        params.check_top_n(top_n, field)
        return arrived

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        arrived = admitted(body, body.logprobs, "logprobs")
        params.check_prompt_logprobs(body)
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise APIError(400, f"best_of {body.best_of} is not supported: only best_of equal to n "
                                f"({body.n or 1}) is served", param="best_of")
        prompts = params.completion_prompts(body, engine.inputs)
        echo = bool(body.echo)
        default = params.default_max_tokens(params.COMPLETION_DEFAULT_MAX_TOKENS, api.defaults)
        max_tokens = [params.max_new_tokens(body.max_tokens, default, len(ids), engine.inputs, "prompt",
                                            limits.max_tokens, echo) for ids, _ in prompts]
        include_usage, continuous = params.stream_usage(body, limits)
        n = body.n or 1
        fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", names[0], api.token_text, body.logprobs, include_usage,
                               [ids for ids, _ in prompts for _ in range(n)] if body.return_token_ids else None,
                               body.prompt_logprobs, echo=[text for _, text in prompts for _ in range(n)] if echo else None)
        scored = [k for k in (body.prompt_logprobs, body.logprobs if echo else None) if k is not None]
        prompt_logprobs = max(scored) if scored else None
        fmt.continuous_usage, fmt.details_every = continuous, n if limits.prompt_tokens_details else None
        fmt.tokens_as_ids = bool(body.return_tokens_as_token_ids)
        return await api.run(request, body, fmt, [ids for ids, _ in prompts], max_tokens, body.logprobs or 0,
                             arrived, prompt_logprobs)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        arrived = admitted(body, body.top_logprobs, "top_logprobs")
        params.check_prompt_logprobs(body)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        ids = params.chat_prompt_ids(body, engine.inputs, limits.trust_chat_template)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = [params.max_new_tokens(asked, params.default_max_tokens(None, api.defaults), len(ids),
                                            engine.inputs, "messages", limits.max_tokens)]
        include_usage, continuous = params.stream_usage(body, limits)
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        last = body.messages[-1]  # ``echo``: a reply continuing the assistant's last message starts with it
        echo = (params.message_text(last.content) or "") if body.echo and last.role == "assistant" else ""
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", names[0], api.token_text, top_n, include_usage,
                         [ids] * (body.n or 1) if body.return_token_ids else None, body.prompt_logprobs,
                         tool_calls=tools.offered(body) is not None, echo=echo,
                         reasoning=limits.reasoning_parser is not None, include_reasoning=body.include_reasoning is not False)
        fmt.continuous_usage = continuous
        fmt.details_every = (body.n or 1) if limits.prompt_tokens_details else None
        fmt.tokens_as_ids = bool(body.return_tokens_as_token_ids)
        return await api.run(request, body, fmt, [ids], max_tokens, top_n or 0, arrived, body.prompt_logprobs)

    app.include_router(v1)
    utility = APIRouter(dependencies=[Depends(_key_checker(api_key))] if api_key else [])

    @utility.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        api.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if body.prompt is not None:
            try:
                ids = engine.inputs.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
        else:
            if body.add_special_tokens:
                raise APIError(400, "add_special_tokens with messages is not supported: the chat template places "
                                    "the special tokens", param="add_special_tokens")
            chat = ChatCompletionRequest(messages=body.messages, **body.model_dump(
                include={"add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs",
                         "tools"}, exclude_none=True))
            ids = params.chat_prompt_ids(chat, engine.inputs, limits.trust_chat_template)
        out = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = engine.tokenizer.convert_ids_to_tokens(ids)
        return out

    @utility.get("/tokenizer_info")
    async def tokenizer_info():
        """vLLM's: the tokenizer's class and its configuration (what can be told in JSON)."""
        tok = engine.tokenizer
        config = {k: v for k, v in (getattr(tok, "init_kwargs", None) or {}).items() if _jsonable(v)}
        return {"tokenizer_class": type(tok).__name__, **config,
                "chat_template": engine.inputs.chat_template or getattr(tok, "chat_template", None)}

    @utility.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        api.check_model(body.model)
        vocab = engine.inputs.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be from 0 to {vocab - 1}", param="tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    @utility.post("/update_weights_from_disk")
    async def update_weights_from_disk(body: UpdateWeightsRequest):
        if body.load_format not in (None, "auto"):
            raise APIError(400, f"load_format {body.load_format!r} is not supported: the format is read from the "
                                "checkpoint", param="load_format")
        try:
            seconds = await asyncio.to_thread(engine.load_weights, body.model_path)
        except TensorparError as e:  # SGLang's fields beside OpenAI's error object
            error = APIError(400, str(e), param="model_path")
            return JSONResponse({**error.body(), "success": False, "message": str(e)}, status_code=400)
        return {"success": True, "message": f"weights of {body.model_path} loaded in {seconds:.2f} s"}

    @utility.post("/invocations")
    async def invocations(request: Request):
        """SageMaker's entry point: a body with ``messages`` is a chat completion, one with ``prompt``
        a completion (as vLLM routes it)."""
        try:
            raw = await request.json()
        except ValueError:
            raise APIError(400, "the body is not JSON") from None
        if not isinstance(raw, dict) or ("messages" in raw) == ("prompt" in raw):
            raise APIError(400, "/invocations takes a chat completion (messages) or a completion (prompt) body")
        from pydantic import ValidationError

        try:
            if "messages" in raw:
                return await chat_completions(ChatCompletionRequest.model_validate(raw), request)
            return await completions(CompletionRequest.model_validate(raw), request)
        except ValidationError as e:
            first = e.errors()[0]
            raise APIError(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}",
                           param=str(first["loc"][0]) if first["loc"] else None) from None

    app.include_router(utility)

    @app.get("/load")
    async def load():
        """vLLM's server load: the /v1 requests in flight."""
        return {"server_load": api.load}

    @app.get("/ping")
    async def ping():
        """SageMaker's health check: an empty 200 while the engine serves (as vLLM's), else 503."""
        api.check_healthy()
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/health")
    async def health():
        try:
            stats = engine.stats()
        except Exception as e:
            stats = {"healthy": False, "error": f"{type(e).__name__}: {e}"}
        replicas = [{"replica": i, "healthy": r["healthy"], "error": r.get("error"),
                     "outstanding_requests": r.get("outstanding", 0)} for i, r in enumerate(stats.get("replicas", []))]
        each = {"replicas": replicas} if replicas else {}
        if not stats.get("healthy", True):
            return JSONResponse({"status": "error", "error": stats.get("error") or "unhealthy", **each}, status_code=503)
        if stats.get("error"):  # some replicas are down; the others serve
            return {"status": "degraded", "error": stats["error"], **each}
        return {"status": "ok", **each}

    @app.get("/metrics")
    async def metrics():
        return Response(api.metrics.render(), media_type=CONTENT_TYPE)

    return app

