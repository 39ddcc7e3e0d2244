"""The generation engine: continuous batching over a paged KV cache, on one thread, with an asyncio facade.

This is the engine's public surface; the layers above (serving, API, metrics) import only from here. An
`Engine` is built from a loaded model and an `EngineConfig`; `AsyncEngine` runs it on its own thread and
takes `EngineRequest`s (token ids and `SamplingParams`) through `submit()`, which returns a
`RequestHandle` of `EngineOutput`s. Nothing here knows HTTP.
"""

from .async_engine import AsyncEngine, EngineHooks, RequestHandle
from .detokenizer import TokenBytes, TokenStrings
from .engine import Engine, EngineConfig
from .scheduler import SchedulerConfig
from .types import (
    MAX_LOGPROBS,
    EngineDead,
    EngineOutput,
    EngineRequest,
    FinishReason,
    QueueFull,
    RequestStats,
    SamplingParams,
    StepStats,
    TokenLogprob,
    TooLarge,
    Unsupported,
)

__all__ = [
    "MAX_LOGPROBS",
    "AsyncEngine",
    "Engine",
    "EngineConfig",
    "EngineDead",
    "EngineHooks",
    "EngineOutput",
    "EngineRequest",
    "FinishReason",
    "QueueFull",
    "RequestHandle",
    "RequestStats",
    "SamplingParams",
    "SchedulerConfig",
    "StepStats",
    "TokenBytes",
    "TokenLogprob",
    "TokenStrings",
    "TooLarge",
    "Unsupported",
]
