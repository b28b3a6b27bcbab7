"""What wraps every request of the app: the request id, the body limit, the JSON log line, the
response counter (:class:`Envelope`), and errors as one sentence of JSON (:func:`install_error_handlers`)."""

from __future__ import annotations

import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from oneword.serve.uploads import Rejected

logger = logging.getLogger("oneword.serve")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Rejected)
    async def rejected(request: Request, err: Rejected) -> JSONResponse:
        return JSONResponse({"detail": err.message}, err.status, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(err.detail)}, err.status_code, getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "header", "path"))
        message = f"{where or 'request'}: {first.get('msg', 'invalid')}"
        more = len(err.errors()) - 1
        return JSONResponse({"detail": message + (f" (and {more} more problems)" if more > 0 else "")}, 422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", "?")
        logger.exception("unexpected error (request %s)", rid)
        return JSONResponse({"detail": f"internal error; quote request id {rid} to the operator"}, 500)


class Envelope:
    """Pure ASGI middleware around every request: a request id (the caller's ``X-Request-ID`` if
    sane), the body limit (413 before the app reads anything), responses counted by code, and one
    JSON log line per request."""

    def __init__(self, app, service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        rid = (
            given
            if 0 < len(given) <= 64 and all(c.isalnum() or c in "-_." for c in given)
            else uuid.uuid4().hex
        )
        scope.setdefault("state", {})["request_id"] = rid
        t0, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        limit = self.service.settings.max_request_bytes
        body_receive = receive
        if scope["method"] in ("POST", "PUT", "PATCH"):
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                await _too_large(sending, limit)
                self._log(scope, rid, 413, t0)
                return
            chunks, size, more = [], 0, True
            while more:  # read the body up to the limit before the app sees any of it
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > limit:
                    await _too_large(sending, limit)
                    self._log(scope, rid, 413, t0)
                    return
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def body_receive():
                return replay.pop() if replay else await receive()

        try:
            await self.app(scope, body_receive, sending)
        finally:
            self._log(scope, rid, status[0], t0)

    def _log(self, scope, rid: str, status: int, t0: float) -> None:
        self.service.metrics.responses.labels(str(status)).inc()
        logger.info(
            json.dumps(
                {
                    "event": "request",
                    "request_id": rid,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "ms": round((time.perf_counter() - t0) * 1000, 1),
                    "tenant": scope.get("state", {}).get("tenant"),
                }
            )
        )


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"detail": f"the request is larger than the server's limit of {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
