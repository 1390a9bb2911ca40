"""What every request passes before routing: the API key (401), the body size limit (413) and the
body's deadline (408).

A plain ASGI middleware rather than a FastAPI dependency, so both checks come before the body is
parsed: a client without a key learns nothing about the validity of its JSON, and an oversized
body is refused before it is read in full.
"""

from __future__ import annotations

import asyncio
import json
import secrets

from koff.server.errors import APIError

OPEN_PATHS = ("/health",)


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout_s: float):
        self.app, self.api_key, self.max_body_bytes, self.body_timeout_s = app, api_key, max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            return await _send_error(send, APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                                    code="invalid_api_key"))
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _send_error(send, self._too_large())
        # Read the body here (it is small by construction) so a chunked upload is held to the limit too.
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                # "Connection: close": the rest of that body must not be read as the next request.
                return await _send_error(send, APIError(
                    408, f"The request body did not arrive within {self.body_timeout_s:g} s.", code="request_timeout"),
                    close=True)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _send_error(send, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            token = headers.get(b"x-api-key", b"").decode("latin-1")
        return secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body exceeds this server's limit of {self.max_body_bytes} bytes.",
                        code="request_too_large")


async def _send_error(send, error: APIError, close: bool = False) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})
