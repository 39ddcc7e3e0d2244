"""Schema-driven fuzzing of the HTTP service with schemathesis (its Python API, 4.x).

    .venv/bin/python -m reliability.fuzz                  # 2,000 cases against a fresh tiny random model
    .venv/bin/python -m reliability.fuzz --cases 300      # a quicker pass
    .venv/bin/python -m reliability.fuzz --url http://127.0.0.1:8000   # an already running service

Without `--url` it builds a store holding a tiny random GPT-2 (`tiny@1`, alias `prod`; a byte-level BPE
tokenizer trained on the spot, nothing downloaded) in a temporary directory, starts `python -m service` on
127.0.0.1 with it, and stops it at the end. It then loads `/openapi.json`, and for every operation draws
cases from schemathesis' hypothesis strategies, positive (valid per the schema) and negative (violating
it), sends each with a per-request timeout and checks:

- `not_a_server_error`: no 5xx;
- `response_schema_conformance`: the response matches the schema where the schema declares one;
- no hang: a request without an answer within `--timeout` seconds is a failure.

After the run the service must still be ready with nothing running or waiting, and its log must hold no
error-level line. Prints cases run, failures (each with a curl to reproduce), per endpoint, and the wall
time; exits 1 on any failure. `run_fuzz()` is what tests/robustness/test_fuzz.py calls with ~100 cases.
"""

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from reliability.server import ServerProcess
from reliability.stores import build_tiny_store

# Operations without a body or parameters have one possible request each: one case is all they get.
BODYLESS_CASES = 1


# -- the service under test ---------------------------------------------------------------------------------
@contextlib.contextmanager
def service(store_root: Path, log_path: Path) -> Iterator[str]:
    """`python -m service` on 127.0.0.1 serving tiny@prod from `store_root`; yields its base URL."""
    settings = {
        "DTYPE": "float32",
        "KV_CACHE_MEMORY": "16MiB",
        "MAX_NUM_BATCHED_TOKENS": "256",
        "NUM_THREADS": "1",
        "SEED": "0",
        "DRAIN_TIMEOUT": "5",
    }
    with ServerProcess(store_root, "tiny@prod", settings, log_path) as server:
        server.wait_ready(timeout=120)
        yield server.url


# -- fuzzing ------------------------------------------------------------------------------------------------
@dataclass
class Failure:
    operation: str
    mode: str
    kind: str  # the schemathesis check that failed, or "timeout" / "transport"
    status: int | None
    message: str
    curl: str


@dataclass
class Report:
    cases: dict[str, int] = field(default_factory=dict)  # operation -> cases sent
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)  # operation -> status -> count
    failures: list[Failure] = field(default_factory=list)
    slowest: dict[str, float] = field(default_factory=dict)  # operation -> slowest response (s)
    errors: dict[str, Counter] = field(default_factory=dict)  # operation -> error code and param -> count
    wall_s: float = 0.0
    after: dict = field(default_factory=dict)  # the service's state after the run

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def ok(self) -> bool:
        return not self.failures and self.after.get("healthy", True)

    def summary(self) -> str:
        lines = [
            f"{self.total} cases in {self.wall_s:.1f} s, {len(self.failures)} failures",
            "",
            f"{'operation':34} {'cases':>6} {'fail':>5} {'slowest':>8}  statuses",
        ]
        for op in sorted(self.cases):
            fails = sum(f.operation == op for f in self.failures)
            statuses = " ".join(f"{s}:{n}" for s, n in sorted(self.statuses.get(op, {}).items()))
            lines.append(f"{op:34} {self.cases[op]:>6} {fails:>5} {self.slowest.get(op, 0):>7.2f}s  {statuses}")
            common = ", ".join(f"{reason} {n}" for reason, n in self.errors.get(op, Counter()).most_common(4))
            if common:
                lines.append(f"{'':34}   errors: {common}")
        if self.after:
            lines += ["", "after the run: " + ", ".join(f"{k}={v}" for k, v in self.after.items())]
        seen = set()
        for f in self.failures:
            key = (f.operation, f.kind, f.status)
            if key in seen:
                continue
            seen.add(key)
            lines += [
                "",
                f"FAIL {f.operation} [{f.mode}] {f.kind} (status {f.status}): {f.message.strip()[:600]}",
                f"  reproduce: {f.curl[:2000]}",
            ]
        return "\n".join(lines)


def run_fuzz(
    base_url: str,
    cases: int = 2000,
    *,
    timeout: float = 30.0,
    seed: int = 0,
    headers: dict[str, str] | None = None,
    log=print,
) -> Report:
    """Fuzz every operation of the service at `base_url` with at least `cases` requests in all."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, given
    from schemathesis import GenerationMode, openapi
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.core.result import Ok
    from schemathesis.specs.openapi.checks import response_schema_conformance

    schema = openapi.from_url(base_url + "/openapi.json", timeout=timeout, **({"headers": headers} if headers else {}))
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    report = Report()
    session = requests.Session()
    checks = [not_a_server_error, response_schema_conformance]
    start = time.monotonic()

    def fuzz(operation, mode: GenerationMode, examples: int, round_seed: int) -> None:
        op = operation.label

        def one(case) -> None:
            report.cases[op] += 1
            began = time.monotonic()
            curl = case.as_curl_command(base_url=base_url)
            try:
                response = case.call(base_url=base_url, session=session, headers=headers, timeout=timeout)
            except requests.Timeout:
                report.failures.append(Failure(op, mode.value, "timeout", None, f"no answer within {timeout} s", curl))
                return
            except requests.RequestException as exc:
                report.failures.append(Failure(op, mode.value, "transport", None, repr(exc), curl))
                return
            status = response.status_code
            report.slowest[op] = max(report.slowest.get(op, 0.0), time.monotonic() - began)
            report.statuses[op][status] = report.statuses[op].get(status, 0) + 1
            if 400 <= status < 500:
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                    err = response.json()["error"]
                    report.errors.setdefault(op, Counter())[f"{err['code']}({err['param']})"] += 1
            try:
                case.validate_response(response, checks=checks)
            except FailureGroup as group:
                for failure in group.exceptions:
                    report.failures.append(
                        Failure(
                            op, mode.value, type(failure).__name__, status, f"{failure.title}: {failure.message}", curl
                        )
                    )

        settings = hypothesis.settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
        test = settings(hypothesis.seed(round_seed)(given(case=operation.as_strategy(generation_mode=mode))(one)))
        try:
            test()
        except hypothesis.errors.Unsatisfiable:
            pass  # nothing (more) to generate in this mode, e.g. no way to violate the schema

    with_body = [op for op in operations if op.body]
    for operation in operations:
        report.cases[operation.label], report.statuses[operation.label] = 0, {}
        if not operation.body:
            fuzz(operation, GenerationMode.POSITIVE, BODYLESS_CASES, seed)
            log(f"{operation.label}: {report.cases[operation.label]} cases")
    # The rest, shared by the operations with a body, half positive and half negative; rounds with other
    # seeds until the total is reached (hypothesis stops early when it runs out of distinct cases).
    for round_ in range(10):
        missing = cases - report.total
        if missing <= 0 or not with_body:
            break
        share = -(-missing // len(with_body))
        for operation in with_body:
            before = report.cases[operation.label]
            fuzz(operation, GenerationMode.POSITIVE, -(-share // 2), seed + round_)
            fuzz(operation, GenerationMode.NEGATIVE, share // 2, seed + round_)
            log(
                f"{operation.label}: {report.cases[operation.label] - before} cases (round {round_ + 1}), "
                f"{len(report.failures)} failures so far"
            )
    report.wall_s = time.monotonic() - start
    report.after = service_state(base_url, headers, timeout)
    return report


def service_state(base_url: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> dict:
    """Ready, and nothing left running or waiting in the engine (polled: aborts land between steps)."""
    deadline = time.monotonic() + timeout
    while True:
        ready = requests.get(base_url + "/ready", headers=headers, timeout=timeout).status_code
        text = requests.get(base_url + "/metrics", headers=headers, timeout=timeout).text
        gauges = {
            name: sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"gpt2_serve_{name}{{"))
            for name in ("num_requests_running", "num_requests_waiting")
        }
        healthy = ready == 200 and not any(gauges.values())
        if healthy or time.monotonic() > deadline:
            return {"ready": ready, **gauges, "healthy": healthy}
        time.sleep(0.1)


def error_lines(log_path: Path) -> list[str]:
    """The service log's error-level lines (an engine step that raised, an unexpected exception)."""
    bad = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            level = json.loads(line).get("level")
        except (json.JSONDecodeError, AttributeError):
            level = "error" if "Traceback" in line else None
        if level in ("error", "critical"):
            bad.append(line)
    return bad


def _error_text(line: str) -> str:
    """An error line, short: its message and the end of its traceback (where the exception was raised),
    which the start of a long JSON line never reaches."""
    try:
        record = json.loads(line)
        return f"{record.get('msg', '').strip()} | ...{record.get('exc', '')[-1500:]}"
    except (json.JSONDecodeError, AttributeError):
        return line[-1500:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reliability.fuzz",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cases", type=int, default=2000, help="requests to send in all (default 2000)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    parser.add_argument("--url", help="fuzz this running service instead of starting one")
    parser.add_argument("--api-key", help="Bearer key for a service with API_KEYS")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    errors: list[str] = []
    if args.url:
        report = run_fuzz(args.url.rstrip("/"), args.cases, timeout=args.timeout, seed=args.seed, headers=headers)
    else:
        with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
            print("building a tiny random model ...", flush=True)
            build_tiny_store(Path(tmp) / "store", versions=1, seed=0)
            log_path = Path(tmp) / "service.log"
            with service(Path(tmp) / "store", log_path) as url:
                print(f"service on {url}; fuzzing ~{args.cases} cases", flush=True)
                report = run_fuzz(url, args.cases, timeout=args.timeout, seed=args.seed)
            errors = error_lines(log_path)
            report.after["log_errors"] = len(errors)
    print()
    print(report.summary())
    for line in errors[:20]:
        print("LOG ERROR", _error_text(line))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cases": report.cases,
                    "total": report.total,
                    "wall_s": report.wall_s,
                    "statuses": report.statuses,
                    "after": report.after,
                    "failures": [f.__dict__ for f in report.failures],
                },
                indent=2,
            )
        )
    return 0 if report.ok() and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
