"""Windows for rolling log-likelihood over texts longer than the model's context.

Windows of up to `max_len` tokens start every `stride` tokens; each window scores only the tokens the
previous one did not, so every token (after the first) is scored exactly once, with as much context as its
window gives it: at least `max_len - stride` tokens once past the first window. With `stride == max_len`
(plain chunks) a window's `score_from` is 0: its first token has no context in it, and scorers skip it, as
HF's chunked perplexity does.

Owns the window arithmetic only. The engine scores each window as an ordinary request with `score_from`;
`model_store.evaluate` uses it for perplexity. It lives in the store because `service` may import the
store's light modules while the store never imports `service`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    start: int  # first token of the window in the text
    end: int  # one past its last token
    score_from: int  # index within the window of the first token to score


def rolling_windows(num_tokens: int, max_len: int, stride: int) -> list[Window]:
    assert num_tokens >= 2 and 0 < stride <= max_len
    windows, scored_to = [], 1  # token 0 has no context to be scored with
    begin = 0
    while scored_to < num_tokens:
        end = min(begin + max_len, num_tokens)
        windows.append(Window(begin, end, scored_to - begin))
        scored_to = end
        begin += stride
    return windows
