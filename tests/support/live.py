"""The HTTP tests' server: the app on uvicorn in a thread on 127.0.0.1 (`serve`), yielding a `Live`: the app,
its URL and a client."""

import contextlib
import threading
import time

import httpx
import uvicorn

from reliability.server import free_port
from service.app import create_app
from service.config import ServiceConfig


class Live:
    """A running app: its URL, an httpx client on it, and `server`, what the app serves with."""

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
            app,
            host="127.0.0.1",
            port=config.port,
            log_config=None,
            access_log=False,
            **{"http": "h11", **(uvicorn_options or {})},  # as `python -m service`, whether httptools is there or not
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
