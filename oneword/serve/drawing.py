"""Drawing images for generation requests, batched: the worker calls :meth:`Drawing.draw_one_call`
between its other work, so that one pipeline call is the most an image waits behind."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import time
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("oneword.serve")


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str
    n: int
    steps: int
    guidance: float
    seed: int
    words: dict[str, list[torch.Tensor]]
    """The caller's words (token -> vectors per text encoder) that the prompts use."""
    size: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    accepted: float = field(default_factory=time.perf_counter)
    drawn: list = field(default_factory=list)
    """``(seed, image)`` pairs drawn so far."""


class Drawing:
    """Generation requests waiting (at most ``max_waiting``), drawn ``batch`` images per pipeline
    call; ``observe("generation_seconds", s)`` gets each request's time from acceptance to images."""

    def __init__(self, max_waiting: int, batch: int, observe) -> None:
        self.queue: queue.Queue[GenerationRequest] = queue.Queue(max_waiting)
        self.batch, self.observe = batch, observe
        self._images: list[tuple[GenerationRequest, int]] = []  # images taken from the queue, not drawn yet

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
        """Queue a request; raises :class:`queue.Full` when too many wait."""
        self.queue.put_nowait(request)
        return request.future

    def draw_one_call(self, model) -> bool:
        """Draw one pipeline call's images (up to ``generation_batch``, all with the steps,
        guidance and size of the oldest waiting image); True when there were any."""
        from oneword.sampling import sample_conditioned
        from oneword.serve.prompts import condition, condition_negative

        while True:
            try:
                r = self.queue.get_nowait()
            except queue.Empty:
                break
            self._images.extend((r, r.seed + i) for i in range(r.n))
        if not self._images:
            return False
        first = self._images[0][0]
        key = (first.steps, first.guidance, first.size)
        chunk = [it for it in self._images if (it[0].steps, it[0].guidance, it[0].size) == key]
        chunk = chunk[: self.batch]
        taken = {id(it) for it in chunk}
        self._images = [it for it in self._images if id(it) not in taken]
        try:
            with torch.no_grad():
                words = [r.words for r, _ in chunk]
                cond = condition(model, [r.prompt for r, _ in chunk], words)
                neg = condition_negative(model, [r.negative_prompt for r, _ in chunk], words)
                images, _ = sample_conditioned(model, cond, neg, [s for _, s in chunk], *key)
        except Exception as err:  # noqa: BLE001 - these requests fail; the worker goes on
            logger.exception("generation failed")
            failed = {id(r): r for r, _ in chunk}
            self._images = [it for it in self._images if id(it[0]) not in failed]
            for r in failed.values():
                if not r.future.done():
                    r.future.set_exception(err)
            return True
        for (r, seed), image in zip(chunk, images):
            r.drawn.append((seed, image))
            if len(r.drawn) == r.n and not r.future.done():
                r.future.set_result(sorted(r.drawn, key=lambda d: d[0]))
                self.observe("generation_seconds", time.perf_counter() - r.accepted)
        return True

    def fail_all(self, why: str) -> None:
        waiting = {id(r): r for r, _ in self._images}
        while True:
            try:
                r = self.queue.get_nowait()
            except queue.Empty:
                break
            waiting[id(r)] = r
        self._images = []
        for r in waiting.values():
            if not r.future.done():
                r.future.set_exception(RuntimeError(why))
