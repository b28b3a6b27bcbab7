"""The service's parts without a model: keys, binding, prompt rewriting, the job store, settings."""

from __future__ import annotations

import pytest
import torch

from oneword.errors import InputError, OneWordError


def test_keys_file_holds_hashes_and_names_tenants(tmp_path):
    from oneword.serve.auth import Keys, add_key

    path = tmp_path / "keys.txt"
    alice, bob = add_key(path, "alice"), add_key(path, "bob")
    text = path.read_text()
    assert alice not in text and bob not in text and text.count("sha256:") == 2
    assert oct(path.stat().st_mode)[-3:] == "600"
    keys = Keys.load(path)
    assert keys.tenant(alice) == "alice" and keys.tenant(bob) == "bob"
    assert keys.tenant(alice + "x") is None and keys.tenant("") is None and keys.tenant(None) is None
    with pytest.raises(InputError, match="already"):
        add_key(path, "alice")
    with pytest.raises(InputError, match="key name"):
        add_key(path, "no spaces please")
    bad = tmp_path / "bad.txt"
    bad.write_text("alice sha256:abc\n")
    with pytest.raises(InputError, match="line 1"):
        Keys.load(bad)
    bad.write_text("# only a comment\n")
    with pytest.raises(InputError, match="no keys"):
        Keys.load(bad)


def test_without_keys_only_loopback(tmp_path):
    from oneword.serve.server import check_binding

    assert check_binding("127.0.0.1", None) is None and check_binding("::1", None) is None
    with pytest.raises(OneWordError, match="loopback only"):
        check_binding("0.0.0.0", None)


def test_ti_serve_keys_add_prints_a_key_once(tmp_path, capsys):
    from oneword.cli import main

    assert main(["serve", "keys", "add", "carol", "--keys", str(tmp_path / "k.txt")]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("ow_") and key not in (tmp_path / "k.txt").read_text()
    assert main(["serve", "keys", "remove", "carol", "--keys", str(tmp_path / "k.txt")]) == 2


def test_prompts_bind_each_callers_words_to_internal_tokens():
    from oneword.serve.prompts import bind, words_in

    assert words_in("a <Cat> and a <cat-red>", ["<cat>", "<cat-red>", "<dog>"]) == ["<cat>", "<cat-red>"]
    one, two = [torch.ones(1, 4)], [torch.zeros(2, 4)]
    text, table = bind("<CAT> next to <cat-red>, <cat>", {"<cat>": one, "<cat-red>": two})
    assert text == "<ow-use-0-1> next to <ow-use-1-2>, <ow-use-0-1>"
    assert table == {"<ow-use-0-1>": one, "<ow-use-1-2>": two}
    assert bind("a plain prompt", {"<cat>": one}) == ("a plain prompt", {})


def _job(store, tenant="t", token="<a>", key=None, body="x", queue=10, per_key=10):
    return store.create_job(tenant, token, None, 5, [("ab" * 32, b"photo")], key, body, queue, per_key)


def test_store_idempotency_conflicts_limits_and_recovery(tmp_path, store_db):
    from oneword.serve.records import Busy, Conflict
    from oneword.serve.store import Store

    store = Store(tmp_path, store_db)
    job, created = _job(store, key="k1")
    again, created_again = _job(store, key="k1")
    assert created and not created_again and again.id == job.id
    with pytest.raises(Conflict, match="Idempotency-Key"):
        _job(store, key="k1", body="other")
    with pytest.raises(Conflict, match="token"):
        _job(store, token="<A>")
    other, _ = _job(store, tenant="u", token="<a>")  # another tenant may use the same token
    assert store.job(other.id, "t") is None and store.job(other.id, "u").id == other.id
    with pytest.raises(Busy, match="queue is full"):
        _job(store, token="<b>", queue=2)
    with pytest.raises(Busy, match="this key"):
        _job(store, token="<b>", per_key=1)
    assert store.blobs.get("ab" * 32) == b"photo"

    claimed = store.claim("encode", 5)
    assert [j.id for j in claimed] == [job.id, other.id] and all(j.state == "running" for j in claimed)
    for attempt in range(1, 4):  # a job running in 3 stopped processes is failed
        requeued, failed = store.recover(3)
        assert (requeued, failed) == ((2, 0) if attempt < 3 else (0, 2))
        if attempt < 3:
            assert store.job(job.id).state == "queued"
            store.claim("encode", 5)
    assert store.job(job.id).state == "failed" and "3 times" in store.job(job.id).error
    store.close()


def test_store_words_replace_their_files_and_cancel_keeps_them(tmp_path, store_db, store_blobs):
    from oneword.serve.records import CANCEL_DISCARD
    from oneword.serve.store import Store

    store = Store(tmp_path, store_db, blobs=store_blobs)
    job, _ = _job(store)
    store.claim("encode", 1)
    word = store.put_word(
        store.job(job.id), {"a1111": b"first"}, {"m": "1"}, "provisional", "encoder", 0, requeue=True
    )
    first = word.files["a1111"]
    assert (
        store.blobs.get(first) == b"first"
        and store.job(job.id).state == "queued"
        and store.job(job.id).stage == "refine"
    )
    assert store.queue_position(store.job(job.id)) == 1
    canceled = store.request_cancel("t", job.id)
    assert canceled.state == "canceled" and store.word_of_job(job.id).status == "final"
    store.put_word(store.job(job.id), {"a1111": b"second"}, {}, "final", "partial", 3)
    assert not store.blobs.exists(f"{first[:2]}/{first}")  # no word uses the old file any more
    gone = store.delete_word("t", word.id)
    assert (
        gone is not None
        and store.word(word.id, "t") is None
        and not store.blobs.exists(f"{gone.files['a1111'][:2]}/{gone.files['a1111']}")
    )
    job2, _ = _job(store, token="<b>")
    store.claim("encode", 1)
    store.put_word(store.job(job2.id), {"a1111": b"third"}, {}, "provisional", "encoder", 0)
    store.delete_word("t", store.word_of_job(job2.id).id)
    assert store.job(job2.id).cancel == CANCEL_DISCARD
    store.close()


def test_settings_check_themselves():
    from oneword.serve.config import ServeSettings

    for bad in ({"group": 0}, {"min_files": 5, "max_files": 2}, {"refine": 2000}, {"drain_seconds": 0},
                {"db": "mysql://db/oneword"}, {"init_survivors": 1}, {"init_survivors": -2}):  # fmt: skip
        with pytest.raises(ValueError):
            ServeSettings(**bad)


def test_ti_serve_refuses_unreachable_blobs_before_making_anything(tmp_path, capsys):
    from oneword.cli import main

    data = tmp_path / "data"
    assert main(["serve", "--blobs", "nosuch://bucket/x", "--data", str(data)]) == 2
    assert "--blobs: cannot open nosuch://bucket/x" in capsys.readouterr().err and not data.exists()


def test_events_keep_progress_and_drop_streams_whose_loop_closed():
    import asyncio

    from oneword.serve.events import Event, EventHub

    hub = EventHub()

    async def subscribe():
        return hub.subscribe("job")

    loop = asyncio.new_event_loop()
    loop.run_until_complete(subscribe())
    loop.close()
    hub.publish("job", Event(4, "progress", {"step": 1}))  # the worker's thread must not fail here
    assert [e.id for e in hub.progress("job")] == [4] and hub.latest("job").data == {"step": 1}
    assert not hub._subscribers


def test_two_workers_claiming_at_once_take_each_job_exactly_once(tmp_path, store_db):
    """Two stores on one database (two connections: two workers' processes) claim in parallel."""
    import threading

    from oneword.serve.store import Store

    first = Store(tmp_path, store_db)
    ids = {_job(first, token=f"<t{i}>", per_key=100, queue=100)[0].id for i in range(40)}
    second = Store(tmp_path, store_db)
    taken: dict[str, list[str]] = {"a": [], "b": []}

    def work(store, name):
        for _ in range(100):  # bounded
            got = store.claim("encode", 3)
            if not got:
                return
            taken[name] += [j.id for j in got]

    threads = [threading.Thread(target=work, args=a) for a in ((first, "a"), (second, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = taken["a"] + taken["b"]
    assert sorted(claimed) == sorted(ids) and len(set(claimed)) == len(claimed)
    first.close()
    second.close()


def test_a_stopped_workers_jobs_are_taken_over_when_its_lease_expires(tmp_path, store_db):
    import time

    from oneword.serve.store import Store

    a = Store(tmp_path, store_db, owner="a", lease_seconds=0.5)
    b = Store(tmp_path, store_db, owner="b", lease_seconds=0.5)
    first, _ = _job(a, token="<one>")
    second, _ = _job(a, token="<two>")
    assert [j.id for j in a.claim("encode", 1)] == [first.id]
    assert [j.id for j in b.claim("encode", 1)] == [second.id]
    assert b.recover(5, mine=False) == (0, 0)  # live leases are left alone
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a renews its job, b stops renewing (it "died")
        a.heartbeat({first.id: (0, None)})
        time.sleep(0.1)
        if a.job(second.id).state == "queued" or a.recover(5, mine=False)[0]:
            break
    assert a.job(second.id).state == "queued" and a.job(second.id).attempts == 1
    assert a.job(first.id).state == "running"
    assert [j.id for j in a.claim("encode", 5)] == [second.id]  # taken over
    restarted = Store(tmp_path, store_db, owner="a", lease_seconds=0.5)
    assert restarted.recover(5) == (2, 0)  # a restarted owner takes its own back at once
    for s in (a, b, restarted):
        s.close()


def test_progress_and_cancels_pass_between_replicas_through_the_store(tmp_path, store_db):
    from oneword.serve import events as ev
    from oneword.serve.store import Store

    a = Store(tmp_path, store_db, owner="a")
    b = Store(tmp_path, store_db, owner="b")
    job, _ = _job(a)
    a.claim("encode", 1)
    a.put_word(a.job(job.id), {"a1111": b"w"}, {}, "provisional", "encoder", 0, requeue=True)
    a.claim("refine", 1)
    assert a.heartbeat({job.id: (7, 0.25)}) == set()
    seen = b.job(job.id)  # another replica shows the step a's worker reached
    assert (seen.step, seen.loss) == (7, 0.25)
    assert ev.state_events(seen, b.word_of_job(job.id))[-1].id == ev.progress_id(7)
    b.request_cancel("t", job.id)  # asked on b, noticed by a's worker at its next heartbeat
    assert a.heartbeat({job.id: (8, 0.2)}) == {job.id}
    assert b.heartbeat({job.id: (9, 0.1)}) == {job.id} and a.job(job.id).step == 8  # not b's job
    a.close()
    b.close()


@pytest.mark.parametrize("where", ["folder", "memory", "s3"])
def test_blobs_in_a_folder_or_at_an_fsspec_url(tmp_path, where, request):
    from oneword.serve.blobs import Blobs

    if where == "s3":
        location = request.getfixturevalue("s3_server")()
    else:
        location = str(tmp_path / "files") if where == "folder" else f"memory://oneword-{tmp_path.name}"
    blobs = Blobs(location)
    sha = "cd" * 32
    assert not blobs.exists(f"cd/{sha}")
    with pytest.raises(FileNotFoundError):
        blobs.get(sha)
    blobs.put(sha, b"photo")
    blobs.put(sha, b"ignored: the name is the content's hash")
    assert blobs.get(sha) == b"photo" and blobs.exists(f"cd/{sha}")
    blobs.write("job/last.safetensors", b"step 10")
    blobs.write("job/last.safetensors", b"step 20")  # a checkpoint is replaced
    assert Blobs(location).read("job/last.safetensors") == b"step 20"  # another node sees it
    blobs.delete(sha)
    blobs.remove("job/last.safetensors")
    blobs.remove("job/last.safetensors")  # removing what is gone is fine
    assert not blobs.exists(f"cd/{sha}") and not blobs.exists("job/last.safetensors")
    with pytest.raises(ValueError, match="cannot open"):
        Blobs("nosuchprotocol://bucket/x")
