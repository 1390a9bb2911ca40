"""Connection limits: what keeps idle, slow or too many clients from holding the server.

uvicorn closes a keep-alive connection that stays silent 5 s after a response, and refuses headers
over 16 KiB, but it waits for ever for the first request of a new connection, for the rest of
half-sent headers, and for the rest of a half-sent body, and it accepts every connection it is
offered until the process runs out of file descriptors. Each of those is a slow-client attack
(slowloris) that an API key cannot stop, since the key is read only once the headers are complete.
The limits here are those servers in front of APIs use (nginx's ``client_header_timeout`` and
``client_body_timeout``, Apache's ``RequestReadTimeout``, a cap on open connections):

* a connection must deliver complete request headers within ``header_timeout_s`` of opening (or of
  its previous response), or it is closed;
* a request body must arrive whole within ``body_timeout_s`` of its headers, or it gets 408;
* beyond ``max_connections`` open connections, a new one is closed at once.

A request being generated is never timed out by these: they bound reading a request, not answering it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("koff.server")

# Descriptors the process needs besides its connections (model files, logs, the listening socket).
SPARE_DESCRIPTORS = 64


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000

    def __post_init__(self):
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0 or self.max_connections < 1:
            raise ValueError("connection timeouts and the connection cap must be positive")

    def protocol(self) -> type[H11Protocol]:
        """uvicorn's h11 protocol held to these limits (pass it as ``uvicorn.Config(http=...)``)."""
        return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": self})

    def fit_descriptors(self) -> "ConnectionLimits":
        """These limits, with the process's open-file limit raised to hold ``max_connections`` where
        the hard limit allows, else the cap lowered to what it allows (with a warning)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = self.max_connections + SPARE_DESCRIPTORS
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return self
        if hard == resource.RLIM_INFINITY or hard >= needed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            return self
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        cap = max(1, hard - SPARE_DESCRIPTORS)
        log.warning("the open-file limit (%d) holds %d connections, not %d: serving at most %d", hard, cap,
                    self.max_connections, cap)
        return ConnectionLimits(self.header_timeout_s, self.body_timeout_s, cap)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections over the cap and those that do not send their
    request headers in time."""

    limits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:
            transport.close()
            return
        self._await_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._cancel_deadline()
        self._header_deadline = self.loop.call_later(self.limits.header_timeout_s, self._headers_overdue)

    def _cancel_deadline(self) -> None:
        if getattr(self, "_header_deadline", None) is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_overdue(self) -> None:
        self._header_deadline = None
        # IDLE: h11 has not yet parsed a complete request line and headers on this connection.
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()
