"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with string codes, for every
failure the API can produce, framework validation errors and the layers below included (the engine's
refusals, nothing being served). Nothing else builds error bodies.
"""

from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine import EngineDead, QueueFull, TooLarge, Unsupported
from service.serving import NotServing

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
_CODES = {
    400: "invalid_value",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    431: "request_too_large",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "service_unavailable",
}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its response was ready; its engine requests were aborted."""


RETRY = {"Retry-After": "1"}


def engine_error(exc: BaseException) -> APIError:
    """What a failure below the API means to the client."""
    if isinstance(exc, QueueFull):
        return APIError(
            429, f"the server is at capacity ({exc}); retry shortly", code="rate_limit_exceeded", headers=RETRY
        )
    if isinstance(exc, TooLarge):
        return APIError(400, f"the request can never fit in this server's KV cache: {exc}", code="request_too_large")
    if isinstance(exc, Unsupported):
        return APIError(400, str(exc), code="unsupported")
    if isinstance(exc, EngineDead):
        return APIError(503, "the engine stopped; retry on another replica", code="service_unavailable")
    if isinstance(exc, NotServing):
        return APIError(503, exc.message, code="service_unavailable", headers=RETRY)
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code or _CODES.get(status, "invalid_value"),
        }
    }


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    msg = str(first.get("msg", "invalid value"))
    return (f"{param}: {msg}" if param else msg), param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(NotServing)
    async def _not_serving(request: Request, exc: NotServing) -> JSONResponse:
        return engine_error(exc).response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the logs do

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)
