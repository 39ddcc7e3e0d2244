"""A real server on 127.0.0.1 (uvicorn in a thread) over a store holding a tiny random GPT-2 (`tiny@1`, alias
`prod`), and an HTTP client for it. `serve(**overrides)` starts one with other settings."""

import contextlib
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from transformers import GPT2LMHeadModel

from model_store import ModelStore
from model_store.import_hf import import_hf
from service.app import create_app
from service.config import ServiceConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def http_store(make_hf_model, tmp_path_factory):
    """A store with tiny@1 (alias prod), tiny@2 (other weights) and tiny@3 (with a chat template); returns
    (root, {version: hf model dir})."""
    root = tmp_path_factory.mktemp("http-store")
    store = ModelStore(root)
    sources = {}
    for version, seed in ((1, 11), (2, 12), (3, 13)):
        src = make_hf_model(seed=seed, config={"n_positions": 256})
        if version == 3:  # a chat model
            (src / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        import_hf(store, str(src), "tiny", alias="prod" if version == 1 else None)
        sources[version] = src
    return root, sources


CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="session")
def hf_tiny(http_store):
    return GPT2LMHeadModel.from_pretrained(http_store[1][1], attn_implementation="eager").eval()


class Live:
    def __init__(self, app, url: str) -> None:
        self.app, self.url = app, url
        self.client = httpx.Client(base_url=url, timeout=60)

    @property
    def server(self):
        return self.app.state.server


@contextlib.contextmanager
def serve(store_root, uvicorn_options=None, **overrides):
    """The app on uvicorn in a thread on 127.0.0.1, once loaded and warmed up; `overrides` are service
    settings, `uvicorn_options` extra `uvicorn.Config` arguments (say, the `http` protocol class)."""
    env = {
        "MODEL": "tiny@prod",
        "MODEL_STORE_ROOT": str(store_root),
        "DTYPE": "float32",
        "KV_CACHE_MEMORY": "16MiB",
        "MAX_NUM_BATCHED_TOKENS": "256",
        "NUM_THREADS": "1",
        "SEED": "0",
        "PORT": str(free_port()),
    }
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    config = ServiceConfig.from_env(env)
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=config.port, log_config=None, access_log=False, **(uvicorn_options or {})
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:  # uvicorn sets it once the lifespan (load + warm-up) is done
        assert thread.is_alive(), "the server failed to start"
        time.sleep(0.02)
    live = Live(app, f"http://127.0.0.1:{config.port}")
    try:
        yield live
    finally:
        live.client.close()
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(http_store):
    with serve(http_store[0]) as server:
        yield server
