"""The stores the HTTP tests serve: `build_http_store`, three tiny random GPT-2s under one name, one of them a
chat model (CHAT_TEMPLATE)."""

from collections.abc import Callable
from pathlib import Path

from model_store import ModelStore
from model_store.import_hf import import_hf

CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def build_http_store(make_hf_model: Callable[..., Path], root: Path) -> tuple[Path, dict[int, Path]]:
    """tiny@1 (alias prod), tiny@2 (other weights) and tiny@3 (with a chat template), 256 positions each, in a
    store at `root`; returns (root, {version: hf model dir}). `make_hf_model` is the conftest's fixture."""
    store = ModelStore(root)
    sources = {}
    for version, seed in ((1, 11), (2, 12), (3, 13)):
        src = make_hf_model(seed=seed, config={"n_positions": 256})
        if version == 3:  # a chat model
            (src / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        import_hf(store, str(src), "tiny", alias="prod" if version == 1 else None)
        sources[version] = src
    return root, sources
