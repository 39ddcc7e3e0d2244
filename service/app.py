"""The FastAPI application: wiring, the edge middleware, and the lifespan (load, warm up, drain).

`create_app(config)` builds everything from a `ServiceConfig`; nothing reads the environment here. The edge
middleware is plain ASGI (so streaming responses pass through untouched) and does, in order: request id
(honours `X-Request-Id`, returns it), one JSON log line per request, request metrics, API-key check
(Bearer, constant-time, every route but /health, /ready and /metrics), the header limit (more than
`MAX_HEADER_BYTES`: 431) and the body limits (size: 413; a body that takes longer than `BODY_TIMEOUT_S` to
arrive: 408, and the connection is closed).
"""

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException

from model_store import ModelStore
from model_store.registry import store_root

from .api import chat, completions, errors, score, system
from .api.errors import error_body
from .config import ServiceConfig
from .metrics import Metrics
from .serving import ModelServer

logger = logging.getLogger("service")
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
BODY_TIMEOUT_S = 30.0
# h11 refuses headers over 16 KiB only while they arrive in pieces: what comes in one read (up to 256 KiB)
# passes. The same limit, however they arrive.
MAX_HEADER_BYTES = 16 * 1024
TIMED_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/score"})


def create_app(config: ServiceConfig, *, start_engine: bool = True) -> FastAPI:
    store = ModelStore(store_root(config.model_store_root or None))
    server = ModelServer(config, store, Metrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not config.api_keys:
            logger.warning("no API_KEYS configured: the service is open to every client")
        if start_engine:
            await server.start()
        yield
        if server.state.value != "stopped":
            await server.drain(config.drain_timeout)

    app = FastAPI(
        title="gpt2-serve",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions, scoring and tokenization for GPT-2 models.",
    )
    app.state.server = server
    app.state.config = config
    errors.install(app)
    for module in (completions, chat, score, system):
        app.include_router(module.router)
    app.add_middleware(EdgeMiddleware, config=config, server=server)
    app.openapi = lambda: _openapi(app)
    return app


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"type": "string"},
            },
        }
    },
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI documents a 422 `{"detail": [...]}` for every body; this service never sends it: invalid
    requests get a 400, and every error (4xx, 5xx) the OpenAI shape. Document that, so generated clients
    and schema checks (reliability/fuzz.py) see what is sent."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        schemas["Error"] = ERROR_SCHEMA
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for item in schema["paths"].values():
            for operation in item.values():
                responses = operation["responses"]
                responses.pop("422", None)
                responses["4XX"] = {
                    "description": "Invalid request, unknown model or route, missing key, too large, overloaded",
                    **error,
                }
                responses["5XX"] = {"description": "Loading, draining, or a server error", **error}
        app.openapi_schema = schema
    return app.openapi_schema


class EdgeMiddleware:
    def __init__(self, app, config: ServiceConfig, server: ModelServer) -> None:
        self.app, self.config, self.server, self.metrics = app, config, server, server.metrics
        self.keys = [k.encode() for k in config.api_keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = _request_id(headers.get("x-request-id"))
        path = scope["path"]
        status = {"code": 0}
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            refusal = self._refuse(path, headers, sum(len(k) + len(v) for k, v in scope["headers"]))
            if refusal is not None:
                await _send_error(send_with_id, *refusal)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        finally:
            self._done(scope, path, status["code"] or 500, request_id, time.monotonic() - start)

    def _refuse(self, path: str, headers: dict[str, str], header_bytes: int) -> tuple[int, str] | None:
        if header_bytes > MAX_HEADER_BYTES:
            return 431, f"the headers are {header_bytes} bytes; the limit is {MAX_HEADER_BYTES}"
        if self.keys and path not in OPEN_PATHS and not self._authorized(headers.get("authorization", "")):
            return 401, "missing or invalid API key (send Authorization: Bearer <key>)"
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "invalid Content-Length header"
            if int(length) > self.config.max_body_bytes:
                return 413, f"the body is {length} bytes; the limit is {self.config.max_body_bytes}"
        return None

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        ok = False
        for key in self.keys:  # compare with every key, constant time each, so timing reveals nothing
            ok |= hmac.compare_digest(given, key)
        return ok and scheme.lower() == "bearer"

    def _limited(self, receive):
        """The request body, refused past the size limit (chunked bodies too: 413) or when it takes more
        than BODY_TIMEOUT_S to arrive (slow-body clients: 408). Raised as HTTP errors, which the routes'
        body parsing passes on to the error handlers."""
        limit, received, complete = self.config.max_body_bytes, 0, False
        deadline = time.monotonic() + BODY_TIMEOUT_S
        too_slow = f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s"

        async def limited_receive():
            nonlocal received, complete
            if complete:
                return await receive()  # body complete: waiting now means waiting for a disconnect
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:  # and close: the rest of the body would keep the connection busy
                raise HTTPException(408, too_slow, headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"the body exceeds the limit of {limit} bytes")
                complete = not message.get("more_body", False)
            return message

        return limited_receive

    def _done(self, scope, path: str, status: int, request_id: str, duration: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or ("unmatched" if status == 404 else path)
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if status == 429:
            self.metrics.rejections.labels("overload").inc()
        elif status == 401:
            self.metrics.rejections.labels("auth").inc()
        elif status == 413:
            self.metrics.rejections.labels("body_too_large").inc()
        elif status in (400, 408, 422, 431):
            self.metrics.rejections.labels("validation").inc()
        if endpoint in TIMED_ENDPOINTS and status == 200 and self.server.served is not None:
            self.metrics.e2e.labels(*self.server.served.labels).observe(duration)
        fields = {
            "request_id": request_id,
            "method": scope.get("method"),
            "path": path,
            "status": status,
            "duration_ms": round(duration * 1000, 1),
            **scope.get("state", {}).get("usage", {}),
        }
        logger.info("request", extra={"fields": fields})


def _request_id(given: str | None) -> str:
    if given and len(given) <= 128 and given.isprintable():
        return given
    return uuid.uuid4().hex


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps(error_body(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
