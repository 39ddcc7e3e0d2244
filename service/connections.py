"""A deadline on each HTTP request's arrival, at the connection level, which uvicorn does not have.

uvicorn (h11) closes a connection only when it has been idle for `timeout_keep_alive` after a response,
and any byte received cancels that timer. So a client that opens a connection and sends nothing, sends
its headers a byte at a time, or, after the app has answered early (413, 401, 404, or a GET with a body),
trickles the rest of a declared body, holds the connection, and its buffers, for as long as it likes. The
edge middleware (service/app.py) cannot help: the app sees a request only once its headers are complete,
and nothing of it after the response.

`DeadlineH11Protocol` closes a connection when a request has not arrived in full, headers and body, within
`REQUEST_TIMEOUT_S` of its first byte (or of the connection opening). A request received in full is never
cut: the deadline ends there, however long the response takes. `python -m service` serves with it.
"""

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# The edge answers a body slower than BODY_TIMEOUT_S (30 s after the headers) with 408; this is the backstop
# for what it cannot see, with 10 s for the headers.
REQUEST_TIMEOUT_S = 40.0


class DeadlineH11Protocol(H11Protocol):
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._arm()
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # received in full (or closing)
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(REQUEST_TIMEOUT_S, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()  # an app still reading the body gets http.disconnect
