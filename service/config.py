"""The service's configuration: the only place that reads the environment.

`ServiceConfig.from_env()` parses every variable once, at start, into a frozen dataclass that is passed
down; an invalid value raises `ConfigError` naming the variable, and the process exits before loading
anything. `VARIABLES` is the table the README documents (name, default, meaning). Each default is written
once: the engine's own knobs take the engine's defaults (`SchedulerConfig`, `EngineConfig`), and
`ServiceConfig`'s field defaults are the variables' defaults, parsed.
"""

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.engine import EngineConfig, SchedulerConfig


class ConfigError(ValueError):
    """An environment variable has an invalid value; the message names it."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "KI": 1024,
    "MI": 1024**2,
    "GI": 1024**3,
    "TI": 1024**4,
}


def parse_bytes(text: str) -> int:
    """`1073741824`, `512MiB`, `1GiB`, `2GB`, `1.5G` -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 1073741824, 512MiB, 1GiB)")
    unit = (m.group(2) or "").upper().removesuffix("B")
    return int(float(m.group(1)) * _UNITS[unit])


def _int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text.strip())
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"{value} is outside [{lo}, {hi if hi is not None else 'inf'}]")
        return value

    return parse


def _float(lo: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text.strip())
        if not value >= lo or value == float("inf"):  # also rejects NaN
            raise ValueError(f"{value} must be a finite number >= {lo}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _device(text: str) -> str:
    value = text.strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ValueError(f"{text!r} is not cpu, cuda or cuda:N")
    return value


def _keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if any(len(k) < 8 for k in keys):
        raise ValueError("every key must be at least 8 characters")
    return keys


def _refs(text: str) -> tuple[str, ...]:
    refs = tuple(r.strip() for r in text.split(",") if r.strip())
    if len(set(refs)) != len(refs):
        raise ValueError("a reference is listed twice")
    return refs


def _positive_bytes(text: str) -> int:
    value = parse_bytes(text)
    if value <= 0:
        raise ValueError("must be more than 0 bytes")
    return value


def _size_text(num_bytes: int) -> str:
    """Bytes as the largest binary unit that divides them exactly: 1073741824 -> 1GiB."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes % size == 0:
            return f"{num_bytes // size}{unit}"
    return str(num_bytes)


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text.strip() == "" else parse(text)


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    help: str
    parse: Callable[[str], Any] = field(repr=False)


_ENGINE, _SCHEDULER = EngineConfig(), SchedulerConfig()

VARIABLES: tuple[Variable, ...] = (
    Variable("HOST", "127.0.0.1", "address to listen on (0.0.0.0 in containers)", str.strip),
    Variable("PORT", "8000", "TCP port", _int(1, 65535)),
    Variable("MODEL", "default@prod", "store reference to serve: name, name@version or name@alias", str.strip),
    Variable(
        "ADAPTERS",
        "",
        "comma-separated LoRA adapter versions of MODEL to serve beside it; a request names one as its model",
        _refs,
    ),
    Variable("MAX_LORA_RANK", "64", "largest LoRA adapter rank served", _int(1, 4096)),
    Variable(
        "MAX_ADAPTERS",
        "8",
        "LoRA adapters held at once; loading one more evicts the least recently used one not in use",
        _int(1, 1024),
    ),
    Variable("MODEL_STORE_ROOT", "", "model store directory (default: the repo's models/)", str.strip),
    Variable("DEVICE", "cpu", "cpu, cuda or cuda:N", _device),
    Variable(
        "DTYPE",
        "auto",
        "auto (bfloat16 where the hardware has bf16 matrix units, else float32), "
        "float32, bfloat16, float16 (CUDA only)",
        _choice("auto", "float32", "bfloat16", "float16"),
    ),
    Variable("MAX_NUM_SEQS", str(_SCHEDULER.max_num_seqs), "sequences decoded together per step", _int(1, 4096)),
    Variable(
        "MAX_NUM_BATCHED_TOKENS",
        str(_SCHEDULER.max_num_batched_tokens),
        "tokens computed per step (prefill chunk budget)",
        _int(16, 1 << 20),
    ),
    Variable(
        "MAX_MODEL_LEN", "", "prompt + completion limit in tokens (default: the model's context)", _optional(_int(2))
    ),
    Variable(
        "KV_CACHE_MEMORY",
        _size_text(_ENGINE.kv_cache_bytes),
        "KV cache budget (bytes, or 512MiB, 2GiB, ...)",
        _positive_bytes,
    ),
    Variable("MAX_WAITING_REQUESTS", str(_SCHEDULER.max_waiting), "sequences allowed to wait; beyond it: 429", _int(1)),
    Variable(
        "MAX_WAITING_TOKENS",
        str(_SCHEDULER.max_waiting_tokens),
        "prompt tokens allowed to wait; beyond it: 429",
        _int(1),
    ),
    Variable("MAX_N", "16", "largest `n` (samples per prompt) a request may ask for", _int(1, 256)),
    Variable("MAX_STOP", "16", "most stop strings per request", _int(0, 1024)),
    Variable("API_KEYS", "", "comma-separated Bearer keys; empty: no authentication", _keys),
    Variable("MAX_BODY_BYTES", "2MiB", "request body limit; beyond it: 413", _positive_bytes),
    Variable("DRAIN_TIMEOUT", "30", "seconds in-flight requests may take to finish after SIGTERM", _float(0)),
    Variable(
        "LOG_LEVEL",
        "info",
        "debug, info, warning, error (prompt text is never logged)",
        _choice("debug", "info", "warning", "error"),
    ),
    Variable("NUM_THREADS", "", "CPU threads for torch (default: the cores available)", _optional(_int(1, 1024))),
    Variable(
        "COMPILED_KERNELS",
        "auto",
        "auto: build the C++ CPU kernels on first start (g++) and use them, else PyTorch alone; off: PyTorch alone",
        _choice("auto", "off"),
    ),
    Variable(
        "QUANTIZATION",
        "none",
        "none, or int8: int8 weights for generation on CPU (faster, not exact: see docs/engine.md; "
        "prompt scoring is then refused)",
        _choice("none", "int8"),
    ),
    Variable("SEED", "", "seed of the generator shared by unseeded requests (default: random)", _optional(_int(0))),
)


_DEFAULTS: dict[str, Any] = {var.name.lower(): var.parse(var.default) for var in VARIABLES}


@dataclass(frozen=True)
class ServiceConfig:
    """Every variable of `VARIABLES`, parsed; a field's default is its variable's."""

    host: str = _DEFAULTS["host"]
    port: int = _DEFAULTS["port"]
    model: str = _DEFAULTS["model"]
    adapters: tuple[str, ...] = _DEFAULTS["adapters"]
    max_lora_rank: int = _DEFAULTS["max_lora_rank"]
    max_adapters: int = _DEFAULTS["max_adapters"]
    model_store_root: str = _DEFAULTS["model_store_root"]
    device: str = _DEFAULTS["device"]
    dtype: str = _DEFAULTS["dtype"]
    max_num_seqs: int = _DEFAULTS["max_num_seqs"]
    max_num_batched_tokens: int = _DEFAULTS["max_num_batched_tokens"]
    max_model_len: int | None = _DEFAULTS["max_model_len"]
    kv_cache_memory: int = _DEFAULTS["kv_cache_memory"]
    max_waiting_requests: int = _DEFAULTS["max_waiting_requests"]
    max_waiting_tokens: int = _DEFAULTS["max_waiting_tokens"]
    max_n: int = _DEFAULTS["max_n"]
    max_stop: int = _DEFAULTS["max_stop"]
    api_keys: tuple[str, ...] = _DEFAULTS["api_keys"]
    max_body_bytes: int = _DEFAULTS["max_body_bytes"]
    drain_timeout: float = _DEFAULTS["drain_timeout"]
    log_level: str = _DEFAULTS["log_level"]
    num_threads: int | None = _DEFAULTS["num_threads"]
    compiled_kernels: str = _DEFAULTS["compiled_kernels"]
    quantization: str = _DEFAULTS["quantization"]
    seed: int | None = _DEFAULTS["seed"]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ServiceConfig":
        env = os.environ if env is None else env
        values = {}
        for var in VARIABLES:
            text = env.get(var.name, var.default)
            try:
                values[var.name.lower()] = var.parse(text)
            except ValueError as exc:
                raise ConfigError(f"{var.name}={text!r}: {exc}") from None
        if len(values["adapters"]) > values["max_adapters"]:
            raise ConfigError(
                f"ADAPTERS lists {len(values['adapters'])} adapters; MAX_ADAPTERS is {values['max_adapters']}"
            )
        if values["quantization"] != "none" and values["device"] != "cpu":
            raise ConfigError(f"QUANTIZATION={values['quantization']} runs on CPU only; DEVICE is {values['device']}")
        return cls(**values)

    def engine_config(self, n_positions: int) -> EngineConfig:
        """The engine's share of the configuration, for a model with `n_positions` of context."""
        max_model_len = min(self.max_model_len or n_positions, n_positions)
        scheduler = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_waiting=self.max_waiting_requests,
            max_waiting_tokens=self.max_waiting_tokens,
            max_model_len=max_model_len,
        )
        return EngineConfig(
            scheduler,
            self.kv_cache_memory,
            seed=self.seed,
            num_threads=self.num_threads,
            compiled_kernels=self.compiled_kernels == "auto",
            quantization=self.quantization,
        )
