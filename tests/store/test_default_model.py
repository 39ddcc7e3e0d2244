"""The default model's data preparation, offline: the R data reader on hand-built serializations, the
corpus cleaning and split rules, the unigram baseline formula. (Fetching from Debian is not tested here:
tests never use the network.)"""

import gzip
import math
import struct
import zlib

import pytest
from tokenizers import Tokenizer

from model_store.default_model.corpus import Document, _austen_paragraphs, split
from model_store.default_model.rdata import RDataError, read_lazyload, unserialize
from model_store.default_model.tokenizer import EOS, train_tokenizer, unigram_baseline


def i32(*values):
    return b"".join(struct.pack(">i", v) for v in values)


def charsxp(text):
    if text is None:
        return i32(9, -1)
    data = text.encode()
    return i32(9 | (8 << 12), len(data)) + data  # UTF-8 flag in the level bits, as R writes it


def strsxp(values):
    return i32(16, len(values)) + b"".join(charsxp(v) for v in values)


def named_list(items):
    names_attr = i32(2 | (1 << 10)) + i32(1) + charsxp("names") + strsxp(list(items)) + i32(254)
    return i32(19 | (1 << 9), len(items)) + b"".join(items.values()) + names_attr


def serialized(body, version=3):
    header = b"X\n" + i32(version, 0x040201, 0x030500)
    return header + (i32(5) + b"UTF-8" if version == 3 else b"") + body


@pytest.mark.parametrize("version", [2, 3])
def test_unserialize_named_list_of_character_vectors(version):
    body = named_list({"emma": strsxp(["EMMA", "", None, "Caf\u00e9"]), "n": i32(13, 2) + i32(7, -3)})
    assert unserialize(serialized(body, version)) == {"emma": ["EMMA", "", None, "Caf\u00e9"], "n": [7, -3]}


def test_unserialize_refuses_what_it_cannot_read():
    with pytest.raises(RDataError, match="type 3 is not supported"):
        unserialize(serialized(i32(3)))  # a closure
    with pytest.raises(RDataError, match="not an XDR"):
        unserialize(b"A\n" + serialized(strsxp(["x"]))[2:])


def test_read_lazyload_follows_the_index(tmp_path):
    objects = {"emma": strsxp(["EMMA", "By Jane Austen"]), "persuasion": strsxp(["Persuasion"])}
    blob, index = b"", {}
    for name, body in objects.items():
        data = serialized(body)
        record = struct.pack(">I", len(data)) + zlib.compress(data)  # janeaustenr's layout: no type byte
        index[name] = i32(13, 2) + i32(len(blob), len(record))
        blob += record
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    rdx = serialized(named_list({"variables": named_list(index), "references": i32(254)}))
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(rdx))
    assert read_lazyload(tmp_path) == {"emma": ["EMMA", "By Jane Austen"], "persuasion": ["Persuasion"]}


def test_austen_lines_unwrap_into_paragraphs():
    lines = ["CHAPTER I", "", "", "Emma Woodhouse, _handsome_, clever,", "and rich.  She had", None, "", "End."]
    assert _austen_paragraphs(lines) == ["CHAPTER I", "Emma Woodhouse, handsome, clever, and rich. She had", "End."]


def test_split_holds_out_the_last_paragraphs_up_to_the_fraction():
    doc = Document("x/y", tuple("p" * n for n in (50, 20, 20, 5, 5)))  # 100 characters
    train, held = split(doc, 0.1)
    assert train.paragraphs == doc.paragraphs[:3] and held.paragraphs == doc.paragraphs[3:]
    assert split(doc, 0.1) == (train, held)  # deterministic
    train, held = split(Document("x/z", ("only one paragraph",)), 0.5)
    assert held is None and train.paragraphs == ("only one paragraph",)


def test_unigram_baseline_is_add_one_smoothed_unigram():
    tokenizer = train_tokenizer(["ab ab ab cd"] * 5, vocab_size=300)
    vocab = tokenizer.get_vocab_size()
    assert tokenizer.token_to_id(EOS) == 0 and isinstance(tokenizer, Tokenizer)
    train = ["ab ab ab cd"]
    counts = {}
    for t in tokenizer.encode(train[0]).ids:
        counts[t] = counts.get(t, 0) + 1
    held = "ab cd zz"
    ids = tokenizer.encode(held).ids
    nll = -sum(math.log((counts.get(t, 0) + 1) / (sum(counts.values()) + vocab)) for t in ids)
    result = unigram_baseline(tokenizer, train, held)
    assert result["perplexity"] == pytest.approx(math.exp(nll / len(ids)))
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / 8)
    assert result["heldout_tokens"] == len(ids) and result["train_tokens"] == sum(counts.values())
