"""The run folder's lock: a second writer is refused naming the holder; a killed holder's lock is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from oneword.errors import InputError
from oneword.inversion.runfolder import LOCK, RunFolder

HOLD = textwrap.dedent("""
    import sys, time
    from oneword.inversion.runfolder import RunFolder
    with RunFolder(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def _holder(path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), "--out", str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_holders_lock_is_gone(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(InputError, match=rf"in use by another run \(pid {proc.pid} on .*--out") as err:
            RunFolder(out).lock()
        assert len(str(err.value).splitlines()) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert (out / LOCK).is_file()  # the file stays; the lock went with its process
    with RunFolder(out) as folder:
        assert not folder.holds_files()


def test_the_lock_is_reentrant_for_its_thread_only(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with folder:
        with RunFolder(tmp_path / "run"):  # a command locks before loading the model, the run again
            pass
        errors = []
        thread = threading.Thread(target=lambda: errors.append(_try_lock(tmp_path / "run")))
        thread.start()
        thread.join(timeout=10)
        assert errors and "another run in this process" in errors[0]
    with RunFolder(tmp_path / "run"):  # released at the outer exit
        pass


def _try_lock(path) -> str:
    try:
        RunFolder(path).lock()
    except InputError as err:
        return str(err)
    return ""


@pytest.mark.slow
def test_ti_invert_refuses_a_folder_another_run_writes(tiny_dirs, concept_dir, tmp_path, capsys):
    """Two `ti invert` on one --out: the second stops at once, before loading a model, and writes nothing."""
    from oneword.cli import main

    out = tmp_path / "run"
    proc = _holder(out)
    try:
        t0 = time.perf_counter()
        code = main(
            [
                "invert",
                str(concept_dir),
                "--model",
                "tiny-sd1",
                "--token",
                "<red-disc>",
                "--init",
                "disc",
                "--steps",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        assert code == 2 and time.perf_counter() - t0 < 30
        assert f"in use by another run (pid {proc.pid}" in capsys.readouterr().err
        assert sorted(os.listdir(out)) == [LOCK]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def test_a_relative_folder_unlocks_after_a_change_of_directory(tmp_path, monkeypatch):
    """The lock is given back as it was taken, whatever the working directory is by then."""
    monkeypatch.chdir(tmp_path)
    folder = RunFolder("run")
    with folder:
        (tmp_path / "elsewhere").mkdir()
        os.chdir(tmp_path / "elsewhere")
    os.chdir(tmp_path)
    proc = _holder(tmp_path / "run")  # another process can take it: it was released
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_the_engines_tokens_are_reserved(tiny_dirs, concept_dir):
    from oneword.data.images import load_folder
    from oneword.errors import TokenError
    from oneword.inversion.config import InversionConfig
    from oneword.inversion.train import Inversion
    from oneword.models import load_model

    cfg = InversionConfig(token="<ow-group-2>", init="disc", resolution=32)
    with pytest.raises(TokenError, match="engine"):
        Inversion(load_model("tiny-sd1"), load_folder(concept_dir), cfg)
