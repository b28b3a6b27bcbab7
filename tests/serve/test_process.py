"""``ti serve`` as a process on 127.0.0.1: kill -9 loses no accepted job; SIGTERM drains."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
import torch

from tests.serve.conftest import ServerProcess, done, photos, wait_for

pytestmark = pytest.mark.slow


def _vectors(c, word_id: str) -> torch.Tensor:
    from safetensors.torch import load

    return load(c.get(f"/v1/words/{word_id}/file", params={"layout": "a1111"}).content)["emb_params"]


def test_kill_9_then_restart_loses_no_accepted_job(concepts, tmp_path):
    server = ServerProcess(tmp_path / "data", "--refine", "80", "--save-every", "10", "--group", "2")
    try:
        server.start()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            jobs = [
                c.post("/v1/words", files=photos(f), data={"init": "circle"}).json()["id"]
                for f in concepts[:3]
            ]
            wait_for(c, jobs[0], lambda j: j["step"] >= 25)
            assert server.kill(signal.SIGKILL) == -signal.SIGKILL
        server.start()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            finished = [wait_for(c, j, done, timeout=300) for j in jobs]
            assert [j["state"] for j in finished] == ["succeeded"] * 3
            assert all(j["step"] == 80 for j in finished)
            log = server.log.read_text()
            assert "continuing from step" in log
            # the interrupted word equals the same word refined without interruption
            again = c.post("/v1/words", files=photos(concepts[0]), data={"init": "circle"}).json()["id"]
            again = wait_for(c, again, done, timeout=300)
            torch.testing.assert_close(
                _vectors(c, finished[0]["word_id"]), _vectors(c, again["word_id"]), atol=3e-5, rtol=0
            )
    finally:
        server.stop()


def test_sigterm_drains_then_the_jobs_continue(concepts, tmp_path):
    server = ServerProcess(
        tmp_path / "data", "--refine", "400", "--save-every", "1000", "--drain-seconds", "20"
    )
    try:
        server.start()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            job = c.post("/v1/words", files=photos(concepts[1])).json()["id"]
            at = wait_for(c, job, lambda j: j["step"] >= 5)["step"]
            t0 = time.monotonic()
            assert server.kill(signal.SIGTERM, timeout=30) == 0
            assert time.monotonic() - t0 < 25
        log = server.log.read_text()
        assert "draining" in log
        lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        requests = [r for r in lines if r.get("event") == "request"]
        assert requests and all(r["request_id"] and r["status"] for r in requests)
        assert any(r["path"] == "/v1/words" and r["status"] == 202 for r in requests)
        assert list((tmp_path / "data" / "jobs").glob("*/last.safetensors")), "no checkpoint at the drain"
        server.start()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            resumed = wait_for(c, job, lambda j: j["state"] == "running" and j["step"] > 0, timeout=120)
            assert resumed["step"] >= at  # continued from the drain's checkpoint, not from step 0
            assert wait_for(c, job, done, timeout=300)["state"] == "succeeded"
    finally:
        server.stop()


def test_two_servers_share_postgresql_and_s3_and_a_killed_ones_job_finishes_on_the_other(
    concepts, tmp_path, postgres_url, s3_server
):
    # two nodes: nothing on disk in common; the store in PostgreSQL, photos, words and
    # checkpoints in an S3 bucket
    args = ("--db", postgres_url, "--blobs", s3_server(), "--lease-seconds", "2", "--refine", "300")
    args += ("--save-every", "10")
    a, b = ServerProcess(tmp_path / "a" / "data", *args), ServerProcess(tmp_path / "b" / "data", *args)
    for server in (a, b):
        server.data.parent.mkdir()
    try:
        a.start()
        with httpx.Client(base_url=a.url, timeout=30) as c:
            job = c.post("/v1/words", files=photos(concepts[0])).json()["id"]
            wait_for(c, job, lambda j: j["step"] >= 15)
        b.start()  # a holds the job: b leaves it alone while a's lease is renewed
        with httpx.Client(base_url=b.url, timeout=30) as c:
            assert c.get(f"/v1/jobs/{job}").json()["state"] == "running"
            assert a.kill(signal.SIGKILL) == -signal.SIGKILL
            final = wait_for(c, job, done, timeout=300)
            assert c.get(f"/v1/words/{final['word_id']}/file").content[:8]  # read from the bucket
        assert final["state"] == "succeeded" and final["step"] == 300
        assert not [p for p in (tmp_path / "a").rglob("*") if p.is_file() and "blobs" in str(p)]
        log = b.log.read_text()
        assert "took over 1 job" in log and "continuing from step" in log
    finally:
        a.stop()
        b.stop()
