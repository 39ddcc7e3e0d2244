"""The engine thread and its asyncio facade: what the serving layer talks to.

One thread owns the `Engine` and everything in it; the event loop never touches engine state. The loop
sends commands (add, abort, stop) through a thread-safe queue. The engine thread applies them between steps
(so an abort frees the request's KV before the next step runs), runs a step, and hands what happened back to
the loop in one `call_soon_threadsafe` each: the admissions of the commands it applied, then the step's
outputs, which the loop files into each submission's `RequestHandle`. Before the next step it waits (at most
HANDOFF_WAIT_S) until the loop has let those readers run, so that streaming a step's tokens does not compete
with the next step for the cores.

A call has two phases. `handle = await engine.submit(*requests)` returns once the engine thread has queued
the requests, or raises QueueFull / TooLarge (nothing of the submission stays queued) or EngineDead, so a
caller can answer a refusal before it starts a response. Then `async for output in handle` until every
sample has finished. A waiting queue that is already full is refused on the loop at once, from the counts the
engine thread last published, rather than after the engine's current step (which can take seconds).
"""

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from . import cpu
from .engine import Engine
from .scheduler import check_room
from .types import EngineDead, EngineOutput, EngineRequest, StepStats

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineHooks:
    """Observers (metrics). `on_step` and `on_death` run on the engine thread and must not block;
    `on_finish` (a sequence's final output, with its stats) and `on_abort` (how many requests a caller
    abandoned unfinished) run on the event loop."""

    on_step: Callable[[StepStats], None] | None = None
    on_death: Callable[[BaseException], None] | None = None
    on_finish: Callable[[EngineOutput], None] | None = None
    on_abort: Callable[[int], None] | None = None


class RequestHandle:
    """The outputs of one submission (one or more engine requests, each with its `n` samples), in the order
    the engine produced them: `async for output in handle`, told apart by `request_id` and `index`. A
    caller that stops reading before the end calls `abort()` (a no-op once every sample has finished)."""

    def __init__(self, engine: "AsyncEngine", requests: Sequence[EngineRequest]) -> None:
        self.request_ids = tuple(r.request_id for r in requests)
        self._engine = engine
        self._unfinished = {r.request_id: r.params.num_samples for r in requests}  # samples still running
        self._items: deque[EngineOutput | BaseException] = deque()
        self._waiter: asyncio.Future | None = None
        self._admitted: asyncio.Future = asyncio.get_running_loop().create_future()
        self._aborted = False

    @property
    def finished(self) -> bool:
        """Nothing more will arrive: every sample finished, or the handle was aborted or failed."""
        return not self._unfinished

    @property
    def aborted(self) -> bool:
        """`abort()` stopped requests that had not finished."""
        return self._aborted

    def abort(self) -> None:
        """Stop the requests still running (their KV is free before the next step); the iteration ends."""
        request_ids = tuple(self._unfinished)
        self._unfinished.clear()
        self._items.clear()
        self._wake()
        if request_ids:
            self._aborted = True
            self._engine._abort(request_ids)

    def __aiter__(self) -> "RequestHandle":
        return self

    async def __anext__(self) -> EngineOutput:
        while not self._items:
            if not self._unfinished:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    # -- event loop, called by AsyncEngine --------------------------------------------------------------
    def _push(self, output: EngineOutput) -> bool:
        """File one output; True when it was the last sample of its request."""
        self._items.append(output)
        if not output.finished:
            return False
        self._unfinished[output.request_id] -= 1
        if self._unfinished[output.request_id]:
            return False
        del self._unfinished[output.request_id]
        return True

    def _fail(self, exc: BaseException) -> None:
        if not self._admitted.done():
            self._admitted.set_exception(exc)
        elif self._unfinished:
            self._items.append(exc)
        self._unfinished.clear()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


@dataclass(frozen=True)
class _Add:
    requests: tuple[EngineRequest, ...]
    handle: RequestHandle


@dataclass(frozen=True)
class _Abort:
    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class _Call:
    """Run `fn(engine)` on the engine thread between steps; its result or error settles `done` on the loop."""

    fn: Callable[[Engine], object]
    done: asyncio.Future


@dataclass(frozen=True)
class _Occupancy:
    """What the engine thread last published for the loop's early refusal, read and written whole."""

    num_waiting: int = 0
    num_running: int = 0
    num_applied: int = 0  # sequences whose add the engine thread has applied


_STOP = object()

# How long the engine thread waits, after a step, for the loop to pass that step's outputs on to their readers
# before it starts the next step. The loop's work then runs while the engine waits instead of taking a core
# from the step's threads mid-step, where a descheduled thread stalls its whole parallel region (2-core EPYC:
# 1 ms of another process's work per 16-sequence step made the 21 ms step 5-7 ms slower; with this wait,
# time per output token through HTTP fell about 8 % at 1 client and 6 % at 16). Bounded, so a busy loop
# never holds the engine up for longer.
HANDOFF_WAIT_S = 0.02

# How often, at most, the engine thread gives freed heap pages back to the kernel (cpu.release_freed_memory),
# between steps or before it waits for work. Each call holds the engine thread for a few tens of ms (2-core
# Zen 5 EPYC, mixed soak on the bundled model: p50 27 ms, max 43 ms; about 0.3 % of the time at this rate);
# the same soak's RSS grew 9 % in 300 s with it and 24-31 % without.
TRIM_EVERY_S = 10.0


class AsyncEngine:
    def __init__(self, engine: Engine, hooks: EngineHooks = EngineHooks()) -> None:
        self.engine, self._hooks = engine, hooks
        self._scheduler_config = engine.config.scheduler
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}  # event loop only: requests submitted and not done
        self._submitted = 0  # event loop only: sequences sent to the engine thread
        self._occupancy = _Occupancy()  # written by the engine thread, read by the loop
        self._applied = 0  # engine thread only
        self._closing = threading.Lock()  # no command is queued once the engine thread has stopped for good
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # The loop puts each delivery's number here once it has passed that step's outputs on. A C-level queue
        # rather than a threading.Event (a Condition in Python), which took ~10 us of the loop's and the engine
        # thread's time per step; a number that comes after its wait timed out is skipped by the next wait.
        self._handed: queue.SimpleQueue = queue.SimpleQueue()
        self._unrun: list = []  # engine thread only: commands queued behind the stop
        self._deliveries = 0  # engine thread only

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

    async def submit(self, *requests: EngineRequest) -> RequestHandle:
        """Queue `requests` together and return their handle once the engine thread has queued them all.
        Raises QueueFull / TooLarge (then none of them stays queued) or EngineDead. Cancelled while
        waiting, the requests are aborted."""
        num_seqs = sum(r.params.num_samples for r in requests)
        occupancy = self._occupancy
        in_transit = max(self._submitted - occupancy.num_applied, 0)
        handle = RequestHandle(self, requests)
        with self._closing:
            if self._closed or not self.alive:
                raise EngineDead("the engine is not running") from self.error
            check_room(self._scheduler_config, occupancy.num_waiting + in_transit, occupancy.num_running, num_seqs)
            self._handles.update(dict.fromkeys(handle.request_ids, handle))
            self._submitted += num_seqs
            self._commands.put(_Add(tuple(requests), handle))
        try:
            await handle._admitted
        except asyncio.CancelledError:
            handle.abort()
            raise
        return handle

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """`fn(engine)` on the engine thread, between steps (say, `Engine.add_adapter`): its result, or its
        exception raised here. EngineDead if the engine thread has stopped."""
        done = asyncio.get_running_loop().create_future()
        with self._closing:
            if self._closed or not self.alive:
                raise EngineDead("the engine is not running") from self.error
            self._commands.put(_Call(fn, done))
        return await done

    # -- event loop ---------------------------------------------------------------------------------------
    def _abort(self, request_ids: tuple[str, ...]) -> None:
        for request_id in request_ids:
            self._handles.pop(request_id, None)
        self._commands.put(_Abort(request_ids))
        self._observe(self._hooks.on_abort, len(request_ids))

    def _admit(self, admissions: list[tuple[RequestHandle, BaseException | None]]) -> None:
        for handle, error in admissions:
            if handle._admitted.done():  # the caller gave up waiting
                continue
            if error is None:
                handle._admitted.set_result(None)
                continue
            for request_id in handle.request_ids:
                self._handles.pop(request_id, None)
            handle._unfinished.clear()
            handle._admitted.set_exception(error)

    def _deliver(self, outputs: list[EngineOutput], delivery: int) -> None:
        """One step's outputs, into their handles; each handle's reader is woken once, then the observers
        see the finished sequences."""
        woken: dict[int, RequestHandle] = {}
        finished = []
        for output in outputs:
            handle = self._handles.get(output.request_id)
            if handle is None:  # aborted since
                continue
            if handle._push(output):
                del self._handles[output.request_id]
            if output.stats is not None:
                finished.append(output)
            woken[id(handle)] = handle
        for handle in woken.values():
            handle._wake()
        for output in finished:
            self._observe(self._hooks.on_finish, output)
        self._loop.call_soon(self._handed.put, delivery)  # after the woken readers' turns: their bytes are written

    @staticmethod
    def _observe(hook: Callable | None, *args) -> None:
        """An observer's failure is logged; it never stops a delivery or leaves a request waiting."""
        if hook is not None:
            try:
                hook(*args)
            except Exception:
                logger.exception("an engine observer failed")

    def _fail_all(self, exc: BaseException) -> None:
        handles = {id(h): h for h in self._handles.values()}
        self._handles.clear()
        for handle in handles.values():
            handle._fail(exc)

    # -- engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        trimmed = time.monotonic()
        try:
            while True:
                if time.monotonic() - trimmed >= TRIM_EVERY_S:  # between steps, or before waiting idle
                    trimmed = self._trim()
                if not self._apply_commands(block=not self.engine.has_work):
                    break
                if self.engine.has_work:
                    outputs = self.engine.step()
                    self._publish()
                    if outputs:
                        self._deliveries += 1
                        self._to_loop(self._deliver, outputs, self._deliveries)
                        self._wait_handed(self._deliveries)
                    self._report(self.engine.last_step)
        except BaseException as exc:  # a failed step must not leave requests hanging
            self.error = exc
            logger.exception("engine thread stopped after a failed step")
            self._close(EngineDead(f"engine step failed: {type(exc).__name__}: {exc}"))
            if self._hooks.on_death is not None:
                self._hooks.on_death(exc)
        else:
            self._close(EngineDead("the engine stopped"))

    def _wait_handed(self, delivery: int) -> None:
        """Until the loop has passed delivery `delivery` on, for at most HANDOFF_WAIT_S."""
        deadline = time.monotonic() + HANDOFF_WAIT_S
        with contextlib.suppress(queue.Empty):
            while self._handed.get(timeout=max(deadline - time.monotonic(), 0)) != delivery:
                pass

    @staticmethod
    def _trim() -> float:
        start = time.monotonic()
        cpu.release_freed_memory()
        logger.debug("freed heap pages returned in %.1f ms", 1e3 * (time.monotonic() - start))
        return time.monotonic()

    def _close(self, dead: EngineDead) -> None:
        """No command is queued from now on; every request submitted and not done, and every call not yet
        run, gets `dead`."""
        with self._closing:
            self._closed = True
        while not self._commands.empty():
            self._unrun.append(self._commands.get_nowait())
        for command in self._unrun:
            if isinstance(command, _Call):
                self._to_loop(settle_future, command.done, None, dead)
        self._to_loop(self._fail_all, dead)

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command (when idle, wait for one first); False once told to stop."""
        commands = [self._commands.get()] if block else []
        while not self._commands.empty():
            commands.append(self._commands.get_nowait())
        admissions, aborted, running = [], False, True
        for i, command in enumerate(commands):
            if command is _STOP:
                running = False
                self._unrun.extend(commands[i + 1 :])
                break
            if isinstance(command, _Abort):
                for request_id in command.request_ids:
                    self.engine.abort(request_id)
                aborted = True
            elif isinstance(command, _Call):
                self._settle(command)
            else:
                admissions.append((command.handle, self._add(command.requests)))
        self._publish()
        if admissions:
            self._to_loop(self._admit, admissions)
        if aborted:
            self._report(self.engine.make_stats())  # memory freed now, even if no step follows
        return running

    def _settle(self, call: _Call) -> None:
        try:
            result, error = call.fn(self.engine), None
        except Exception as exc:  # the call's own error, for its caller
            result, error = None, exc
        self._to_loop(settle_future, call.done, result, error)

    def _add(self, requests: tuple[EngineRequest, ...]) -> BaseException | None:
        """Queue a submission whole, or none of it: the error that refused it (QueueFull, TooLarge)."""
        self._applied += sum(r.params.num_samples for r in requests)  # counted as applied even if refused
        added = []
        try:
            for request in requests:
                self.engine.add(request)
                added.append(request.request_id)
        except Exception as exc:  # the submission's own error, not the engine's
            for request_id in added:
                self.engine.abort(request_id)
            return exc
        return None

    def _publish(self) -> None:
        scheduler = self.engine.scheduler
        self._occupancy = _Occupancy(len(scheduler.waiting), len(scheduler.running), self._applied)

    def _report(self, stats: StepStats | None) -> None:
        if stats is not None:
            self._observe(self._hooks.on_step, stats)

    def _to_loop(self, callback: Callable, *args) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(callback, *args)


def settle_future(done: asyncio.Future, result, error: BaseException | None) -> None:
    """On the loop: `done` gets `error` if there is one, else `result`; a no-op once it is done (its
    caller was cancelled). Threads hand their outcome to a waiting coroutine with it."""
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)
