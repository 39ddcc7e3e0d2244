"""Everything but generation and scoring: liveness and readiness, metrics, the model list, hot reload, and
the tokenizer endpoints in the shapes lm-evaluation-harness's remote tokenizer uses.
"""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from model_store.errors import NotFoundError, StoreError
from service.metrics import CONTENT_TYPE

from .errors import APIError, invalid
from .protocol import encode
from .schemas import DetokenizeRequest, ReloadRequest, TokenizeRequest

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    """Process liveness: 200 whenever the process can answer."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Response:
    """200 once the model is loaded and warmed up; 503 while loading or draining."""
    server = request.app.state.server
    body = {"status": server.state.value}
    if server.state.value == "ready" and server.backend is not None:
        body["model"] = server.backend.model_id
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE)


def model_card(backend) -> dict:
    return {
        "id": backend.model_id,
        "object": "model",
        "created": backend.created,
        "owned_by": "gpt2-serve",
        "root": backend.name,
        "version": backend.version,
        "max_model_len": backend.max_model_len,
        "dtype": str(backend.loaded.dtype).removeprefix("torch."),
        "device": str(backend.loaded.device),
    }


@router.get("/v1/models")
async def models(request: Request) -> dict:
    async with request.app.state.server.session() as backend:
        return {"object": "list", "data": [model_card(backend)]}


@router.post("/admin/reload")
async def reload(req: ReloadRequest, request: Request) -> dict:
    """Switch to another store version with zero failed requests; in-flight ones finish on the old one."""
    server = request.app.state.server
    async with server.session():  # refuses while loading or draining
        pass
    try:
        backend = await server.reload(req.model)
    except NotFoundError as exc:
        raise APIError(404, str(exc), "model", "model_not_found") from None
    except (StoreError, ValueError) as exc:
        raise invalid(f"cannot load {req.model!r}: {exc}", "model") from None
    return {"object": "reload", "model": model_card(backend)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict:
    async with request.app.state.server.session() as backend:
        tokenizer, info = backend.loaded.tokenizer, backend.loaded.manifest.tokenizer
        token = lambda i: None if i is None else tokenizer.id_to_token(i)  # noqa: E731
        return {
            "eos_token": token(info.eos_token_id),
            "bos_token": token(info.bos_token_id),
            "pad_token": None,
            "eos_token_id": info.eos_token_id,
            "bos_token_id": info.bos_token_id,
            "chat_template": info.chat_template,
            "model_max_length": backend.max_model_len,
            "vocab_size": backend.vocab_size,
            "add_bos_token": False,
        }


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> dict:
    async with request.app.state.server.session() as backend:
        tokens = encode(backend.loaded.tokenizer, req.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": backend.max_model_len}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> dict:
    async with request.app.state.server.session() as backend:
        bad = [t for t in req.tokens if not 0 <= t < backend.vocab_size]
        if bad:
            raise invalid(f"token id {bad[0]} is outside the vocabulary [0, {backend.vocab_size})", "tokens")
        return {"prompt": backend.loaded.tokenizer.decode(req.tokens, skip_special_tokens=False)}
