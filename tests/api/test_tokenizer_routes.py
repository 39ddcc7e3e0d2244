"""The tokenizer routes over real HTTP: `/tokenize` applies the tokenizer's post-processor only when
`add_special_tokens` asks for it (the default, as vLLM's), while completions never apply it."""

from tokenizers import Tokenizer, processors

from model_store.import_hf import import_hf
from tests.support.live import serve

EOS = "<|endoftext|>"


def test_tokenize_adds_special_tokens_only_when_asked(make_hf_model, store):
    src = make_hf_model(seed=21)
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    eos = tokenizer.token_to_id(EOS)
    # A tokenizer whose post-processor prepends EOS (GPT-2's own adds nothing, so both answers would agree).
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, eos)])
    tokenizer.save(str(src / "tokenizer.json"))
    import_hf(store, str(src), "tiny", alias="prod")
    with serve(store.root) as live:
        plain = live.client.post("/tokenize", json={"prompt": "The quick brown fox", "add_special_tokens": False})
        special = live.client.post("/tokenize", json={"prompt": "The quick brown fox"})
        echoed = live.client.post("/v1/completions", json={"prompt": "The quick brown fox", "max_tokens": 1})
    tokens = plain.json()["tokens"]
    assert tokens and eos not in tokens
    assert special.json()["tokens"] == [eos, *tokens] and special.json()["count"] == len(tokens) + 1
    assert echoed.json()["usage"]["prompt_tokens"] == len(tokens)  # completions never add them
