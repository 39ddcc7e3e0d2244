"""The default model's tokenizer (GPT-2-style byte-level BPE) and the unigram baseline for its model card.

The tokenizer is trained on the training split only and saved the way HF expects a GPT-2 tokenizer:
tokenizer.json, vocab.json + merges.txt, tokenizer_config.json and special_tokens_map.json
(`GPT2TokenizerFast.from_pretrained(dir)` loads it). The baseline is what a model that ignores context
does: each held-out token scored by the training split's unigram distribution with add-one smoothing,
reported as perplexity per token and bits per UTF-8 byte, the same quantities `model_store eval` reports.
"""

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    from transformers import GPT2TokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    hf = GPT2TokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    hf.model_max_length = 1024
    hf.save_pretrained(str(out))  # tokenizer.json, tokenizer_config.json, special_tokens_map.json
    tokenizer.model.save(str(out))  # vocab.json, merges.txt


def unigram_baseline(tokenizer: Tokenizer, train_texts: list[str], heldout_text: str) -> dict:
    """Add-one-smoothed unigram model of the training tokens, scored on the held-out text's tokens."""
    counts: Counter[int] = Counter()
    for encoding in tokenizer.encode_batch(train_texts):
        counts.update(encoding.ids)
    vocab = tokenizer.get_vocab_size()
    total = sum(counts.values())
    heldout_ids = tokenizer.encode(heldout_text).ids
    nll = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in heldout_ids)
    num_bytes = len(heldout_text.encode("utf-8"))
    return {
        "perplexity": math.exp(nll / len(heldout_ids)),
        "bits_per_byte": nll / math.log(2) / num_bytes,
        "heldout_tokens": len(heldout_ids),
        "heldout_bytes": num_bytes,
        "train_tokens": total,
        "vocab_size": vocab,
    }
