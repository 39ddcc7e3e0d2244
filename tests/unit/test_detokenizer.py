"""Tests for `service.engine.detokenizer`: token bytes, incremental UTF-8 detokenization, stop strings.

Parity is checked against `tokenizers.Tokenizer.decode(ids, skip_special_tokens=True)` on the conftest's
small byte-level BPE tokenizer. Its vocab is tiny, so emoji and CJK outside its corpus are split into byte
tokens; tests that rely on that assert it, so they cannot pass vacuously. Not covered here: how the engine
wires these together, and real GPT-2 vocab files (none are downloaded in tests).
"""

import random

import pytest
from tokenizers import AddedToken, Tokenizer

from service.engine.detokenizer import IncrementalDetokenizer, StopChecker, TokenBytes

EOS = "<|endoftext|>"
FFFD = "\ufffd"
TEXTS = [
    "\U0001f600\U0001f44d\U0001f3fd",  # 😀👍🏽: 4-byte characters plus a skin-tone modifier
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",  # 日本語のテキスト
    "Cr\u00e8me br\u00fbl\u00e9e, \u00e5ngstr\u00f6m, Stra\u00dfe, \u0148\u0105\u0161",
    "mixed: caf\u00e9 \U0001f680 \u4f60\u597d tokens\n\tend",
]
CHAR_POOL = (
    list("abc xyz.,\n")
    + list("\u00e9\u00fc\u00df\u0148")
    + list("\u65e5\u672c\u8a9e")
    + [
        "\U0001f600",
        "\U0001f44d",
        "\U0001f3fd",
        "\U0001f680",
    ]
)


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def tb(tok) -> TokenBytes:
    return TokenBytes(tok)


def stream(tb, ids, prefix_ids=()) -> tuple[list[str], str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tb, prefix_ids)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush(), detok


def splits_a_character(tb, ids) -> bool:
    """True if some token boundary falls inside a UTF-8 character (the next token starts on a
    continuation byte)."""
    return any(tb(i)[:1] and 0x80 <= tb(i)[0] < 0xC0 for i in ids[1:])


# --- TokenBytes -------------------------------------------------------------------------------------


def test_every_byte_has_a_single_byte_token(tok, tb):
    # The trainer's initial alphabet is ByteLevel.alphabet(), so all 256 byte tokens exist; inverting the
    # GPT-2 map must give each a distinct single byte.
    alphabet = {c for c in tok.get_vocab() if len(c) == 1}
    got = {tb(tok.token_to_id(c)) for c in alphabet}
    assert len(alphabet) == 256
    assert got == {bytes([b]) for b in range(256)}


def test_each_token_matches_decode(tok, tb):
    # Single-token decode agrees wherever that token's bytes are valid UTF-8 on their own.
    for token_id in range(tok.get_vocab_size()):
        raw = tb(token_id)
        expected = tok.decode([token_id])
        assert raw.decode("utf-8", errors="replace") == expected, (token_id, raw, expected)


def test_special_tokens(tok, tb):
    eos = tok.token_to_id(EOS)
    assert tb(eos) == b""
    keep = TokenBytes(tok, skip_special=False)
    assert keep(eos) == EOS.encode()
    ids = tok.encode("hi").ids + [eos] + tok.encode(" there").ids
    assert "".join(keep(i).decode() for i in ids) == tok.decode(ids, skip_special_tokens=False)


def test_added_tokens_follow_decode(tokenizer_dir):
    # A non-special added token whose content is outside the byte map falls back to its own UTF-8,
    # one fully inside the map is inverted like any vocab string; a special one is skipped.
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.add_tokens([AddedToken("\u00e9\U0001f600x", special=False), AddedToken("\u0120foo", special=False)])
    tok.add_special_tokens(["<sp>"])
    tb = TokenBytes(tok)
    emoji, foo, sp = (tok.token_to_id(t) for t in ("\u00e9\U0001f600x", "\u0120foo", "<sp>"))
    assert tb(emoji) == "\u00e9\U0001f600x".encode()
    assert tb(foo) == b" foo"
    assert tb(sp) == b""
    ids = [foo, emoji, sp, tok.token_to_id("a")]
    deltas, tail, _ = stream(tb, ids)
    assert "".join(deltas) + tail == tok.decode(ids) == " foo\u00e9\U0001f600xa"


def test_unknown_ids_are_dropped_like_decode(tok, tb):
    beyond = tok.get_vocab_size() + 5
    assert tb(beyond) == b"" and tb(-1) == b""
    ids = tok.encode("ok").ids + [beyond]
    deltas, tail, _ = stream(tb, ids)
    assert "".join(deltas) + tail == tok.decode(ids) == "ok"


# --- IncrementalDetokenizer ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_text_streams_whole_characters(tok, tb, text):
    ids = tok.encode(text).ids
    assert splits_a_character(tb, ids), "test text must split a character across tokens"
    deltas, tail, detok = stream(tb, ids)
    assert all(FFFD not in d for d in deltas) and tail == ""
    assert "".join(deltas) == tok.decode(ids) == text
    assert detok.text == text
    # Decoding token by token on its own would have shown U+FFFD somewhere: the split is real.
    assert any(FFFD in tb(i).decode("utf-8", errors="replace") for i in ids)


def test_random_valid_text(tok, tb):
    rng = random.Random(0)
    split = 0
    for _ in range(200):
        text = "".join(rng.choices(CHAR_POOL, k=rng.randint(0, 30)))
        ids = tok.encode(text).ids
        split += splits_a_character(tb, ids)
        deltas, tail, _ = stream(tb, ids)
        assert all(isinstance(d, str) and FFFD not in d for d in deltas)
        assert "".join(deltas) + tail == tok.decode(ids) == text
    assert split > 100


def test_random_ids_match_decode(tok, tb):
    # Uniform random ids are mostly invalid UTF-8 (lone continuation bytes, truncated sequences,
    # surrogates, overlongs): Python's errors="replace" must agree with Rust's from_utf8_lossy.
    rng = random.Random(1)
    vocab = tok.get_vocab_size()
    invalid = 0
    for _ in range(500):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 25))]
        deltas, tail, detok = stream(tb, ids)
        expected = tok.decode(ids)
        invalid += FFFD in expected
        assert "".join(deltas) + tail == expected == detok.text
    assert invalid > 100


def test_random_byte_tokens_match_decode(tok, tb):
    # Sequences of single-byte tokens biased towards UTF-8 lead/continuation bytes hit the decoder's
    # edge cases (truncated at the end -> the flush path) far more often than uniform ids do.
    rng = random.Random(2)
    by_byte = {tb(i): i for i in range(tok.get_vocab_size()) if len(tb(i)) == 1}
    interesting = [0x41, 0x80, 0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xFF]
    truncated = 0
    for _ in range(500):
        raw = bytes(rng.choice(interesting) for _ in range(rng.randint(1, 12)))
        ids = [by_byte[bytes([b])] for b in raw]
        deltas, tail, _ = stream(tb, ids)
        truncated += tail != ""
        assert "".join(deltas) + tail == tok.decode(ids)
    assert truncated > 20


def test_flush_replaces_unfinished_character(tok, tb):
    ids = tok.encode("ok \U0001f600").ids
    assert splits_a_character(tb, ids)
    deltas, tail, detok = stream(tb, ids[:-1])
    assert "".join(deltas) == "ok " and tail == FFFD
    assert detok.text == "ok " + FFFD == tok.decode(ids[:-1])
    assert detok.flush() == ""  # nothing left to flush twice


def test_prefix_ids_carry_an_unfinished_character(tok, tb):
    # Resuming mid-stream: the prefix's completed text is not repeated, but a character it left
    # unfinished comes out whole.
    for text in TEXTS:
        ids = tok.encode(text).ids
        for k in range(len(ids) + 1):
            before, _, _ = stream(tb, ids[:k])  # no flush: the stream continues
            after, tail, detok = stream(tb, ids[k:], prefix_ids=ids[:k])
            assert "".join(before) + "".join(after) + tail == text
            assert detok.text == "".join(after) + tail


def test_add_costs_one_lookup_per_token(tok, tb):
    # O(new bytes): each add looks up only its own token (no re-decoding of the sequence so far).
    calls = []

    def counting(token_id: int) -> bytes:
        calls.append(token_id)
        return tb(token_id)

    ids = tok.encode(" ".join(TEXTS) * 20).ids
    detok = IncrementalDetokenizer(counting)
    for n, token_id in enumerate(ids, 1):
        detok.add(token_id)
        assert len(calls) == n
    detok.flush()
    assert calls == ids


# --- StopChecker ---------------------------------------------------------------------------------------


def run_stop(stops, deltas) -> tuple[list[str], bool, str]:
    checker = StopChecker(stops)
    out, stopped = [], False
    for d in deltas:
        piece, stopped = checker.push(d)
        out.append(piece)
        if stopped:
            break
    return out, stopped, checker.flush()


def test_stop_split_across_deltas():
    out, stopped, tail = run_stop(["STOP"], ["hello S", "T", "O", "P and more"])
    assert out == ["hello ", "", "", ""] and stopped and tail == ""


def test_stop_text_before_is_emitted_in_full():
    out, stopped, _ = run_stop(["\n\n"], ["line one\nline", " two\n", "\nnext"])
    assert "".join(out) == "line one\nline two" and stopped


def test_partial_match_released_on_more_text():
    out, stopped, tail = run_stop(["STOP"], ["a ST", "O", "X b"])
    assert out == ["a ", "", "STOX b"] and not stopped and tail == ""


def test_partial_match_released_at_flush():
    out, stopped, tail = run_stop(["STOP"], ["a ST", "O"])
    assert out == ["a ", ""] and not stopped and tail == "STO"


def test_overlapping_partial_keeps_the_longest():
    # "xaa" ends with both "a" and "aa", prefixes of "aab"; holding only the shorter one would emit an
    # "a" that turns out to start the stop string.
    out, stopped, _ = run_stop(["aab"], ["xa", "a", "b tail"])
    assert out == ["x", "", ""] and stopped
    out, stopped, _ = run_stop(["abac"], ["xab", "ab", "ac tail"])
    assert "".join(out) == "xab" and stopped


def test_earliest_match_wins():
    out, stopped, _ = run_stop(["world", "lo w"], ["hello world"])
    assert out == ["hel"] and stopped
    out, stopped, _ = run_stop(["lo w", "world"], ["hel", "lo", " wor", "ld"])
    assert "".join(out) == "hel" and stopped


def test_stop_that_completes_first_wins_across_pushes():
    # Documented semantics: a stop string ends the stream as soon as it completes. When one stop string
    # contains another, the contained one can complete first even though the longer one starts earlier.
    out, stopped, _ = run_stop(["abcd", "c"], ["a", "b", "c", "d"])
    assert "".join(out) == "ab" and stopped
    out, stopped, _ = run_stop(["abcd", "c"], ["abcd"])
    assert "".join(out) == "" and stopped


def test_no_stops_pass_through():
    checker = StopChecker([])
    for d in ["a", "ST", "", "\U0001f600 x"]:
        assert checker.push(d) == (d, False)
    assert checker.flush() == ""
    assert StopChecker([""]).push("abc") == ("abc", False)  # empty stop strings are ignored


def test_stop_at_very_start():
    assert run_stop(["Hello"], ["Hello world"]) == ([""], True, "")
    out, stopped, tail = run_stop(["Hello"], list("Hello world"))
    assert out == [""] * 5 and stopped and tail == ""


def test_after_stop_nothing_more():
    checker = StopChecker(["x"])
    assert checker.push("abxcd") == ("ab", True)
    assert checker.push("more") == ("", True)
    assert checker.flush() == ""


def test_random_chunking_matches_reference():
    # Stop strings chosen so none contains another: then the result must not depend on how the text is
    # cut into deltas. Also checks the stream never shows a partial stop string at the current end.
    rng = random.Random(3)
    stops = ["aab", "ba c", "cc", "\u00e9\U0001f600"]
    alphabet = "abc \u00e9\U0001f600"
    hits = 0
    for _ in range(400):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        checker, shown, seen, stopped = StopChecker(stops), "", "", False
        for d in deltas:
            piece, stopped = checker.push(d)
            shown, seen = shown + piece, seen + d
            if stopped:
                break
            for s in stops:
                for k in range(1, len(s)):
                    if seen.endswith(s[:k]):
                        assert len(shown) <= len(seen) - k, (seen, shown, s)
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        hits += bool(found)
        expected = text[: min(found)] if found else text
        assert stopped == bool(found)
        assert shown + checker.flush() == expected, (text, deltas)
    assert 100 < hits < 350


def test_detokenizer_and_stop_together(tok, tb):
    # A stop string made of a split emoji: it is matched on text, so no half character ever shows.
    text = "go \U0001f44d\U0001f3fd then \U0001f600 never shown"
    ids = tok.encode(text).ids
    assert splits_a_character(tb, ids)
    detok, checker, out = IncrementalDetokenizer(tb), StopChecker(["\U0001f600"]), []
    for token_id in ids:
        piece, stopped = checker.push(detok.add(token_id))
        out.append(piece)
        if stopped:
            break
    assert stopped and "".join(out) == "go \U0001f44d\U0001f3fd then "
    assert all(FFFD not in p for p in out)
