"""One HTTP/1.1 exchange over a raw socket (`exchange`), for requests no HTTP client would send: malformed
framing, huge headers, bodies that drip in; and reading the answer back (`json_body`)."""

import json
import select
import socket
import time


def exchange(
    url: str, parts: list[bytes], delay: float = 0.0, read_timeout: float = 20.0
) -> tuple[int | None, bytes, bool, float]:
    """Send `parts` (sleeping `delay` between them, stopping early if the server answers), then read one
    response: until its Content-Length is complete, the server closes, or `read_timeout`. Returns (status or None, the
    response's bytes, whether the server closed the connection, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    data, closed = b"", False
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        try:
            for part in parts:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered (or closed): sending more would only earn a reset
                sock.sendall(part)
                time.sleep(delay)
        except OSError:
            pass  # the server hung up on us mid-send: that is an answer too
        try:
            while not complete(data):
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
            if not closed and b"\r\nconnection: close\r\n" in data.partition(b"\r\n\r\n")[0].lower() + b"\r\n":
                closed = sock.recv(1) == b""  # the server said it closes: it must have
        except TimeoutError:
            pass
        except OSError:
            closed = True
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, data, closed, time.monotonic() - start


def complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if sep and line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def json_body(data: bytes) -> dict:
    """The first response's JSON body (a second response may follow it in `data`)."""
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
    )
    return json.loads(body[:length])
