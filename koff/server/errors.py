"""OpenAI-style errors: every failure answers ``{"error": {"message", "type", "param", "code"}}``.

The official clients read this body to build their exceptions, so malformed JSON, bad values,
unknown models and server faults all look the same to them.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("koff.server")

_TYPES = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error with an HTTP status, raised by handlers or sent from the worker thread."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def not_found(model: str, known: list[str]) -> APIError:
    return APIError(404, f"The model {model!r} does not exist; this server holds: {', '.join(known)}",
                    param="model", code="model_not_found")


def validation_error(err: RequestValidationError) -> APIError:
    """Malformed JSON is a 400 (the body is not a request at all); a bad value is a 422."""
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "The request body is not valid JSON.", code="invalid_json")
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(422, message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return APIError(err.status_code, str(err.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")  # the details (paths, values) go to the server's log, not to the client
        return APIError(500, f"internal error ({type(err).__name__}); the server's log has the details").response()
