"""`python -m service` as a subprocess on 127.0.0.1 and a free port (`ServerProcess`), the launcher that
injects an engine fault (`FAULTY_SERVER`), and what a running server says about itself: its routing gauges,
when it is idle, the model it serves.

Nothing here is imported by the service.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
GAUGES = ("gpt2_serve_num_requests_running", "gpt2_serve_num_requests_waiting", "gpt2_serve_kv_cache_usage_ratio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# `python -m service` with a fault injected into the engine: once the file named by RELIABILITY_FAULT_TRIGGER
# exists, the next engine step raises (once). A test hook of the runner only: the service has none.
FAULTY_SERVER = """
import os, sys
from service.engine import Engine
trigger, step = os.environ["RELIABILITY_FAULT_TRIGGER"], Engine.step
def failing_step(self):
    if os.path.exists(trigger):
        os.unlink(trigger)
        raise RuntimeError("injected fault: an engine step raised")
    return step(self)
Engine.step = failing_step
from service.__main__ import main
sys.exit(main())
"""


class ServerProcess:
    """`python -m service` (or `python *argv`) on 127.0.0.1 and a free port, output in a log file, in its own
    session; `stop()` (SIGTERM, then SIGKILL) always ends it."""

    def __init__(
        self,
        root: Path,
        ref: str,
        settings: dict[str, object],
        log: Path,
        *,
        argv: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = log
        env = {
            **os.environ,
            "MODEL": ref,
            "MODEL_STORE_ROOT": str(root),
            "HOST": HOST,
            "PORT": str(self.port),
            **{k: str(v) for k, v in settings.items()},
            **(extra_env or {}),
        }
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, *(argv or ["-m", "service"])],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 180) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def rss_kib(self) -> int | None:
        """Resident memory (VmRSS) of the server process, from /proc; None once it is gone."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def read_gauges(text: str) -> dict[str, float]:
    """The three routing gauges from a /metrics body, summed over label sets."""
    values = dict.fromkeys(GAUGES, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


async def wait_idle(client: httpx.AsyncClient, timeout: float = 30.0) -> tuple[bool, dict[str, float], float]:
    """Poll /metrics until running, waiting and KV usage are all 0 (bounded). Returns (reached, last
    gauges, seconds it took)."""
    start = time.monotonic()
    gauges: dict[str, float] = {}
    while True:
        try:
            gauges = read_gauges((await client.get("/metrics", timeout=10)).text)
        except httpx.HTTPError as exc:
            gauges = {"error": str(exc)}  # type: ignore[dict-item]
        if gauges and all(gauges.get(g) == 0.0 for g in GAUGES):
            return True, gauges, time.monotonic() - start
        if time.monotonic() - start > timeout:
            return False, gauges, time.monotonic() - start
        await asyncio.sleep(0.1)


async def model_info(client: httpx.AsyncClient) -> dict:
    card = (await client.get("/v1/models")).json()["data"][0]
    tok = (await client.get("/tokenizer_info")).json()
    return {
        "id": card["id"],
        "max_model_len": card["max_model_len"],
        "vocab_size": tok["vocab_size"],
        "eos_token_id": tok["eos_token_id"],
    }
