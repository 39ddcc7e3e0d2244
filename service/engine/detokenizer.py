"""Streaming text out of generated token ids: bytes per token, incremental UTF-8, and stop strings.

Owns: the token id -> raw bytes table for GPT-2 byte-level BPE tokenizers (`TokenBytes`), how a single
token is shown in logprobs (`TokenStrings`), the per-request incremental detokenizer that never emits half a
character (`IncrementalDetokenizer`), and stop-string matching over streamed text with hold-back of possible
partial matches (`StopChecker`).

Does not own: tokenizer loading (the model runtime's job), stop *token ids* and EOS handling (the engine
decides when a sequence ends, in `Engine._finish_reason`; this module only turns ids into text), or
validating user input such as empty stop strings (the API layer's job; here they are ignored).

Parity target: for ids inside the vocabulary, the deltas of `IncrementalDetokenizer` joined with its `flush()`
equal `tokenizer.decode(ids, skip_special_tokens=True)` exactly, including U+FFFD for invalid bytes.
"""

import codecs
from collections.abc import Sequence
from functools import cache

import tokenizers


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: the printable stand-in character for each byte -> that byte.

    GPT-2 keeps printable Latin-1 bytes as themselves and shifts the rest (controls, space, ...) to
    U+0100 onwards, so that every vocab entry is a printable string.
    """
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    table = {chr(b): b for b in kept}
    shifted = sorted(set(range(256)) - set(kept))
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def _vocab_string_to_bytes(token: str) -> bytes:
    """Raw bytes of one vocab entry, the way HF's ByteLevel decoder computes them.

    Like the Rust decoder, a token with any character outside the byte map (e.g. an added token such as
    "<sp>😀") falls back to its own UTF-8 as a whole, rather than mixing mapped and unmapped characters.
    """
    table = _unicode_to_byte()
    if all(c in table for c in token):
        return bytes(table[c] for c in token)
    return token.encode("utf-8")


class TokenBytes:
    """Maps token id -> raw bytes for a byte-level BPE `tokenizers.Tokenizer`. Built once per model.

    Regular vocab strings are inverted through GPT-2's byte map; added tokens go through the same rule
    (which is what `tokenizer.decode` does, and for ASCII content like "<|endoftext|>" yields its UTF-8).
    Special tokens map to b"" when `skip_special` (mirrors `decode(..., skip_special_tokens=True)`).
    Ids the tokenizer has no token for map to b"", as `tokenizer.decode` silently drops them.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, skip_special: bool = True):
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # A flat list, because lookup happens once per generated token on the hot path.
        self._table: list[bytes] = [b""] * (max(vocab.values(), default=-1) + 1)
        for token, token_id in vocab.items():
            self._table[token_id] = _vocab_string_to_bytes(token)
        if skip_special:
            for token_id, added in tokenizer.get_added_tokens_decoder().items():
                if added.special:
                    self._table[token_id] = b""

    def __len__(self) -> int:
        return len(self._table)

    def __call__(self, token_id: int) -> bytes:
        if 0 <= token_id < len(self._table):
            return self._table[token_id]
        return b""


class TokenStrings:
    """How a token is shown in logprobs: its text, or `bytes:\\xNN...` when it is not valid UTF-8 alone
    (a piece of a multi-byte character), as vLLM does. Built once per model."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._bytes = TokenBytes(tokenizer, skip_special=False)

    def raw(self, token_id: int) -> bytes:
        return self._bytes(token_id)

    def __call__(self, token_id: int) -> str:
        raw = self._bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class IncrementalDetokenizer:
    """Per-request: feed token ids one at a time, get text deltas that never contain half a character.

    Byte-level BPE splits multi-byte characters (emoji, CJK) across tokens, so decoding each token on its
    own would show U+FFFD mid-stream. An incremental UTF-8 decoder holds back an unfinished character's
    bytes until the token that completes it arrives; each `add` costs O(bytes of that token).
    Invalid bytes become U+FFFD as soon as they are known to be invalid, matching Rust's
    `String::from_utf8_lossy` (one U+FFFD per maximal invalid subpart, like Python's errors="replace").
    """

    def __init__(self, token_bytes: TokenBytes, prefix_ids: Sequence[int] = ()):
        """`prefix_ids`: ids whose text was already delivered (e.g. when resuming mid-stream). Only their
        trailing unfinished bytes are kept, so a character split across the boundary comes out whole in
        the first delta; their completed text is not part of `text`.
        """
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []
        self._decoder.decode(b"".join(token_bytes(i) for i in prefix_ids))

    def add(self, token_id: int) -> str:
        """Returns the text this token completes; "" while a character is still unfinished."""
        return self._emit(self._decoder.decode(self._token_bytes(token_id)))

    def flush(self) -> str:
        """At finish: the held-back bytes of an unfinished character, as U+FFFD (or "" if none)."""
        return self._emit(self._decoder.decode(b"", final=True))

    @property
    def text(self) -> str:
        """All text emitted so far (by `add` and `flush`)."""
        if len(self._pieces) > 1:
            # Collapse so repeated reads stay cheap on long generations.
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _emit(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
        return delta


class StopChecker:
    """Stop strings over streamed text, including ones spanning token boundaries.

    Trims the stop string and everything after it, and holds back the tail that could still become a stop
    string, so a stream never shows a partial stop string. Among several stop strings the earliest match
    in the text wins. Empty stop strings are ignored (they would match before any text).

    Caller protocol at finish without a stop: `push` the detokenizer's `flush()` first, then call `flush()`
    here for the held-back tail.
    """

    def __init__(self, stop: Sequence[str]):
        self._stops = tuple(dict.fromkeys(s for s in stop if s))
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, stopped?). Once stopped, the text ends right before the stop
        string and every later push returns ("", True)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return delta, False
        buf = self._held + delta
        # Emitted text never holds a stop string, nor the start of one that reaches into `buf` (that start
        # would still be held back), so searching `buf` alone finds the earliest match.
        cut = self._earliest_match(buf)
        if cut is not None:
            self._held, self.stopped = "", True
            return buf[:cut], True
        keep = self._partial_tail_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """At finish without a stop: the held-back tail (it can no longer become a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _earliest_match(self, buf: str) -> int | None:
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _partial_tail_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string.

        Longest, not any: a shorter partial match could hide an earlier-starting one that still completes.
        """
        longest = max(len(s) for s in self._stops) - 1
        for k in range(min(longest, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
