"""Security checks not covered elsewhere: store references that try to escape the store root (parsing and
/admin/reload), no prompt text or API key in the logs, weights loaded only as data (safetensors,
`torch.load(weights_only=True)`), chat templates sandboxed, header limits.

Already covered, not repeated here: API keys on every OpenAPI route and the constant-time compare
(tests/api/test_operations.py::test_api_keys_guard_every_route_but_health_ready_metrics), the basic
reference syntax (tests/unit/test_refs.py, tests/store/test_registry.py, tests/store/test_cli.py), pickled
code in a `.bin` checkpoint never run (tests/store/test_import_hf.py), body size and slow bodies
(tests/robustness/test_hostile.py)."""

import ast
import contextlib
import json
import socket
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from model_store import ModelStore
from model_store.errors import InvalidReferenceError
from model_store.refs import parse_ref
from reliability.server import ServerProcess
from service.api.chat import chat_prompt
from service.api.errors import APIError
from service.api.schemas import ChatMessage
from tests.support.live import serve
from tests.support.raw_http import exchange, json_body

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live(http_store):
    with serve(http_store[0]) as live:
        yield live


# -- header limits -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [17 * 1024, 100 * 1024, 250 * 1024])
def test_huge_header_in_one_piece_is_431(live, size):
    """h11 refuses headers over 16 KiB only while they arrive in pieces; sent at once (up to a 256 KiB
    read) they used to pass. The edge applies the same 16 KiB however they arrive."""
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    status, data, closed, _ = exchange(live.url, [request], read_timeout=10)
    assert status == 431 or (status == 400 and b"text/plain" in data) or (status is None and closed), data[:300]
    if status == 431:
        err = json_body(data)["error"]
        assert err["code"] == "request_too_large" and "the limit is 16384" in err["message"]


def test_huge_header_in_pieces_is_refused_by_h11(live):
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(100):  # 100 KB, 1 KB at a time
                sock.sendall(b"a" * 1024)
        except OSError:
            pass  # refused and closed mid-send
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:200]


def test_many_small_headers_count_too(live):
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 20) for i in range(1000))  # ~30 KB
    status, data, closed, _ = exchange(
        live.url, [b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"], read_timeout=10
    )
    assert status in (400, 431) or (status is None and closed), data[:300]


def test_headers_under_the_limit_pass(live):
    r = live.client.get("/v1/models", headers={"X-Big": "a" * 15000})
    assert r.status_code == 200


# -- store references that try to leave the store root -------------------------------------------------------
ESCAPES = [
    "../x",
    "..",
    ".",
    "/etc/passwd",
    "tiny/../../etc",
    "tiny@../../etc",
    "tiny@/etc/passwd",
    "tiny@..",
    "tiny@./prod",
    "..@1",
    "~/x",
    "~root",
    "C:\\Windows",
    "\\\\server\\share",
    "tiny\\..\\x",
    "%2e%2e%2fetc",
    "tiny\x00",
    "tiny@prod\x00",
    "\x00",
    "tiny@1\x00/../../etc",
    "x" * 10_000,
    "tiny@" + "p" * 10_000,
    "tiny@" + "9" * 5000,
    "tiny@" + "9" * 19,
    "tiny@\u00b2",
    "tiny@\u0661",
    "\uff54iny",
    "tiny@pr\u043ed",
    "tiny\n../x",
    "tiny@prod/../../x",
    "-rf",
    "tiny@-1",
]


@pytest.mark.parametrize("ref", ESCAPES, ids=range(len(ESCAPES)))
def test_references_that_escape_the_store_are_refused_by_parsing(ref, tmp_path):
    with pytest.raises(InvalidReferenceError):
        parse_ref(ref)
    with pytest.raises(InvalidReferenceError):
        ModelStore(tmp_path / "store").resolve(ref)


def tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_admin_reload_refuses_references_that_escape_the_store(http_store):
    root = http_store[0]
    before = tree(root)
    with serve(root) as live:
        for ref in ESCAPES:
            r = live.client.post("/admin/reload", json={"model": ref})
            assert r.status_code == 400, (ref[:40], r.status_code, r.text[:200])
            err = r.json()["error"]
            assert err["param"] == "model" and err["code"] == "invalid_value" and err["type"] == "invalid_request_error"
        for ref in ("etc@passwd", "passwd", "tiny@99", "tiny@staging"):  # well-formed, not in the store: 404
            r = live.client.post("/admin/reload", json={"model": ref})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", ref
        assert live.client.get("/v1/models").json()["data"][0]["id"] == "tiny@1"  # still serving what it was
        assert live.client.get("/ready").status_code == 200
    assert tree(root) == before  # nothing created, touched or removed in the store


# -- logs ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def service_processes(store_root: Path, logs: dict[str, Path], **env: str):
    """One `python -m service` (its real logging set-up) per log level in `logs`, output to that file; all
    start together (the slow part is importing torch). Yields {level: base URL}."""
    settings = {"DTYPE": "float32", "KV_CACHE_MEMORY": "16MiB", "NUM_THREADS": "1", "DRAIN_TIMEOUT": "2", **env}
    with contextlib.ExitStack() as stack:
        servers = {
            level: stack.enter_context(ServerProcess(store_root, "tiny@prod", {**settings, "LOG_LEVEL": level}, path))
            for level, path in logs.items()
        }
        for server in servers.values():
            server.wait_ready(timeout=120)
        yield {level: server.url for level, server in servers.items()}


def exercise(url: str, key: str, wrong_key: str, prompt: str) -> int:
    """Requests whose prompts carry `prompt` and whose Authorization carries a key, through every path
    that logs: success, stream, validation errors, engine-side refusals, bad keys, bad JSON."""
    auth = {"Authorization": f"Bearer {key}"}
    requests = [
        ("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 2}, auth, 200),
        ("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 2, "stream": True, "stop": [prompt]}, auth, 200),
        ("POST", "/v1/completions", {"prompt": prompt * 200, "max_tokens": 2}, auth, 400),  # context length
        (
            "POST",
            "/v1/completions",
            {"prompt": prompt, "temperature": prompt},
            auth,
            400,
        ),  # validation, the value echoed?
        ("POST", "/v1/completions", {"prompt": prompt, "logit_bias": {prompt: 1}}, auth, 400),
        ("POST", "/v1/completions", {"prompt": prompt, "model": prompt}, auth, 404),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2},
            auth,
            200,
        ),
        ("POST", "/v1/chat/completions", {"messages": [{"role": prompt, "content": prompt}]}, auth, 400),
        ("POST", "/v1/score", {"text": prompt}, auth, 200),
        ("POST", "/v1/score", {"context": prompt, "continuations": [prompt]}, auth, 200),
        ("POST", "/tokenize", {"prompt": prompt}, auth, 200),
        ("POST", "/admin/reload", {"model": prompt}, auth, 400),
        ("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 2}, {"Authorization": f"Bearer {wrong_key}"}, 401),
        ("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 2}, {"Authorization": key}, 401),  # no scheme
        ("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 2}, {"X-Api-Key": key}, 401),
    ]
    with httpx.Client(base_url=url, timeout=30) as client:
        for method, path, body, headers, expected in requests:
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == expected, (path, body, r.status_code, r.text[:200])
        r = client.post(
            "/v1/completions",
            content=b'{"prompt": "' + prompt.encode() + b'", ',
            headers={**auth, "content-type": "application/json"},
        )
        assert r.status_code == 400
    return len(requests) + 1


def read_log(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(e, dict) and {"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    return entries


def test_no_prompt_text_or_api_key_in_the_logs(http_store, tmp_path):
    """At the default level (info) neither the prompt nor any key, valid or not, is in a log line; at
    debug the prompt may be, a key still never."""
    marker = uuid.uuid4().hex[:12]
    prompt, key, wrong = f"secret prompt {marker}", f"sk-live-{marker}", f"sk-wrong-{marker}"
    logs = {level: tmp_path / f"{level}.log" for level in ("info", "debug")}
    with service_processes(http_store[0], logs, API_KEYS=key) as urls:
        sent = {level: exercise(url, key, wrong, prompt) for level, url in urls.items()}
    for level, path in logs.items():
        text = path.read_text()
        entries = read_log(path)
        requests = [e for e in entries if e["msg"] == "request"]
        assert len(requests) >= sent[level], (level, len(requests))  # every request was logged, once
        assert all(set(e) >= {"request_id", "method", "path", "status", "duration_ms"} for e in requests)
        for secret in (key, wrong, marker if level == "info" else key):
            assert secret not in text, (level, secret, [line for line in text.splitlines() if secret in line][:3])


# -- weights are data, never code ----------------------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
SAFE_PICKLE_NAMES = {"UnpicklingError", "PicklingError", "PickleError"}  # exception types, to catch errors


def unsafe_loads(source: str) -> list[str]:
    """Calls that can run code from a file: torch.load without weights_only=True, any loader of the
    pickle family (names of their exception classes are fine), numpy.load(allow_pickle=True),
    yaml.load without a safe Loader, trust_remote_code=True, eval/exec."""
    found = []
    tree = ast.parse(source)
    aliases = {}  # local name -> module, for `import pickle as p` / `from torch import load`
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                if node.module.split(".")[0] in UNSAFE_MODULES and a.name not in SAFE_PICKLE_NAMES:
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")

    def dotted(expr) -> str:
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            return f"{dotted(expr.value)}.{expr.attr}"
        return "?"

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = dotted(node)
            if name.split(".")[0] in UNSAFE_MODULES and node.attr not in SAFE_PICKLE_NAMES:
                found.append(f"line {node.lineno}: {name}")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        true = lambda arg, kw=kw: isinstance(kw.get(arg), ast.Constant) and kw[arg].value is True  # noqa: E731
        if name == "torch.load" and not true("weights_only"):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if (
            name in ("numpy.load", "np.load")
            and "allow_pickle" in kw
            and not (isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False)
        ):
            found.append(f"line {node.lineno}: numpy.load(allow_pickle=...)")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load") and "Safe" not in ast.unparse(
            kw.get("Loader", ast.Constant(""))
        ):
            found.append(f"line {node.lineno}: {name} without a safe Loader")
        if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            found.append(f"line {node.lineno}: {name}()")
        if true("trust_remote_code"):
            found.append(f"line {node.lineno}: trust_remote_code=True")
    return found


@pytest.mark.parametrize(
    "source, bad",
    [
        ("import torch\ntorch.load(p)", True),
        ("import torch\ntorch.load(p, weights_only=False)", True),
        ("import torch as t\nt.load(p, map_location='cpu')", True),
        ("from torch import load\nload(p)", True),
        ("import torch\ntorch.load(p, map_location='cpu', weights_only=True)", False),
        ("import pickle\npickle.load(f)", True),
        ("import pickle as p\np.loads(b)", True),
        ("from pickle import Unpickler", True),
        ("import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass", False),
        ("import dill\ndill.load(f)", True),
        ("import numpy as np\nnp.load(p, allow_pickle=True)", True),
        ("import numpy as np\nnp.load(p)", False),
        ("import yaml\nyaml.load(s)", True),
        ("import yaml\nyaml.load(s, Loader=yaml.SafeLoader)", False),
        ("from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)", True),
        ("eval(s)", True),
        ("model.eval()", False),
    ],
)
def test_the_unsafe_load_finder_finds_them(source, bad):
    assert bool(unsafe_loads(source)) == bad, unsafe_loads(source)


def test_weights_are_loaded_only_as_data():
    """service/ and model_store/ read weights through safetensors, or torch.load(weights_only=True) for
    legacy .bin checkpoints and training checkpoints: nothing that unpickles code."""
    files = sorted(p for d in ("service", "model_store") for p in (REPO / d).rglob("*.py"))
    assert len(files) > 20
    problems = {str(p.relative_to(REPO)): found for p in files if (found := unsafe_loads(p.read_text()))}
    assert not problems, problems
    loads = [str(p.relative_to(REPO)) for p in files if "torch.load(" in p.read_text()]
    assert loads and all(f.startswith("model_store/") for f in loads), loads  # the service itself never unpickles


# -- chat templates come from the store: rendered sandboxed ---------------------------------------------------
@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('touch /tmp/pwned').read() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{% for m in messages %}{{ m.content.__class__.__init__.__globals__ }}{% endfor %}",
        "{{ messages.append(1) }}{{ messages }}",
        "{{ self._TemplateReference__context }}",
        "{% for i in range(10**6) %}{% endfor %}",  # past the sandbox's range limit: OverflowError
        "{{ 1 // 0 }}",  # ZeroDivisionError: a template failing in Python, not in jinja
    ],
)
def test_chat_templates_cannot_reach_python(http_store, template):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(http_store[1][1] / "tokenizer.json"))
    model = SimpleNamespace(tokenizer=tok, eos_token_id=0, chat_template=template)  # what chat_prompt reads
    with pytest.raises(APIError) as err:
        chat_prompt([ChatMessage(role="user", content="hi")], model)
    assert err.value.status == 400 and err.value.param == "messages"
    assert not Path("/tmp/pwned").exists()


def test_message_content_is_data_not_template(http_store):
    with serve(http_store[0], model="tiny@3") as live:  # tiny@3 has a chat template
        content = "{{ cycler.__init__.__globals__.os.popen('touch /tmp/pwned2').read() }}{% raw %}"
        r = live.client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 1}
        )
        assert r.status_code == 200
        ids = live.client.post("/tokenize", json={"prompt": f"[user] {content}\n[assistant]"}).json()["count"]
        assert r.json()["usage"]["prompt_tokens"] == ids  # rendered verbatim
    assert not Path("/tmp/pwned2").exists()
