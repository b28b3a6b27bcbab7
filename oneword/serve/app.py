"""The HTTP API of ``ti serve`` (FastAPI). Routes are thin: the work is in :class:`Service`.

Every route that touches a job or a word resolves the caller's tenant first (:func:`tenant`), and
every store read takes it, so another tenant's job, word, file or event stream is a 404, as is one
that does not exist.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import queue
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from oneword.serve import events as ev
from oneword.serve.auth import LOCAL_TENANT
from oneword.serve.middleware import Envelope, install_error_handlers
from oneword.serve.prompts import INTERNAL_PREFIX, words_in
from oneword.serve.records import Busy, Conflict
from oneword.serve.schemas import (
    ErrorBody,
    ImageOut,
    ImageRequest,
    ImagesOut,
    JobList,
    JobOut,
    Layout,
    WordList,
    WordOut,
    job_out,
    word_out,
)
from oneword.serve.service import Service
from oneword.serve.uploads import Rejected, check_uploads

logger = logging.getLogger("oneword.serve")

STATIC = Path(__file__).resolve().parent / "static"
"""The web page: plain HTML, CSS and JavaScript shipped in the package (no build step)."""

_DESCRIBED = {
    401: "No API key, or an unknown one.",
    404: "No such job or word among yours.",
    409: "An Idempotency-Key reused with another body, or a token you already use.",
    413: "A file or the request is too large (bytes or pixels).",
    415: "A file is not an image.",
    422: "A field is missing or out of range, or an image is corrupt.",
    429: "Too much work waiting; retry after the Retry-After header's seconds.",
    503: "The server is stopping.",
}


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorBody, "description": _DESCRIBED[c]} for c in codes}


_bearer = HTTPBearer(auto_error=False, description="An API key of the server's keys file.")


def tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The caller's tenant: the owner of the Bearer key (401 without a known one), or the one
    local tenant of a server without keys."""
    service: Service = request.app.state.service
    if service.keys is None:
        name = LOCAL_TENANT
    else:
        name = service.keys.tenant(credentials.credentials if credentials else None)
        if name is None:
            raise Rejected(
                401, "send a valid API key as 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"}
            )
    request.state.tenant = name
    return name


Tenant = Annotated[str, Depends(tenant)]


def create_app(service: Service) -> FastAPI:
    """The app for ``service``; its lifespan starts the worker and, at shutdown, drains it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        await run_in_threadpool(service.close)

    app = FastAPI(
        title="oneword",
        version="1",
        summary="Learn a word for a concept from a few photos, then draw it in any prompt.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(Envelope, service=service)

    def found(item, what: str):
        if item is None:
            raise Rejected(404, f"no such {what} among yours")
        return item

    def job_view(job) -> JobOut:
        latest = service.hub.latest(job.id)
        return job_out(
            job,
            service.store.word_of_job(job.id),
            service.store.queue_position(job),
            service.eta(job, latest.data["step"] if latest and job.state == "running" else job.step),
            latest.data if latest else None,
        )

    # ----------------------------------------------------------------- words
    @app.post(
        "/v1/words",
        status_code=202,
        response_model=JobOut,
        responses=_errors(401, 409, 413, 415, 422, 429, 503),
        summary="Learn a word from 1-8 photos (3-5 work best)",
    )
    async def create_word(
        request: Request,
        who: Tenant,
        images: Annotated[list[UploadFile], File(description="Photos of the concept.")],
        token: Annotated[
            str | None, Form(description="The word's token, e.g. <my-cat> (default: made up).")
        ] = None,
        init: Annotated[str | None, Form(description="Initializer word (default: chosen zero-shot).")] = None,
        refine: Annotated[
            int | None, Form(description="Refinement steps (default and maximum: the server's).")
        ] = None,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
    ) -> JSONResponse:
        service.refuse_if_draining()
        settings = service.settings
        files = [(f.filename or f"image {i + 1}", await f.read()) for i, f in enumerate(images)]
        steps = settings.refine if refine is None else refine
        if not 0 <= steps <= settings.max_refine:
            raise Rejected(422, f"refine must be between 0 and {settings.max_refine}, got {steps}")
        if token is not None:
            service.check_token(token)
        if init is not None:
            service.check_init(init)
        uploads = await run_in_threadpool(check_uploads, files, settings)
        body = json.dumps([[u.sha256 for u in uploads], token, init, steps]).encode()
        try:
            job, _ = await run_in_threadpool(
                service.store.create_job,
                who,
                token or service.new_token(),
                init,
                steps,
                [(u.sha256, u.data) for u in uploads],
                idempotency_key,
                hashlib.sha256(body).hexdigest(),
                settings.max_queue,
                settings.max_per_key,
            )
        except Conflict as err:
            raise Rejected(409, str(err)) from None
        except Busy as err:
            raise Rejected(429, str(err), {"Retry-After": str(service.retry_after(err.queued))}) from None
        service.worker.notify()
        out = job_view(job)
        return JSONResponse(out.model_dump(), 202, {"Location": out.url})

    @app.get("/v1/words", response_model=WordList, responses=_errors(401))
    def list_words(who: Tenant) -> WordList:
        return WordList(words=[word_out(w) for w in service.store.words(who)])

    @app.get("/v1/words/{word_id}", response_model=WordOut, responses=_errors(401, 404))
    def get_word(word_id: str, who: Tenant) -> WordOut:
        return word_out(found(service.store.word(word_id, who), "word"))

    @app.get(
        "/v1/words/{word_id}/file",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}, "description": "The safetensors file."},
                   **_errors(401, 404, 422)},
        summary="The word's file, as ti invert writes it",
    )  # fmt: skip
    def word_file(word_id: str, who: Tenant, layout: Layout = "diffusers") -> Response:
        from oneword.inversion.runfolder import safe_file_stem

        word = found(service.store.word(word_id, who), "word")
        if layout not in word.files:
            raise Rejected(404, f"this word has no {layout} file (diffusers_2 exists for SDXL words only)")
        name = {"diffusers": "learned_embeds.safetensors", "diffusers_2": "learned_embeds_2.safetensors"}.get(
            layout, f"{safe_file_stem(word.token)}.safetensors"
        )
        return Response(
            service.store.blobs.get(word.files[layout]),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @app.delete("/v1/words/{word_id}", status_code=204, response_class=Response, responses=_errors(401, 404))
    def delete_word(word_id: str, who: Tenant) -> Response:
        word = found(service.store.delete_word(who, word_id), "word")
        service.worker.notify(cancel=word.job_id)
        return Response(status_code=204)

    # ----------------------------------------------------------------- jobs
    @app.get("/v1/jobs", response_model=JobList, responses=_errors(401))
    def list_jobs(who: Tenant) -> JobList:
        return JobList(jobs=[job_view(j) for j in service.store.jobs(who)])

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses=_errors(401, 404))
    def get_job(job_id: str, who: Tenant) -> JobOut:
        return job_view(found(service.store.job(job_id, who), "job"))

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202, response_model=JobOut, responses=_errors(401, 404))
    def cancel_job(job_id: str, who: Tenant) -> JobOut:
        job = found(service.store.request_cancel(who, job_id), "job")
        service.worker.notify(cancel=job.id)
        return job_view(job)

    @app.get(
        "/v1/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."},
                   **_errors(401, 404)},
        summary="Progress as server-sent events, resumable with Last-Event-ID",
    )  # fmt: skip
    async def job_events(
        job_id: str,
        request: Request,
        who: Tenant,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
        after: Annotated[
            int | None, Query(ge=0, lt=2**31, description="Last-Event-ID for clients that cannot set headers")
        ] = None,
    ) -> StreamingResponse:
        job = found(await run_in_threadpool(service.store.job, job_id, who), "job")
        try:
            last = int(last_event_id) if last_event_id else (after or 0)
        except ValueError:
            raise Rejected(422, "Last-Event-ID must be an event id (a whole number)") from None
        return StreamingResponse(_stream(service, job, last, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    # ----------------------------------------------------------------- images
    @app.post(
        "/v1/images", response_model=ImagesOut, responses=_errors(401, 422, 429, 503), summary="Draw images"
    )
    async def create_images(body: ImageRequest, who: Tenant) -> ImagesOut:
        from oneword.serve.drawing import GenerationRequest

        service.refuse_if_draining()
        settings = service.settings
        if body.n > settings.max_images or body.steps > settings.max_sample_steps:
            raise Rejected(
                422, f"n is at most {settings.max_images} and steps at most {settings.max_sample_steps}"
            )
        if INTERNAL_PREFIX in (body.prompt + body.negative_prompt).lower():
            raise Rejected(422, f"{INTERNAL_PREFIX!r} is reserved for the server's own tokens")
        mine = await run_in_threadpool(service.store.words, who)
        by_token = {w.token: w for w in mine}
        used = [by_token[t] for t in words_in(body.prompt + "\n" + body.negative_prompt, list(by_token))]
        vectors = {w.token: await run_in_threadpool(service.vectors, w) for w in used}
        request = GenerationRequest(
            body.prompt, body.negative_prompt, body.n, body.steps, body.guidance, body.seed, vectors,
            service.facts["resolution"],
        )  # fmt: skip
        t0 = time.perf_counter()
        try:
            future = service.worker.submit(request)
        except queue.Full:
            raise Rejected(429, "too many image requests wait; retry shortly", {"Retry-After": "2"}) from None
        try:
            drawn = await asyncio.wrap_future(future)
        except queue.Full:  # a worker replica elsewhere is full
            raise Rejected(429, "too many image requests wait; retry shortly", {"Retry-After": "2"}) from None
        except RuntimeError as err:
            raise Rejected(503, f"{err}; retry in a moment", {"Retry-After": "5"}) from None
        images = [ImageOut(seed=seed, png_base64=_png(image, body, seed)) for seed, image in drawn]
        return ImagesOut(images=images, words=[w.id for w in used], seconds=time.perf_counter() - t0)

    # ----------------------------------------------------------------- the page
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ----------------------------------------------------------------- operations
    @app.get("/healthz", summary="Alive")
    def healthz() -> dict:
        return {"status": "alive"}

    @app.get(
        "/readyz",
        summary="Ready for work",
        responses={503: {"description": "Not ready; the reasons say why."}},
    )
    def readyz() -> JSONResponse:
        why = service.readiness()
        return JSONResponse({"ready": not why, "reasons": why, **service.facts}, 503 if why else 200)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    install_error_handlers(app)
    return app


def _png(image, body: ImageRequest, seed: int) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt), ("seed", str(seed)),
                       ("steps", str(body.steps)), ("guidance", str(body.guidance))):  # fmt: skip
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


async def _stream(service: Service, job, last: int, request: Request):
    """The job's events after ``last``: those known now, then new ones until it ends. Progress
    comes from this process's worker; state changes are also read from the store every
    :data:`POLL_SECONDS`, so a stream on one replica follows a job another replica refines."""
    hub = service.hub
    subscription = hub.subscribe(job.id)

    async def from_store() -> tuple[list[ev.Event], bool]:
        row = await run_in_threadpool(service.store.job, job.id)
        word = await run_in_threadpool(service.store.word_of_job, job.id)
        return ev.state_events(row, word), row.state in ("succeeded", "failed", "canceled")

    try:
        known, ended = await from_store()
        known = sorted({e.id: e for e in known + hub.progress(job.id)}.values(), key=lambda e: e.id)
        for event in known:
            if event.id > last:
                last = event.id
                yield event.encode()
        quiet = 0.0
        while not ended and not hub.closed:
            try:
                event = await asyncio.wait_for(subscription.get(), POLL_SECONDS)
            except asyncio.TimeoutError:
                events, ended = await from_store()
                for event in events:
                    if event.id > last:
                        last, quiet = event.id, 0.0
                        yield event.encode()
                quiet += POLL_SECONDS
                if quiet >= 15:
                    if await request.is_disconnected():
                        return
                    quiet = 0.0
                    yield b": keep-alive\n\n"
                continue
            if event is None:
                return
            if event.id > last:
                last, quiet = event.id, 0.0
                yield event.encode()
            ended = event.type in ("succeeded", "failed", "canceled")
    finally:
        hub.unsubscribe(job.id, subscription)


#: How often an event stream reads its job's state from the store (changes made by other replicas).
POLL_SECONDS = 0.5
