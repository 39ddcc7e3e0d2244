"""The models the reliability suites serve, and the one builder of tiny random GPT-2s, which the test suite
uses too: a byte-level BPE tokenizer trained on the spot, a random `GPT2LMHeadModel` on it, and a store of
such models (nothing is downloaded). Also which model a suite serves, and writable copies of a store.

torch, tokenizers and transformers are imported inside the functions: `python -m reliability.run --help`
and the load generator do not need them.
"""

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from reliability.traffic import WORDS

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

EOS = "<|endoftext|>"
# The suites' prompts are made of WORDS: training on them keeps those prompts a few tokens a word.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Serving language models means batching requests that arrive at different times.",
    "Tokens, positions and caches: every sequence decodes at its own position.",
    "Caf\u00e9 na\u00efve fa\u00e7ade \u2014 r\u00e9sum\u00e9. \U0001f600 \u4f60\u597d\uff0c\u4e16\u754c\u3002",
    "def forward(self, x):\n    return self.proj(self.act(self.fc(x)))\n",
    " ".join(WORDS),
] * 20
TINY_CONFIG = dict(n_layer=2, n_head=4, n_embd=64, n_positions=256, initializer_range=0.2)


def train_tokenizer(corpus: list[str] = CORPUS, vocab_size: int = 400) -> "Tokenizer":
    """A GPT-2-style byte-level BPE (every byte in its alphabet, EOS the only special token, id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def random_gpt2(tokenizer: "Tokenizer", seed: int, **config) -> "GPT2LMHeadModel":
    """A randomly initialised GPT2LMHeadModel (eval mode) for `tokenizer`: TINY_CONFIG with its vocabulary
    and EOS as BOS and EOS, then `config`'s overrides; the weights depend only on the shapes and `seed`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.token_to_id(EOS)
    overrides = {**TINY_CONFIG, "vocab_size": tokenizer.get_vocab_size(), **config}
    cfg = GPT2Config(bos_token_id=eos, eos_token_id=eos, **overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


def build_tiny_store(root: Path, name: str = "tiny", versions: int = 2, seed: int = 11) -> str:
    """A store at `root` with `versions` random tiny GPT-2s (TINY_CONFIG, one tokenizer trained on CORPUS),
    version v seeded `seed + v - 1`, version 1 aliased `prod`. Returns "name@prod"."""
    from transformers.utils import logging as hf_logging

    from model_store import ModelStore
    from model_store.import_hf import import_hf

    hf_logging.disable_progress_bar()

    store = ModelStore(root)
    tok = train_tokenizer()
    with tempfile.TemporaryDirectory(prefix="tiny-hf-") as tmp:
        for version in range(1, versions + 1):
            src = Path(tmp) / f"v{version}"
            random_gpt2(tok, seed + version - 1).save_pretrained(src)
            tok.save(str(src / "tokenizer.json"))
            import_hf(store, str(src), name, alias="prod" if version == 1 else None)
    return f"{name}@prod"


def choose_model(
    model: str | None, store: str | None, workdir: Path, *, tiny: bool = False, log=print
) -> tuple[Path, str]:
    """(store root, reference) to serve: `model` in `store` (default MODEL_STORE_ROOT, else the repo's
    models/) when given; else the bundled `default@prod` when the repo's store has it (and not `tiny`);
    else a tiny random GPT-2 built in `workdir`."""
    from model_store import ModelStore
    from model_store.errors import StoreError
    from model_store.registry import store_root

    if model:
        root = store_root(store or os.environ.get("MODEL_STORE_ROOT") or None)
        ModelStore(root).resolve(model)  # fails early and clearly on an unknown reference
        return root, model
    root = store_root(store or None)
    if not tiny:
        try:
            ModelStore(root).resolve("default@prod")
            return root, "default@prod"
        except (StoreError, ValueError):
            log(f"default@prod is not in {root}")
    path = workdir / "store"
    log(f"building a tiny random GPT-2 in {path}")
    return path, build_tiny_store(path)


def copy_model(root: Path, ref: str, dest: Path) -> Path:
    """A writable copy (in `dest`) of the store holding `ref`'s name: every version and the aliases."""
    name = ref.split("@", 1)[0]
    shutil.copytree(root / name, dest / name, ignore=shutil.ignore_patterns(".lock"))
    for path in (dest / name).rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def add_version_copy(root: Path, ref: str) -> str:
    """Publish a copy of `ref`'s files as a new version of the same name (a reload target when a store has
    only one version). Returns its "name@version"."""
    from model_store import ModelStore
    from model_store.manifest import MANIFEST_FILE, Lineage

    store = ModelStore(root)
    stored = store.resolve(ref)
    m = stored.manifest
    with store.publish(m.name) as staging:
        for entry in m.files:
            if entry.path != MANIFEST_FILE:
                (staging.path / entry.path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(stored.path / entry.path, staging.path / entry.path)
        new = staging.commit(
            config=m.config,
            dtype=m.dtype,
            tokenizer=m.tokenizer,
            lineage=Lineage(source="copy", parent=m.ref),
            metrics={},
        )
    return new.ref
