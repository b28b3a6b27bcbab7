"""The API's request and response bodies (Pydantic), and their making from stored rows."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, Field

from oneword.serve.records import Job, Word

JobState = Literal["queued", "running", "succeeded", "failed", "canceled"]
Layout = Literal["diffusers", "diffusers_2", "a1111"]


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong, in one sentence.")


class JobOut(BaseModel):
    id: str
    state: JobState
    stage: Literal["encode", "refine"]
    token: str
    step: int = Field(description="Refinement steps made.")
    total: int = Field(description="Refinement steps asked for.")
    loss: float | None = Field(description="The denoising loss of the last step.")
    queue_position: int | None = Field(description="1 for the next job to start; null once it runs.")
    eta_seconds: float | None = Field(
        description="Estimated seconds until the refined word, from the measured pace."
    )
    error: str | None
    word_id: str | None = Field(description="The job's word: usable from the provisional stage on.")
    word_status: Literal["provisional", "final"] | None
    created: float
    finished: float | None
    url: str
    events_url: str


class JobList(BaseModel):
    jobs: list[JobOut]


class Provenance(BaseModel):
    model: str
    family: str
    encoder: str | None
    encoder_sha256: str | None
    image_sha256: list[str]
    steps: int
    kept: Literal["encoder", "refined", "partial"] = Field(
        description="Which word is kept: the encoder's prediction, the refined word, or the last vectors "
        "of a canceled refinement."
    )
    init: str | None
    init_how: str | None = Field(description="given, or auto (zero-shot choice)")
    init_win_rate: float | None
    init_runner_up: str | None


class WordOut(BaseModel):
    id: str
    token: str
    status: Literal["provisional", "final"]
    kept: Literal["encoder", "refined", "partial"]
    steps: int
    job_id: str
    created: float
    updated: float
    provenance: Provenance
    files: dict[str, str] = Field(description="Layout -> download URL.")


class WordList(BaseModel):
    words: list[WordOut]


class ImageRequest(BaseModel):
    prompt: str = Field(
        min_length=1, max_length=1000, description="Uses your words by token, e.g. 'a photo of <w-1a2b3c>'."
    )
    negative_prompt: str = Field("", max_length=1000)
    n: int = Field(
        1, ge=1, le=64, description="Images (one per seed: seed, seed + 1, ...); the server caps it."
    )
    steps: int = Field(25, ge=1, le=1000, description="Denoising steps; the server caps them.")
    guidance: float = Field(7.5, ge=0, le=50)
    seed: int = Field(0, ge=0, lt=2**32)


class ImageOut(BaseModel):
    seed: int
    png_base64: str


class ImagesOut(BaseModel):
    images: list[ImageOut]
    words: list[str] = Field(description="Ids of your words the prompts used.")
    seconds: float


def job_out(
    job: Job, word: Word | None, position: int | None, eta: float | None, live: dict | None
) -> JobOut:
    step, loss = job.step, job.loss
    if live and job.state == "running" and live.get("step", 0) > step:
        step, loss = live["step"], live.get("loss", loss)
    return JobOut(
        id=job.id,
        state=job.state,
        stage=job.stage,
        token=job.token,
        step=step,
        total=job.refine,
        loss=loss,
        queue_position=position,
        eta_seconds=eta,
        error=job.error,
        word_id=word.id if word is not None else None,
        word_status=word.status if word is not None else None,
        created=job.created,
        finished=job.finished,
        url=f"/v1/jobs/{job.id}",
        events_url=f"/v1/jobs/{job.id}/events",
    )


def word_out(word: Word) -> WordOut:
    m = word.meta
    win = m.get("oneword.init_win_rate")
    return WordOut(
        id=word.id,
        token=word.token,
        status=word.status,
        kept=word.kept,
        steps=word.steps,
        job_id=word.job_id,
        created=word.created,
        updated=word.updated,
        provenance=Provenance(
            model=m.get("oneword.model", ""),
            family=m.get("oneword.family", ""),
            encoder=m.get("oneword.encoder"),
            encoder_sha256=m.get("oneword.encoder_sha256"),
            image_sha256=json.loads(m.get("oneword.source_sha256", "[]")),
            steps=word.steps,
            kept=word.kept,
            init=m.get("oneword.init") or None,
            init_how=m.get("oneword.init_how"),
            init_win_rate=float(win) if win else None,
            init_runner_up=m.get("oneword.init_runner_up"),
        ),
        files={layout: f"/v1/words/{word.id}/file?layout={layout}" for layout in word.files},
    )
