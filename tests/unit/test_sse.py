"""Server-sent event framing: one event is one line for every client's line splitter, whatever the text."""

import json

from service.api.streams import sse

# Every character str.splitlines (and so httpx's iter_lines) breaks a line at, besides the frame's own "\n\n".
BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def test_an_event_stays_one_line_whatever_the_generated_text():
    body = {"choices": [{"text": f"a{BREAKS}b", "logprobs": None}]}
    frame = sse(body).decode()
    assert frame.endswith("\n\n")
    lines = frame.splitlines()
    assert lines == [lines[0], ""] and lines[0].startswith("data: ")
    assert json.loads(lines[0].removeprefix("data: ")) == body  # the text arrives whole
    assert sse("[DONE]") == b"data: [DONE]\n\n"
