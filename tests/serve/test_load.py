"""A bounded load test on a live ``ti serve`` (127.0.0.1): 32 concurrent clients, 64 word jobs and
200 generations. Every accepted job succeeds, nothing answers 5xx, and 429s are counted (then
retried after Retry-After, a bounded number of times)."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serve.conftest import ServerProcess, done, photos, wait_for

pytestmark = pytest.mark.slow

CLIENTS, JOBS, GENERATIONS = 32, 64, 200


def test_32_clients_64_words_200_generations(concepts, tmp_path):
    server = ServerProcess(
        tmp_path / "data", "--refine", "10", "--group", "8", "--max-queue", "24", "--max-per-key", "1000",
        "--max-sample-steps", "5",
    )  # fmt: skip
    codes: Counter[int] = Counter()
    deadline = time.monotonic() + 600

    def call(c: httpx.Client, method: str, url: str, **kw) -> httpx.Response:
        for _ in range(200):  # bounded retries of 429s
            r = c.request(method, url, **kw)
            codes[r.status_code] += 1
            if r.status_code != 429:
                return r
            assert time.monotonic() < deadline, "the load test ran out of time"
            time.sleep(min(float(r.headers.get("retry-after", "1")), 2.0))
        raise AssertionError(f"{url}: still 429 after 200 tries")

    def client(i: int) -> list[dict]:
        jobs = list(range(i, JOBS, CLIENTS))
        gens = list(range(i, GENERATIONS, CLIENTS))
        with httpx.Client(base_url=server.url, timeout=120) as c:
            accepted = []
            for j in jobs:
                r = call(c, "POST", "/v1/words", files=photos(concepts[j % len(concepts)]))
                assert r.status_code == 202, r.text
                accepted.append(r.json()["id"])
            for g in gens:
                r = call(
                    c, "POST", "/v1/images", json={"prompt": "a photo of a circle", "steps": 5, "seed": g}
                )
                assert r.status_code == 200, r.text
                assert len(r.json()["images"]) == 1
            return [wait_for(c, job, done, timeout=max(1.0, deadline - time.monotonic())) for job in accepted]

    try:
        server.start()
        with ThreadPoolExecutor(CLIENTS) as pool:
            finished = [job for jobs in pool.map(client, range(CLIENTS)) for job in jobs]
        assert len(finished) == JOBS and all(j["state"] == "succeeded" for j in finished)
        assert not [code for code in codes if code >= 500], codes
        assert codes[202] == JOBS and codes[200] >= GENERATIONS
        print(f"responses by code: {dict(codes)} (429s: {codes[429]})")
        with httpx.Client(base_url=server.url) as c:
            metrics = c.get("/metrics").text
        assert 'oneword_jobs{state="succeeded"} 64.0' in metrics
    finally:
        server.stop()
