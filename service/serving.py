"""The model being served and its lifecycle: load, warm up, ready, hot reload, drain.

Owns which store version answers requests (`Backend`: the loaded model, its engine thread, its name and
version) and how many requests each backend has in flight. Routes ask `ModelServer.session()` for the
current backend and hold it until their response is complete, so a hot reload lets requests in flight
finish on the old weights while new ones go to the new version, and a drain knows when it is done.
Nothing here parses HTTP bodies.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import Enum

from model_store import ModelStore
from service.config import ServiceConfig
from service.engine.async_engine import AsyncEngine
from service.engine.engine import Engine
from service.engine.types import SamplingParams
from service.metrics import Metrics
from service.model import LoadedModel, load_model

from .api.errors import APIError
from .api.protocol import TokenStrings

logger = logging.getLogger("service")


class State(str, Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"  # the engine thread died: not ready, and `python -m service` exits so it is restarted


@dataclass(eq=False)
class Backend:
    loaded: LoadedModel
    engine: AsyncEngine
    name: str
    version: int
    max_model_len: int
    token_strings: TokenStrings
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def labels(self) -> tuple[str, str]:
        return self.name, str(self.version)

    @property
    def eos_token_id(self) -> int | None:
        return self.loaded.manifest.tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.loaded.model.cfg.vocab_size


class ModelServer:
    def __init__(self, config: ServiceConfig, store: ModelStore, metrics: Metrics) -> None:
        self.config, self.store, self.metrics = config, store, metrics
        self.state = State.LOADING
        self.backend: Backend | None = None
        self._retired: set[Backend] = set()
        self._reload_lock = asyncio.Lock()
        self._request_counter = 0
        self.failure: BaseException | None = None  # why the served engine died, if it did
        self.on_failure: Callable[[], None] | None = None  # called (on the event loop) when it does

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the configured model, run a warm-up request through it, then turn ready."""
        self.backend = await self._open(self.config.model)
        self.state = State.READY
        logger.info("ready", extra={"fields": {"model": self.backend.model_id}})

    async def reload(self, ref: str) -> Backend:
        """Serve `ref` from now on; requests in flight finish on the old backend, which then stops."""
        async with self._reload_lock:
            new = await self._open(ref)
            old, self.backend = self.backend, new
            if old is not None:
                self._retired.add(old)
                asyncio.get_running_loop().create_task(self._retire(old))
            logger.info("reloaded", extra={"fields": {"model": new.model_id}})
            return new

    async def drain(self, timeout: float) -> None:
        """Stop admitting (ready turns 503), let requests in flight finish for up to `timeout` seconds,
        then abort what is left: its clients get a final error frame. Then stop every engine thread."""
        self.state = State.DRAINING
        backends = [b for b in (self.backend, *self._retired) if b is not None]
        pending = [asyncio.ensure_future(b.idle.wait()) for b in backends if b.in_flight]
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
        for backend in backends:
            await asyncio.to_thread(backend.engine.stop)  # in-flight streams get EngineDead
        self.state = State.STOPPED

    async def _open(self, ref: str) -> Backend:
        loaded = await asyncio.to_thread(
            load_model, self.store, ref, device=self.config.device, dtype=self.config.dtype
        )
        manifest = loaded.manifest
        engine_config = self.config.engine_config(loaded.model.cfg.n_positions)
        labels = (manifest.name, str(manifest.version))
        engine = Engine(loaded, engine_config)
        loop = asyncio.get_running_loop()

        def died(exc: BaseException) -> None:  # on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop is already closed: nothing left to tell
                loop.call_soon_threadsafe(self._engine_died, async_engine, exc)

        async_engine = AsyncEngine(engine, on_step=lambda stats: self.metrics.step(labels, stats), on_death=died)
        async_engine.start()
        backend = Backend(
            loaded,
            async_engine,
            manifest.name,
            manifest.version,
            engine_config.scheduler.max_model_len,
            TokenStrings(loaded.tokenizer),
        )
        backend.idle.set()
        warmup = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        async for _ in async_engine.generate("warmup", [backend.eos_token_id or 0], warmup):
            pass
        self.metrics.serving(labels, str(loaded.dtype).removeprefix("torch."), str(loaded.device))
        return backend

    def _engine_died(self, engine: AsyncEngine, exc: BaseException) -> None:
        """The served engine's thread stopped after a failed step: its requests already got an error. Turn
        not ready (new requests: 503) and tell the process, which exits non-zero so a supervisor restarts
        it, rather than staying up, ready, and failing every request. A retired engine only fails its own
        requests."""
        if self.backend is None or self.backend.engine is not engine or self.state is not State.READY:
            return
        self.state, self.failure = State.FAILED, exc
        logger.error(
            "engine failed: not ready from now on", extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}}
        )
        if self.on_failure is not None:
            self.on_failure()

    async def _retire(self, backend: Backend) -> None:
        await backend.idle.wait()
        await asyncio.to_thread(backend.engine.stop)
        self._retired.discard(backend)

    # -- requests --------------------------------------------------------------------------------------------
    def request_id(self, prefix: str) -> str:
        self._request_counter += 1
        return f"{prefix}-{self._request_counter}"

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Backend]:
        """The backend to serve one request on, held until the request is complete."""
        if self.state is not State.READY or self.backend is None:
            reason = "draining" if self.state in (State.DRAINING, State.STOPPED) else "not_ready"
            self.metrics.rejections.labels(reason).inc()
            message = (
                "the server is shutting down"
                if reason == "draining"
                else "the engine failed; retry on another replica"
                if self.state is State.FAILED
                else "the model is still loading"
            )
            raise APIError(503, message, code="service_unavailable", headers={"Retry-After": "1"})
        backend = self.backend
        backend.in_flight += 1
        backend.idle.clear()
        try:
            yield backend
        finally:
            backend.in_flight -= 1
            if backend.in_flight == 0:
                backend.idle.set()
