"""uvicorn's HTTP/1.1 protocol (httptools, i.e. llhttp) with the limits `dmat serve` keeps on every connection.

uvicorn and llhttp do the parsing; this subclass adds what they leave open:
- The request head (request line and headers) may not exceed MAX_HEAD_BYTES: llhttp has no limit
  of its own, so one endless header would grow without bound. 431, then the connection closes.
- A request head must be complete within HEAD_TIMEOUT_S of the connection opening or of the
  previous answer: uvicorn times out only silent keep-alive connections, so a fresh connection
  that sends nothing, or a head trickling in byte by byte, would be held for ever. Closed unanswered.
- A client that half-closes after its request (shutdown(SHUT_WR)) still gets its answer, as HTTP
  allows; uvicorn would close at once. A body cut short by the half-close ends there, and the app
  answers 400 naming how many bytes came.
- A malformed request is answered in the server's JSON error shape with llhttp's reason, where
  uvicorn answers plain text without one.
Only overrides of uvicorn's protocol callbacks (uvicorn is pinned in the requirements; the serving
tests exercise each override).
"""

from __future__ import annotations

import asyncio
import json
import logging

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

logger = logging.getLogger("dmat.serve")

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._unparsed_head_bytes = 0  # received while a head is incomplete (the callbacks see only whole headers)
        self._head_bytes = 0  # of the current head, counted by the parser callbacks
        self._reading_head = True
        self._refusal: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # As uvicorn's, but a parser error is answered with its reason, and the head's size is bounded.
        self._unset_keepalive_if_required()
        if self._reading_head:
            self._unparsed_head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no WebSocket endpoints: the request is answered as plain HTTP
        except httptools.HttpParserError as err:
            self._refuse(*(self._refusal or (400, f"malformed HTTP request: {err}")))
            return
        if self._reading_head and self._unparsed_head_bytes > MAX_HEAD_BYTES:
            self._refuse(*_HEAD_TOO_LARGE)

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head, self._unparsed_head_bytes, self._head_bytes = True, 0, 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def eof_received(self) -> bool | None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return None  # nothing left to answer: close
        cycle.keep_alive = False  # close once the answer is out
        cycle.more_body = False  # a body still incomplete ends here
        cycle.message_event.set()
        return True  # keep the sending side open for the answer

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refusal = _HEAD_TOO_LARGE
            raise ValueError(_HEAD_TOO_LARGE[1])  # httptools turns it into HttpParserCallbackError

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that never reaches the app, in the JSON error shape, and close the connection."""
        client = self.client[0] if self.client else "?"
        logger.info("%s: refused request: %d %s", client, status, message)
        body = json.dumps({"error": message}).encode("utf-8")
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend([b"content-type: application/json; charset=utf-8\r\n",
                     b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                     b"connection: close\r\n\r\n"])
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        answering = self.cycle is not None and not self.cycle.response_complete
        if not answering and not self.transport.is_closing():
            self.transport.close()


_HEAD_TOO_LARGE = (431, f"header line too long or too many headers: the request head exceeds {MAX_HEAD_BYTES} "
                        "bytes")
