"""Everything but generation and scoring: liveness and readiness, metrics, the model list, hot reload, and
the tokenizer endpoints in the shapes lm-evaluation-harness's remote tokenizer uses.
"""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from model_store.errors import NotFoundError, StoreError
from service.metrics import CONTENT_TYPE
from service.serving import AdaptersBusy, ServedAdapter, ServedModel

from .errors import APIError, invalid
from .protocol import encode
from .schemas import AdapterRequest, DetokenizeRequest, ReloadRequest, TokenizeRequest

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
    if server.state.value == "ready" and server.served is not None:
        body["model"] = server.served.model_id
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE)


def model_card(model: ServedModel) -> dict:
    return {
        "id": model.model_id,
        "object": "model",
        "created": model.created,
        "owned_by": "gpt2-serve",
        "root": model.name,
        "version": model.version,
        "max_model_len": model.max_model_len,
        "dtype": model.dtype,
        "device": model.device,
    }


def adapter_card(adapter: ServedAdapter, model: ServedModel) -> dict:
    """A LoRA adapter served on `model`, as vLLM lists them: its own id and `root`, and its base as `parent`."""
    return {
        **model_card(model),
        "id": adapter.model_id,
        "created": adapter.created,
        "root": adapter.name,
        "version": adapter.version,
        "parent": model.model_id,
        "lora_rank": adapter.rank,
    }


@router.get("/v1/models")
async def models(request: Request) -> dict:
    model = request.app.state.server.current()
    return {"object": "list", "data": [model_card(model), *(adapter_card(a, model) for a in model.adapters.values())]}


@router.post("/admin/reload")
async def reload(req: ReloadRequest, request: Request) -> dict:
    """Switch to another store version with zero failed requests; in-flight ones finish on the old one."""
    server = request.app.state.server
    server.current()  # refuses while loading or draining
    try:
        model = await server.reload(req.model)
    except NotFoundError as exc:
        raise APIError(404, str(exc), "model", "model_not_found") from None
    except (StoreError, ValueError) as exc:
        raise invalid(f"cannot load {req.model!r}: {exc}", "model") from None
    return {"object": "reload", "model": model_card(model)}


@router.post("/admin/adapters")
async def load_adapter(req: AdapterRequest, request: Request) -> dict:
    """Serve a LoRA adapter version of the current model from now on; at MAX_ADAPTERS the least recently used
    adapters no request is using are evicted (listed in the answer)."""
    server = request.app.state.server
    try:
        adapter, evicted = await server.load_adapter(req.adapter)
    except NotFoundError as exc:
        raise APIError(404, str(exc), "adapter", "model_not_found") from None
    except AdaptersBusy as exc:
        raise APIError(409, str(exc), "adapter", "adapters_busy") from None
    except (StoreError, ValueError) as exc:
        raise invalid(f"cannot serve {req.adapter!r}: {exc}", "adapter") from None
    return {"object": "adapter", "adapter": adapter_card(adapter, server.current()), "evicted": evicted}


@router.delete("/admin/adapters/{model_id}")
async def unload_adapter(model_id: str, request: Request) -> dict:
    """Stop serving adapter `model_id` (name@version); 409 while a request runs with it."""
    try:
        await request.app.state.server.unload_adapter(model_id)
    except KeyError:
        raise APIError(404, f"adapter {model_id!r} is not served here", "model_id", "model_not_found") from None
    except AdaptersBusy as exc:
        raise APIError(409, str(exc), "model_id", "adapters_busy") from None
    return {"object": "adapter.deleted", "id": model_id, "deleted": True}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict:
    model = request.app.state.server.current()
    token = lambda i: None if i is None else model.tokenizer.id_to_token(i)  # noqa: E731
    return {
        "eos_token": token(model.eos_token_id),
        "bos_token": token(model.bos_token_id),
        "pad_token": None,
        "eos_token_id": model.eos_token_id,
        "bos_token_id": model.bos_token_id,
        "chat_template": model.chat_template,
        "model_max_length": model.max_model_len,
        "vocab_size": model.vocab_size,
        "add_bos_token": False,
    }


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> dict:
    """The prompt's token ids; with `add_special_tokens` (the default, as vLLM's) also what the tokenizer's
    post-processor adds: nothing for GPT-2's own tokenizers. Completions never apply the post-processor."""
    model = request.app.state.server.current()
    tokens = encode(model.tokenizer, req.prompt, req.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": model.max_model_len}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> dict:
    model = request.app.state.server.current()
    bad = [t for t in req.tokens if not 0 <= t < model.vocab_size]
    if bad:
        raise invalid(f"token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})", "tokens")
    return {"prompt": model.tokenizer.decode(req.tokens, skip_special_tokens=False)}
