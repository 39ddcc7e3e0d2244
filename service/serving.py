"""The model being served and its lifecycle: load, warm up, ready, hot reload, drain.

Owns which store version answers requests (`ServedModel`: the loaded model, its engine thread, its name and
version, and what the routes need of its tokenizer) and how many requests each one has in flight. Routes
take a `Lease` on the current model (`ModelServer.lease()`) and hold it until their response is complete, so
a hot reload lets requests in flight finish on the old weights while new ones go to the new version, and a
drain knows when it is done. When nothing is serving, `NotServing` says why; the API answers it with 503.
Nothing here parses or builds HTTP.
"""

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

from tokenizers import Tokenizer

from model_store import ModelStore, StoreError
from model_store.adapters import read_adapter
from service.config import ServiceConfig
from service.engine import (
    AsyncEngine,
    Engine,
    EngineHooks,
    EngineOutput,
    EngineRequest,
    SamplingParams,
    StepStats,
    TokenStrings,
)
from service.engine.async_engine import settle_future
from service.metrics import Metrics
from service.model import LoadedModel, load_model
from service.model.lora import Adapter

logger = logging.getLogger("service")
T = TypeVar("T")


class State(str, Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"  # the engine thread died: not ready, and `python -m service` exits so it is restarted


class AdaptersBusy(Exception):
    """An adapter cannot be loaded or unloaded now: the ones it would replace, or it, are in use (HTTP 409)."""


class NotServing(Exception):
    """No model answers requests now (HTTP 503 with Retry-After). `reason` is the rejection metric's label:
    `not_ready` (loading, or the engine failed) or `draining` (shutting down)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass(frozen=True)
class ServedAdapter:
    """A LoRA adapter version served on the model (`ADAPTERS`): a request that names it as its `model` runs on
    the base with it."""

    name: str
    version: int
    base: str
    rank: int
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(eq=False)
class ServedModel:
    """One store version loaded and served by its own engine thread, with the adapters its engine holds."""

    loaded: LoadedModel
    engine: AsyncEngine
    max_model_len: int
    token_strings: TokenStrings
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    adapters: dict[str, ServedAdapter] = field(default_factory=dict)  # by model_id, least recently used first

    def use_adapter(self, model_id: str) -> ServedAdapter:
        """Adapter `model_id`, now the most recently used (eviction takes the least recently used)."""
        adapter = self.adapters.pop(model_id)
        self.adapters[model_id] = adapter
        return adapter

    @property
    def name(self) -> str:
        return self.loaded.manifest.name

    @property
    def version(self) -> int:
        return self.loaded.manifest.version

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def labels(self) -> tuple[str, str]:
        return self.name, str(self.version)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.loaded.tokenizer

    @property
    def eos_token_id(self) -> int | None:
        return self.loaded.manifest.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.loaded.manifest.tokenizer.bos_token_id

    @property
    def chat_template(self) -> str | None:
        return self.loaded.manifest.tokenizer.chat_template

    @property
    def vocab_size(self) -> int:
        return self.loaded.model.cfg.vocab_size

    @property
    def dtype(self) -> str:
        return str(self.loaded.dtype).removeprefix("torch.")

    @property
    def device(self) -> str:
        return str(self.loaded.device)


class Lease:
    """A served model held for one request until its response is complete: a hot reload retires the model,
    and a drain finishes, only once nothing holds it. Release it once (a context manager, or `release()`);
    a streaming response takes it over with `hand_over()`."""

    def __init__(self, model: ServedModel) -> None:
        self.model, self._held = model, True
        model.in_flight += 1
        model.idle.clear()

    def hand_over(self) -> "Lease":
        """A lease that holds the model from now on, in place of this one (which releases nothing)."""
        other = object.__new__(Lease)
        other.model, other._held, self._held = self.model, self._held, False
        return other

    def release(self) -> None:
        if self._held:
            self._held = False
            self.model.in_flight -= 1
            if self.model.in_flight == 0:
                self.model.idle.set()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ModelServer:
    def __init__(self, config: ServiceConfig, store: ModelStore, metrics: Metrics) -> None:
        self.config, self.store, self.metrics = config, store, metrics
        self.state = State.LOADING
        self.served: ServedModel | None = None
        self._retired: set[ServedModel] = set()
        self._reload_lock = asyncio.Lock()
        self._request_counter = 0
        self.failure: BaseException | None = None  # why the served engine died, if it did
        self.on_failure: Callable[[], None] | None = None  # called (on the event loop) when it does

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the configured model, run a warm-up request through it, then turn ready."""
        self.served = await self._open(self.config.model)
        self.state = State.READY
        logger.info(
            "ready", extra={"fields": {"model": self.served.model_id, "kernels": self.served.engine.engine.kernels}}
        )

    async def reload(self, ref: str) -> ServedModel:
        """Serve `ref` from now on; requests in flight finish on the old model, whose engine then stops."""
        async with self._reload_lock:
            new = await self._open(ref, reloading=True)
            old, self.served = self.served, new
            if old is not None:
                self._retired.add(old)
                asyncio.get_running_loop().create_task(self._retire(old))
            logger.info("reloaded", extra={"fields": {"model": new.model_id, "kernels": new.engine.engine.kernels}})
            return new

    async def drain(self, timeout: float) -> None:
        """Stop admitting (ready turns 503), let requests in flight finish for up to `timeout` seconds,
        then abort what is left: its clients get a final error frame. Then stop every engine thread."""
        self.state = State.DRAINING
        models = [m for m in (self.served, *self._retired) if m is not None]
        pending = [asyncio.ensure_future(m.idle.wait()) for m in models if m.in_flight]
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
        for model in models:
            await asyncio.to_thread(model.engine.stop)  # in-flight streams get EngineDead
        self.state = State.STOPPED

    async def _open(self, ref: str, reloading: bool = False) -> ServedModel:
        """Load `ref` and the configured adapters of it, warm its engine up with one request (its steps reach
        the step metrics, its sequence is not counted as a request), and start its thread. An adapter that
        cannot be served stops the start; on a reload, adapters of another base are left out."""
        loop = asyncio.get_running_loop()

        def prepare() -> tuple[LoadedModel, Engine, EngineHooks, list[ServedAdapter]]:
            config = self.config
            loaded = load_model(
                self.store, ref, device=config.device, dtype=config.dtype, quantization=config.quantization
            )
            engine = Engine(loaded, config.engine_config(loaded.model.cfg.n_positions))  # kernel choice: seconds
            adapters = []
            for adapter_ref in config.adapters:
                found = self._adapter(adapter_ref, loaded, reloading)
                if found is not None:
                    engine.add_adapter(found[0])
                    adapters.append(found[1])
            hooks = self._hooks((loaded.manifest.name, str(loaded.manifest.version)), loop)
            warmup = EngineRequest("warmup", [loaded.manifest.tokenizer.eos_token_id or 0], WARMUP)
            _run_alone(engine, warmup, hooks.on_step)
            return loaded, engine, hooks, adapters

        loaded, engine, hooks, adapters = await _on_a_thread_of_its_own(prepare)
        async_engine = AsyncEngine(engine, hooks)
        model = ServedModel(loaded, async_engine, engine.config.scheduler.max_model_len, TokenStrings(loaded.tokenizer))
        model.adapters.update((a.model_id, a) for a in adapters)
        async_engine.start()
        model.idle.set()
        self.metrics.serving(model.labels, model.dtype, model.device)
        return model

    def _adapter(self, ref: str, loaded: LoadedModel, reloading: bool) -> tuple[Adapter, ServedAdapter] | None:
        """Verify adapter version `ref` and read it for `loaded`'s engine; StoreError naming `ref` when it
        cannot be served on `loaded` (None instead, on a reload to another base)."""
        stored = self.store.verify(ref)
        info, base = stored.manifest.adapter, loaded.manifest.ref
        if info is None:
            raise StoreError(f"ADAPTERS: {stored.ref} is a model, not a LoRA adapter")
        if info.base != base:
            if reloading:
                logger.warning("adapter left out", extra={"fields": {"adapter": stored.ref, "base": info.base}})
                return None
            raise StoreError(f"ADAPTERS: {stored.ref} is an adapter of {info.base}; MODEL is {base}")
        if info.rank > self.config.max_lora_rank:
            raise StoreError(
                f"ADAPTERS: {stored.ref} has rank {info.rank}, over MAX_LORA_RANK={self.config.max_lora_rank}"
            )
        adapter = Adapter.from_tensors(stored.ref, info, read_adapter(stored), loaded.dtype, loaded.device)
        return adapter, ServedAdapter(stored.manifest.name, stored.manifest.version, info.base, info.rank)

    async def load_adapter(self, ref: str) -> tuple[ServedAdapter, list[str]]:
        """Serve adapter version `ref` on the current model from now on; returns it and the adapters evicted
        to make room (at MAX_ADAPTERS, the least recently used ones no request is using). StoreError when it
        cannot be served, AdaptersBusy when every adapter held is in use."""
        async with self._reload_lock:
            model = self.current()
            stored = self.store.resolve(ref)
            if stored.ref in model.adapters:
                return model.use_adapter(stored.ref), []
            adapter, served = await _on_a_thread_of_its_own(lambda: self._adapter(ref, model.loaded, False))
            evicted = []
            while len(model.adapters) >= self.config.max_adapters:
                evicted.append(await self._evict_one(model))
            await model.engine.call(lambda engine: engine.add_adapter(adapter))
            model.adapters[served.model_id] = served
            logger.info("adapter loaded", extra={"fields": {"adapter": served.model_id, "evicted": evicted}})
            return served, evicted

    async def unload_adapter(self, model_id: str) -> None:
        """Stop serving adapter `model_id` (name@version) of the current model; KeyError if it is not
        served, AdaptersBusy while a request runs with it."""
        async with self._reload_lock:
            model = self.current()
            if model_id not in model.adapters:
                raise KeyError(model_id)
            try:
                await model.engine.call(lambda engine: engine.remove_adapter(model_id))
            except ValueError:
                raise AdaptersBusy(f"adapter {model_id} is in use; retry once its requests are done") from None
            del model.adapters[model_id]
            logger.info("adapter unloaded", extra={"fields": {"adapter": model_id}})

    async def _evict_one(self, model: ServedModel) -> str:
        for model_id in list(model.adapters):  # least recently used first
            try:
                await model.engine.call(lambda engine, ref=model_id: engine.remove_adapter(ref))
            except ValueError:  # in use
                continue
            del model.adapters[model_id]
            return model_id
        raise AdaptersBusy(f"all {len(model.adapters)} adapters held (MAX_ADAPTERS) are in use; retry later")

    def _hooks(self, labels: tuple[str, str], loop: asyncio.AbstractEventLoop) -> EngineHooks:
        """What the metrics observe of one model's engine, and how its death reaches the event loop."""
        metrics = self.metrics

        def died(exc: BaseException) -> None:  # on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop is already closed: nothing left to tell
                loop.call_soon_threadsafe(self._engine_died, exc)

        def finished(out: EngineOutput) -> None:
            metrics.sequence_finished(labels, out.stats, out.finish_reason, len(out.prompt_logprobs or ()))

        return EngineHooks(
            on_step=lambda stats: metrics.step(labels, stats),
            on_death=died,
            on_finish=finished,
            on_abort=lambda count: metrics.aborts.labels(*labels).inc(count),
        )

    def _engine_died(self, exc: BaseException) -> None:
        """The served engine's thread stopped after a failed step: its requests already got an error. Turn
        not ready (new requests: 503) and tell the process, which exits non-zero so a supervisor restarts
        it, rather than staying up, ready, and failing every request. A retired engine only fails its own
        requests."""
        if self.served is None or self.served.engine.error is not exc or self.state is not State.READY:
            return
        self.state, self.failure = State.FAILED, exc
        logger.error(
            "engine failed: not ready from now on", extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}}
        )
        if self.on_failure is not None:
            self.on_failure()

    async def _retire(self, model: ServedModel) -> None:
        await model.idle.wait()
        await asyncio.to_thread(model.engine.stop)
        self._retired.discard(model)

    # -- requests --------------------------------------------------------------------------------------------
    def request_id(self, prefix: str) -> str:
        self._request_counter += 1
        return f"{prefix}-{self._request_counter}"

    def current(self) -> ServedModel:
        """The model that answers requests now; NotServing (counted as a rejection) when none does."""
        if self.state is State.READY and self.served is not None:
            return self.served
        if self.state in (State.DRAINING, State.STOPPED):
            reason, message = "draining", "the server is shutting down"
        elif self.state is State.FAILED:
            reason, message = "not_ready", "the engine failed; retry on another replica"
        else:
            reason, message = "not_ready", "the model is still loading"
        self.metrics.rejections.labels(reason).inc()
        raise NotServing(reason, message)

    def lease(self) -> Lease:
        """The current model, held until the request is complete (see `Lease`); NotServing when none."""
        return Lease(self.current())


async def _on_a_thread_of_its_own(fn: Callable[[], T]) -> T:
    """`fn()` on a new thread that ends with it. torch's OpenMP keeps a pool of worker threads for every
    thread that has run a parallel region, for as long as that thread lives, and once the process has more
    such threads than cores, every pool's workers stop spinning between regions and sleep, so each of the
    engine thread's parallel regions waits for a wake-up (2-core EPYC: batch-1 decode ~30 % slower per
    token). Loading and warming up a model on a pooled executor thread would leave one such pool behind for
    the life of the process; a thread of its own takes its pool with it when it ends."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def run() -> None:
        result, error = None, None
        try:
            result = fn()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle_future, done, result, error)

    threading.Thread(target=run, name="model-open", daemon=True).start()
    return await done


WARMUP = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def _run_alone(engine: Engine, request: EngineRequest, on_step: Callable[[StepStats], None]) -> None:
    """Run one request to the end on an engine no thread drives yet."""
    engine.add(request)
    while engine.has_work:
        engine.step()
        on_step(engine.last_step)
