"""The service on Ray Serve: ``ti serve --ray`` on a local Ray instance (2 CPUs) sharing a real
PostgreSQL store; the options and the autoscaling policy."""

from __future__ import annotations

import base64
import importlib.util
import io
import signal
import time
from types import SimpleNamespace

import httpx
import pytest

from tests.serve.conftest import ServerProcess, done, photos, wait_for

# not imported while collecting: Ray reads some settings when it is imported (ti batch --ray sets
# a local instance to loopback before it imports Ray)
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray Serve is in the dev extra (make installs it)"
)


def test_options_parse_serve_run_strings():
    from oneword.serve.ray_app import Options

    opts = Options.parse({"model": "toy", "replicas": "2", "max-replicas": "4", "group": "16", "db": "none"})
    assert (opts.replicas, opts.max_replicas) == (2, 4)
    assert opts.serve_settings().group == 16 and opts.serve_settings().db is None
    assert opts.serve_settings(owner="w1").owner == "w1"
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        Options.parse({"colour": "red"})
    with pytest.raises(ValueError, match="max_replicas"):
        Options.parse({"replicas": 3, "max_replicas": 2})
    with pytest.raises(ValueError, match="group"):
        Options.parse({"group": "0"})


def test_queue_depth_policy_asks_one_replica_per_group_of_words():
    from oneword.serve.ray_app import queue_depth_policy

    def ctx(queued, occupancy, low=1, high=4):
        metrics = {"queued": {r: queued for r in occupancy}, "occupancy": dict(occupancy),
                   "group": {r: 8.0 for r in occupancy}}  # fmt: skip
        return SimpleNamespace(
            aggregated_metrics=metrics,
            capacity_adjusted_min_replicas=low,
            capacity_adjusted_max_replicas=high,
        )

    assert queue_depth_policy(ctx(0, {"a": 0}))[0] == 1  # never below the minimum
    assert queue_depth_policy(ctx(10, {"a": 8}))[0] == 3  # 18 words, 8 per replica
    assert queue_depth_policy(ctx(100, {"a": 8, "b": 8}))[0] == 4  # never above the maximum
    assert queue_depth_policy(ctx(0, {"a": 3, "b": 2}))[0] == 1


@pytest.mark.slow
def test_ray_serve_learns_draws_scales_on_the_queue_and_shuts_down(concepts, tmp_path, postgres_url):
    from PIL import Image

    args = ("--ray", "--db", postgres_url, "--refine", "40", "--save-every", "10", "--group", "2")
    server = ServerProcess(tmp_path / "data", *args, "--replicas", "1", "--max-replicas", "2")
    try:
        server.start(timeout=300)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            ready = c.get("/readyz").json()
            assert ready["ready"] and ready["model"] == "toy"
            created = c.post("/v1/words", files=photos(concepts[0]), data={"token": "<ray-word>"})
            assert created.status_code == 202, created.text
            job = wait_for(c, created.json()["id"], done, timeout=240)
            assert job["state"] == "succeeded" and job["step"] == 40 and job["word_status"] == "final"
            assert c.get(f"/v1/words/{job['word_id']}/file").content[:8]
            drawn = c.post(
                "/v1/images", json={"prompt": "a photo of <ray-word>", "n": 2, "steps": 8, "seed": 3}
            )
            assert drawn.status_code == 200, drawn.text
            images = [
                Image.open(io.BytesIO(base64.b64decode(i["png_base64"]))) for i in drawn.json()["images"]
            ]
            assert [im.size for im in images] == [(32, 32)] * 2 and drawn.json()["words"] == [job["word_id"]]
            with c.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
                kinds = [line.split(": ")[1] for line in events.iter_lines() if line.startswith("event")]
            assert kinds[0] == "queued" and kinds[-1] == "succeeded" and "provisional" in kinds
            assert "oneword_queue_depth" in c.get("/metrics").text

            # a queue of 6 long words (3 groups of 2) makes the policy ask for the second replica
            queued = [
                c.post(
                    "/v1/words", files=photos(concepts[i % len(concepts)]), data={"refine": "1000"}
                ).json()["id"]
                for i in range(6)
            ]
            deadline = time.monotonic() + 180
            while "to 2 replicas" not in server.log.read_text():
                assert time.monotonic() < deadline, "Ray Serve did not add the second worker replica in 180 s"
                time.sleep(1)
            running = wait_for(c, queued[0], lambda j: j["state"] == "running" and j["step"] > 0)
            for job_id in queued:  # asked on the ingress, seen by whichever replica refines the job
                assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
            ended = [wait_for(c, job_id, done, timeout=120) for job_id in queued]
            assert {j["state"] for j in ended} == {"canceled"} and running["step"] < 1000
            kept = c.get(f"/v1/words/{ended[0]['word_id']}").json()
            assert kept["kept"] == "partial" and kept["steps"] >= running["step"]  # its last vectors
        assert server.kill(signal.SIGTERM, timeout=120) == 0  # the application and Ray shut down
    finally:
        server.stop()
