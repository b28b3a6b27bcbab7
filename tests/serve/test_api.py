"""``ti serve``'s API in process: the word's life, idempotency, cancel, tenants, bad uploads, limits."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tests.serve.conftest import client, done, make_service, photos, wait_for

pytestmark = pytest.mark.slow


def _events(c, job_id: str, headers=None) -> list[tuple[int, str, dict]]:
    out = []
    with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers or {}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        block: dict = {}
        for line in s.iter_lines():
            if not line:
                if block:
                    out.append((int(block["id"]), block["event"], json.loads(block["data"])))
                block = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                block[key] = value
    return out


def _vectors(c, word_id: str) -> torch.Tensor:
    from safetensors.torch import load

    return load(c.get(f"/v1/words/{word_id}/file?layout=a1111").content)["emb_params"]


def test_a_word_from_photos_to_images(world, concepts, tmp_path, store_db):
    """202 with Location; a provisional word, then the refined one; events in order and replayable
    from Last-Event-ID; provenance; both file layouts load; generation uses the word. On SQLite and
    on PostgreSQL."""
    from oneword.inversion.embedding_io import load_embedding

    with client(make_service(world, tmp_path / "data", db=store_db, refine=12, save_every=5)) as c:
        r = c.post("/v1/words", files=photos(concepts[0]), data={"token": "<thing>"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["state"] == "queued"
        assert r.headers["x-request-id"]
        provisional = wait_for(c, job["id"], lambda j: j["word_id"] is not None)
        word = c.get(f"/v1/words/{provisional['word_id']}").json()
        assert word["token"] == "<thing>" and word["kept"] in ("encoder", "refined")
        job = wait_for(c, job["id"], done)
        assert job["state"] == "succeeded" and job["step"] == 12 and job["word_status"] == "final"

        events = _events(c, job["id"])
        ids = [e[0] for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert [e[1] for e in events[:3]] == ["queued", "encoding", "provisional"]
        assert events[-1][1] == "succeeded" and events[-1][2]["word_status"] == "final"
        assert [e[2]["step"] for e in events if e[1] == "progress"] == list(range(1, 13))
        resumed = _events(c, job["id"], {"Last-Event-ID": str(ids[5])})
        assert [e[0] for e in resumed] == ids[6:]

        word = c.get(f"/v1/words/{job['word_id']}").json()
        prov = word["provenance"]
        assert word["status"] == "final" and word["kept"] == "refined" and word["steps"] == 12
        assert (
            prov["model"] == "toy"
            and prov["encoder"] == "encoder.safetensors"
            and len(prov["image_sha256"]) == 3
        )
        assert prov["init_how"] == "auto" and prov["init"]
        for layout, name in (("diffusers", "learned_embeds.safetensors"), ("a1111", "thing.safetensors")):
            f = c.get(word["files"][layout])
            assert f.status_code == 200 and name in f.headers["content-disposition"]
            path = tmp_path / name
            path.write_bytes(f.content)
            emb = load_embedding(path)
            assert emb.token == "<thing>" and emb.metadata["oneword.kept"] == "refined"
            assert emb.metadata["oneword.steps"] == "12"
        assert c.get(f"/v1/words/{word['id']}/file?layout=diffusers_2").status_code == 404

        r = c.post("/v1/images", json={"prompt": "a photo of <thing>", "n": 2, "steps": 5, "seed": 7})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["words"] == [word["id"]] and [i["seed"] for i in body["images"]] == [7, 8]
        image = Image.open(io.BytesIO(base64.b64decode(body["images"][0]["png_base64"])))
        assert image.size == (32, 32) and image.text["prompt"] == "a photo of <thing>"

        assert c.delete(f"/v1/words/{word['id']}").status_code == 204
        assert c.get(f"/v1/words/{word['id']}").status_code == 404
        assert c.get("/v1/words").json()["words"] == []
        metrics = c.get("/metrics").text
        for name in ("oneword_queue_depth", "oneword_jobs{state=", "oneword_job_seconds_bucket",
                     "oneword_generation_seconds_bucket", "oneword_refine_steps_total", "oneword_group_occupancy",
                     'oneword_http_responses_total{code="202"}'):  # fmt: skip
            assert name in metrics, name


def test_a_word_refined_in_a_group_equals_the_word_refined_alone(world, concepts, tmp_path):
    with client(make_service(world, tmp_path / "alone", refine=15, save_every=0)) as c:
        job = c.post("/v1/words", files=photos(concepts[0]), data={"init": "circle"}).json()
        alone = _vectors(c, wait_for(c, job["id"], done)["word_id"])
    with client(make_service(world, tmp_path / "group", refine=15, save_every=4, group=4)) as c:
        first = c.post("/v1/words", files=photos(concepts[1]), data={"refine": "25"}).json()
        wait_for(c, first["id"], lambda j: j["step"] >= 3)  # ours joins a running group
        job = c.post("/v1/words", files=photos(concepts[0]), data={"init": "circle"}).json()
        others = [c.post("/v1/words", files=photos(f)).json() for f in concepts[2:]]
        finished = [wait_for(c, j["id"], done) for j in [job, first, *others]]
        assert all(j["state"] == "succeeded" for j in finished)
        grouped = _vectors(c, finished[0]["word_id"])
    torch.testing.assert_close(grouped, alone, atol=3e-5, rtol=0)


def test_idempotent_retry_and_conflicts(world, concepts, tmp_path):
    service = make_service(world, tmp_path / "data")
    c = client(service)  # no lifespan: the worker does not start, the jobs wait
    key = {"Idempotency-Key": "retry-1"}
    a = c.post("/v1/words", files=photos(concepts[0]), headers=key)
    b = c.post("/v1/words", files=photos(concepts[0]), headers=key)
    assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
    other = c.post("/v1/words", files=photos(concepts[1]), headers=key)
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    c.post("/v1/words", files=photos(concepts[1]), data={"token": "<mine>"})
    same = c.post("/v1/words", files=photos(concepts[2]), data={"token": "<MINE>"})
    assert same.status_code == 409 and "<MINE>" in same.json()["detail"]
    assert service.store.counts()["queued"] == 2
    service.store.close()


def test_cancel_keeps_the_last_word(world, concepts, tmp_path):
    with client(make_service(world, tmp_path / "data", refine=1000, max_refine=1000)) as c:
        job = c.post("/v1/words", files=photos(concepts[0])).json()
        wait_for(c, job["id"], lambda j: j["step"] >= 3)
        r = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 202
        job = wait_for(c, job["id"], done)
        assert job["state"] == "canceled" and 3 <= job["step"] < 1000
        word = c.get(f"/v1/words/{job['word_id']}").json()
        assert word["status"] == "final" and word["kept"] == "partial" and word["steps"] == job["step"]
        assert _events(c, job["id"])[-1][1] == "canceled"


def test_tenants_see_only_their_own(world, concepts, tmp_path):
    from oneword.serve.auth import Keys, add_key

    keys_file = tmp_path / "keys.txt"
    alice, bob = add_key(keys_file, "alice"), add_key(keys_file, "bob")
    assert alice not in keys_file.read_text()
    A, B = ({"Authorization": f"Bearer {k}"} for k in (alice, bob))
    with client(make_service(world, tmp_path / "data", Keys.load(keys_file), refine=5)) as c:
        assert c.post("/v1/words", files=photos(concepts[0])).status_code == 401
        assert c.get("/v1/words", headers={"Authorization": "Bearer nope"}).status_code == 401
        ja = c.post("/v1/words", files=photos(concepts[0]), data={"token": "<pet>"}, headers=A).json()
        jb = c.post("/v1/words", files=photos(concepts[1]), data={"token": "<pet>"}, headers=B).json()
        ja, jb = wait_for(c, ja["id"], done, headers=A), wait_for(c, jb["id"], done, headers=B)
        wa = ja["word_id"]
        for method, path in (("get", f"/v1/jobs/{ja['id']}"), ("get", f"/v1/jobs/{ja['id']}/events"),
                             ("post", f"/v1/jobs/{ja['id']}/cancel"), ("get", f"/v1/words/{wa}"),
                             ("get", f"/v1/words/{wa}/file?layout=a1111"), ("delete", f"/v1/words/{wa}")):  # fmt: skip
            assert getattr(c, method)(path, headers=B).status_code == 404, path
        assert [w["id"] for w in c.get("/v1/words", headers=B).json()["words"]] == [jb["word_id"]]
        assert [j["id"] for j in c.get("/v1/jobs", headers=B).json()["jobs"]] == [jb["id"]]

        # the same token, two tenants: each prompt draws its own tenant's word
        ask = {"prompt": "a photo of <pet>", "steps": 5, "seed": 3}
        ra, rb = (c.post("/v1/images", json=ask, headers=h).json() for h in (A, B))
        assert ra["words"] == [wa] and rb["words"] == [jb["word_id"]]
        img_a, img_b = (
            Image.open(io.BytesIO(base64.b64decode(r["images"][0]["png_base64"]))) for r in (ra, rb)
        )
        assert img_a.tobytes() != img_b.tobytes()
        assert c.get(f"/v1/words/{wa}", headers=A).status_code == 200


def test_two_tenants_words_in_one_batch_do_not_mix(world, concepts, tmp_path):
    """Requests drawn in one pipeline call: each image equals the same request drawn alone."""
    from oneword.serve.drawing import GenerationRequest

    service = make_service(world, tmp_path / "data")
    vectors = [[torch.randn(1, 128) * 0.3] for _ in range(2)]

    def ask(v):
        return GenerationRequest("a photo of <pet> on a teal background", "", 1, 5, 7.5, 11, {"<pet>": v}, 32)

    alone = []
    for v in vectors:
        r = ask(v)
        service.worker.drawing.queue.put(r)
        service.worker.drawing.draw_one_call(world.model)
        alone.append(r.future.result()[0][1])
    together = [ask(v) for v in vectors]
    for r in together:
        service.worker.drawing.queue.put(r)
    service.worker.drawing.draw_one_call(world.model)
    for r, image in zip(together, alone):
        diff = np.asarray(r.future.result()[0][1], dtype=float) - np.asarray(image, dtype=float)
        assert np.abs(diff).mean() < 1.0  # the same image, up to batched arithmetic
    assert alone[0].tobytes() != alone[1].tobytes()
    service.store.close()


def _png(width: int, height: int) -> bytes:
    """A PNG header that claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_bad_uploads_get_one_clear_error_and_store_nothing(world, concepts, tmp_path):
    service = make_service(world, tmp_path / "data", max_files=4, max_file_bytes=200_000,
                           max_request_bytes=400_000, max_pixels=100_000)  # fmt: skip
    c = client(service)
    good = photos(concepts[0])
    valid = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(valid, format="PNG")
    truncated = valid.getvalue()[:-30]
    cases = [
        (415, "not an image", [("images", ("notes.txt", b"hello, not a photo", "text/plain"))]),
        (422, "truncated", [("images", ("cut.png", truncated, "image/png"))]),
        (413, "pixels", [("images", ("bomb.png", _png(20_000, 20_000), "image/png"))]),
        (413, "bytes", [("images", ("big.png", b"\x89PNG" + b"\0" * 250_000, "image/png"))]),
        (413, "limit", [("images", (f"{i}.png", b"\0" * 150_000, "image/png")) for i in range(3)]),
        (422, "photos", good * 2),
        (422, "images", []),
        (422, "vocabulary", good, {"token": "cat"}),
        (422, "reserved", good, {"token": "<ow-use-0-1>"}),
        (422, "refine", good, {"refine": "100000"}),
        (422, "init", good, {"init": "   "}),
    ]
    for status, words, files, *data in cases:
        r = c.post("/v1/words", files=files or None, data=data[0] if data else {"x": "1"})
        assert r.status_code == status, (words, r.status_code, r.text)
        assert words in r.json()["detail"] and "\n" not in r.json()["detail"], r.json()
    assert c.post("/v1/images", json={"prompt": "x", "n": 99}).status_code == 422
    assert (
        c.post("/v1/images", content=b"{not json", headers={"content-type": "application/json"}).status_code
        == 422
    )
    assert sum(service.store.counts().values()) == 0
    assert not any(p.is_file() for p in (tmp_path / "data" / "blobs").rglob("*"))
    service.store.close()


def test_queue_full_gives_429_with_retry_after(world, concepts, tmp_path):
    service = make_service(world, tmp_path / "data", max_queue=2, max_per_key=5)
    c = client(service)  # the worker does not run: jobs wait
    assert [c.post("/v1/words", files=photos(f)).status_code for f in concepts[:2]] == [202, 202]
    r = c.post("/v1/words", files=photos(concepts[2]))
    assert (
        r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["detail"]
    )
    assert c.get("/readyz").status_code == 503
    assert service.store.counts()["queued"] == 2
    service.store.close()
    per_key = make_service(world, tmp_path / "data2", max_queue=10, max_per_key=1)
    c = client(per_key)
    assert c.post("/v1/words", files=photos(concepts[0])).status_code == 202
    r = c.post("/v1/words", files=photos(concepts[1]))
    assert r.status_code == 429 and "this key" in r.json()["detail"]
    per_key.store.close()


def test_draining_refuses_new_work(world, concepts, tmp_path):
    with client(make_service(world, tmp_path / "data")) as c:
        assert c.get("/readyz").status_code == 200
        c.app.state.service.drain(timeout=30)
        assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200
        assert c.post("/v1/words", files=photos(concepts[0])).status_code == 503
        r = c.post("/v1/images", json={"prompt": "a photo of a circle"})
        assert r.status_code == 503 and r.headers["retry-after"]


def test_openapi_documents_every_route(world, tmp_path):
    service = make_service(world, tmp_path / "data")
    schema = client(service).get("/openapi.json").json()
    paths = schema["paths"]
    for path, method in (("/v1/words", "post"), ("/v1/words", "get"), ("/v1/words/{word_id}", "get"),
                         ("/v1/words/{word_id}", "delete"), ("/v1/words/{word_id}/file", "get"),
                         ("/v1/jobs/{job_id}", "get"), ("/v1/jobs/{job_id}/events", "get"),
                         ("/v1/jobs/{job_id}/cancel", "post"), ("/v1/images", "post"), ("/healthz", "get"),
                         ("/readyz", "get"), ("/metrics", "get")):  # fmt: skip
        assert method in paths[path], (path, method)
    assert (
        "422" in paths["/v1/words"]["post"]["responses"] and "429" in paths["/v1/words"]["post"]["responses"]
    )
    err = paths["/v1/words"]["post"]["responses"]["413"]["content"]["application/json"]["schema"]
    assert err["$ref"].endswith("/ErrorBody")
    service.store.close()


def test_an_event_stream_follows_a_job_that_another_replica_works_on(world, concepts, tmp_path):
    """No worker runs here (another replica's does): the stream reads state changes from the store."""
    import threading

    service = make_service(world, tmp_path / "data")
    c = client(service)
    job = c.post("/v1/words", files=photos(concepts[0])).json()
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(_events(c, job["id"])))
    reader.start()
    other = service.store.claim("encode", 1)[0]  # the other replica's worker takes it and fails it
    service.store.end_job(other.id, "failed", error="the other replica's GPU fell over")
    reader.join(30)
    assert not reader.is_alive(), "the stream did not end"
    assert [e[1] for e in got] == ["queued", "failed"] or [e[1] for e in got] == [
        "queued",
        "encoding",
        "failed",
    ]
    assert got[-1][2]["error"] == "the other replica's GPU fell over"
    service.store.close()
