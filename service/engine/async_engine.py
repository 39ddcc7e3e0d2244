"""The engine thread and its asyncio facade: what the HTTP layer talks to.

One thread owns the `Engine` and everything in it. The asyncio side never touches engine state: it sends
commands (add, abort, stop) through a thread-safe queue, and each request gets its outputs back through its
own asyncio queue, fed with `call_soon_threadsafe`. Commands are applied between steps, so an abort frees
the request's KV before the next step runs.
"""

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .engine import Engine, EngineOutput
from .types import SamplingParams, StepStats

logger = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine thread failed or was stopped; in-flight and new requests get this."""


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    out: asyncio.Queue
    score_from: int | None = None
    shares_prefix_with: str | None = None


@dataclass(frozen=True)
class _Abort:
    request_id: str


_STOP = object()
_ADMITTED = object()  # sent to a request's queue once the engine has queued it


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        on_step: Callable[[StepStats], None] | None = None,
        on_death: Callable[[BaseException], None] | None = None,
    ) -> None:
        """`on_step` is called on the engine thread after every step (metrics); it must not block.
        `on_death` is called on the engine thread, once, if a step fails and the thread stops."""
        self.engine, self._on_step, self._on_death = engine, on_step, on_death
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._submitted = 0  # sequences sent to the engine thread (event loop side)
        self._applied = 0  # sequences whose add the engine thread has processed (engine thread side)
        self._outs: dict[str, asyncio.Queue] = {}  # engine thread only
        self._unfinished: dict[str, int] = {}  # engine thread only: samples still running per request
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        """Start the engine thread; call from inside the event loop that will consume outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        score_from: int | None = None,
        shares_prefix_with: str | None = None,
        on_admit: Callable[[], None] | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """Stream a request's outputs (all `n` samples interleaved, told apart by `index`) until every
        sample has finished. Leaving the iteration early (client gone) aborts the request. `score_from` and
        `shares_prefix_with` are `Engine.add`'s. `on_admit` is called once the engine has queued the
        request (before any output), so a caller can tell admission from the first token.

        Raises QueueFull / TooLarge from the scheduler at admission, or EngineDead. A waiting queue that
        is already full is refused here at once, not after the engine's current step (which can take
        seconds): overload is answered in milliseconds.
        """
        if not self.alive:
            raise EngineDead("the engine is not running") from self.error
        self._refuse_if_full(params.num_samples)
        out: asyncio.Queue = asyncio.Queue()
        self._submitted += params.num_samples
        self._commands.put(_Add(request_id, list(prompt_token_ids), params, out, score_from, shares_prefix_with))
        remaining = params.num_samples
        try:
            while remaining:
                item = await out.get()
                if item is _ADMITTED:
                    if on_admit is not None:
                        on_admit()
                    continue
                if isinstance(item, BaseException):
                    remaining = 0
                    raise item
                remaining -= item.finished
                yield item
        finally:
            if remaining:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def _refuse_if_full(self, num_seqs: int) -> None:
        """The scheduler's waiting-queue limit, checked from the event loop: the queue as the engine thread
        last left it plus the sequences sent since. Reading the queues' lengths from this thread is safe;
        the figure can be one step stale, so the engine thread still checks exactly at admission (and the
        prompt-token limit, which only it can count)."""
        scheduler = self.engine.scheduler
        scheduler.check_room(len(scheduler.waiting) + max(self._submitted - self._applied, 0), num_seqs)

    # -- engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if not self._apply(self._commands.get()):  # idle: block until there is something to do
                    return
                while self.engine.has_work:
                    while not self._commands.empty():
                        if not self._apply(self._commands.get_nowait()):
                            return
                    for output in self.engine.step():
                        self._output(output)
                    self._report(self.engine.last_step)
        except BaseException as exc:  # a failed step must not leave requests hanging
            self.error = exc
            dead = EngineDead(f"engine step failed: {type(exc).__name__}: {exc}")
            for request_id in list(self._outs):
                self._send(request_id, dead, last=True)
            logger.exception("engine thread stopped after a failed step")
            if self._on_death is not None:
                self._on_death(exc)
        finally:
            for request_id in list(self._outs):
                self._send(request_id, EngineDead("the engine stopped"), last=True)

    def _apply(self, command) -> bool:
        if command is _STOP:
            return False
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            self._outs.pop(command.request_id, None)
            self._unfinished.pop(command.request_id, None)
            self._report(self.engine.state())  # memory freed now, even if no step follows
        else:
            self._applied += command.params.num_samples  # before the add: the estimate may lag, never double count
            try:
                self.engine.add(
                    command.request_id,
                    command.prompt_token_ids,
                    command.params,
                    command.score_from,
                    command.shares_prefix_with,
                )
            except Exception as exc:  # QueueFull, TooLarge: the request's own error, not the engine's
                self._loop.call_soon_threadsafe(command.out.put_nowait, exc)
            else:
                self._outs[command.request_id] = command.out
                self._unfinished[command.request_id] = command.params.num_samples
                self._loop.call_soon_threadsafe(command.out.put_nowait, _ADMITTED)
        return True

    def _report(self, stats: StepStats | None) -> None:
        if self._on_step is not None and stats is not None:
            self._on_step(stats)

    def _output(self, output: EngineOutput) -> None:
        rid = output.request_id
        if output.finished:
            self._unfinished[rid] -= 1
        last = self._unfinished.get(rid) == 0
        if last:
            del self._unfinished[rid]
        self._send(rid, output, last=last)

    def _send(self, request_id: str, item, *, last: bool) -> None:
        out = self._outs.pop(request_id, None) if last else self._outs.get(request_id)
        if out is not None:
            self._loop.call_soon_threadsafe(out.put_nowait, item)
