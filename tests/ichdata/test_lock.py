"""One writer per store: the lock file beside it, refusals naming the holder, stale locks taken over.

Holders are real processes paused at a known point (`lock_holder` in tests/conftest.py, or a
contender below that waits on a file), never sleeps that hope.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ichdata import lock as lockmod
from ichdata.errors import UserError
from ichdata.lock import STALE_AFTER_S, StoreLocked, lock_path, store_lock


def _record(path: Path, **fields: object) -> None:
    """Write a lock file as another holder would have."""
    base = {
        "host": socket.gethostname(),
        "pid": 1,
        "start": "",
        "since": "2026-01-01T00:00:00+00:00",
        "command": "ich convert",
        "token": "0" * 32,
    }
    path.write_text(json.dumps({**base, **fields}) + "\n")


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_file_lies_beside_the_store_and_names_its_holder(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    with store_lock(store, command="ich convert") as me:
        lock = tmp_path / "s.zarr.lock"
        assert lock_path(store) == lock
        held = json.loads(lock.read_text())
        assert held == {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": me.start,
            "since": me.since,
            "command": "ich convert",
            "token": me.token,
        }
        assert me.start  # this is Linux: the process start time is recorded
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr.lock"]  # no temporary file left
    assert not any(tmp_path.iterdir())  # released: the lock file is gone, the store was never made


def test_a_live_holder_is_named_in_one_line_and_nothing_is_written(tmp_path: Path, lock_holder) -> None:
    store = tmp_path / "s.zarr"
    holder = lock_holder(store, "ich convert")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(StoreLocked) as caught, store_lock(store, command="ich predict"):
        pytest.fail("the lock was taken twice")
    msg = str(caught.value)
    assert "\n" not in msg
    assert f"locked by ich convert (pid {holder.pid} on {socket.gethostname()}, since " in msg
    assert "wait for it to finish or stop it" in msg
    assert str(tmp_path / "s.zarr.lock") in msg
    assert isinstance(caught.value, UserError)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the refusal wrote nothing
    holder.release()
    assert not (tmp_path / "s.zarr.lock").exists()
    with store_lock(store, command="ich predict"):  # free again
        pass


def test_a_killed_holder_is_taken_over_even_before_it_is_reaped(tmp_path: Path, lock_holder) -> None:
    store = tmp_path / "s.zarr"
    holder = lock_holder(store)
    holder.kill()  # SIGKILL: its lock file stays; not reaped yet, so /proc shows a zombie
    deadline = time.monotonic() + 30
    while Path(f"/proc/{holder.pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert lock_path(store).exists()
    with store_lock(store, command="ich convert") as me:
        assert json.loads(lock_path(store).read_text())["token"] == me.token
    holder.reap()


def test_a_reused_pid_or_a_dead_one_is_not_the_holder(tmp_path: Path) -> None:
    lock = lock_path(tmp_path / "s.zarr")
    # A live pid (this very process) recorded with another start time: the pid was reused.
    _record(lock, pid=os.getpid(), start="another-boot:12345")
    with store_lock(tmp_path / "s.zarr", command="ich convert"):
        pass
    _record(lock, pid=_dead_pid())
    with store_lock(tmp_path / "s.zarr", command="ich convert"):
        pass
    # The same pid with its own start time: alive, so held (another thread of this process, say).
    _record(lock, pid=os.getpid(), start=lockmod._process_start(os.getpid()) or "")
    with (
        pytest.raises(StoreLocked, match=rf"pid {os.getpid()} on "),
        store_lock(tmp_path / "s.zarr", command="ich convert"),
    ):
        pass


def test_another_hosts_lock_is_stale_only_once_its_heartbeat_stopped(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    lock = lock_path(store)
    _record(lock, host="node-elsewhere", pid=os.getpid())
    with pytest.raises(StoreLocked) as caught, store_lock(store, command="ich convert"):
        pass
    assert "on node-elsewhere" in str(caught.value)
    assert f"once {STALE_AFTER_S / 60:.0f} minutes have passed without its heartbeat" in str(caught.value)
    old = time.time() - STALE_AFTER_S - 120
    os.utime(lock, (old, old))  # its holder stopped refreshing it that long ago
    with store_lock(store, command="ich convert") as me:
        assert json.loads(lock.read_text())["token"] == me.token


def test_an_unreadable_lock_file_counts_as_held_until_it_is_as_old_as_a_stale_one(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    lock = lock_path(store)
    lock.write_text("")  # an O_EXCL creator on a file system without hard links, mid-write
    with (
        pytest.raises(StoreLocked, match="left no readable record; if no ich command is writing it, remove"),
        store_lock(store, command="ich convert"),
    ):
        pass
    old = time.time() - STALE_AFTER_S - 120
    os.utime(lock, (old, old))
    with store_lock(store, command="ich convert"):
        pass


def test_the_holder_refreshes_its_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lockmod, "HEARTBEAT_S", 0.01)
    store = tmp_path / "s.zarr"
    with store_lock(store, command="ich convert"):
        os.utime(lock_path(store), (0, 0))
        deadline = time.monotonic() + 30
        while lock_path(store).stat().st_mtime == 0:
            assert time.monotonic() < deadline, "the heartbeat never refreshed the lock"
            time.sleep(0.01)
        assert time.time() - lock_path(store).stat().st_mtime < 60


def test_the_same_thread_may_nest_and_another_thread_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    refused: list[BaseException] = []

    def other() -> None:
        try:
            with store_lock(store, command="ich convert"):
                pass
        except StoreLocked as exc:
            refused.append(exc)

    with store_lock(store, command="ich predict") as outer:
        with store_lock(tmp_path / "." / "s.zarr", command="ich convert") as inner:  # another name of it
            assert inner == outer
        assert lock_path(store).exists()  # the inner block did not release it
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(refused) == 1
    assert not lock_path(store).exists()


def test_a_holder_that_lost_its_lock_leaves_the_new_holders_file(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    with store_lock(store, command="ich convert"):
        _record(lock_path(store), host="node-elsewhere", token="f" * 32)  # taken over meanwhile
    assert json.loads(lock_path(store).read_text())["token"] == "f" * 32


def test_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    with (
        pytest.raises(UserError, match=r"the folder .*nope does not exist; create it"),
        store_lock(tmp_path / "nope" / "s.zarr", command="ich convert"),
    ):
        pass
    assert not (tmp_path / "nope").exists()


# A contender that pauses once it has judged the lock stale, before it breaks it, until told to go on.
_CONTENDER = """
import sys, time
from pathlib import Path
import ichdata.lock as lockmod

store, name, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
real_break = lockmod._break

def paused_break(*args, **kwargs):
    (folder / f"{name}.judged").write_text("stale")
    while not (folder / f"{name}.go").exists():
        time.sleep(0.01)
    return real_break(*args, **kwargs)

lockmod._break = paused_break
try:
    with lockmod.store_lock(store, command=f"contender {name}"):
        (folder / f"{name}.held").write_text("held")
        while not (folder / f"{name}.done").exists():
            time.sleep(0.01)
except lockmod.StoreLocked as exc:
    print(exc)
    sys.exit(3)
"""


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def test_two_contenders_on_one_stale_lock_exactly_one_wins(tmp_path: Path) -> None:
    """Both judge the same dead holder's lock stale; the one that breaks it second must not break the winner's."""
    store = tmp_path / "s.zarr"
    _record(lock_path(store), pid=_dead_pid())
    signals = tmp_path / "signals"
    signals.mkdir()
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(store), name, str(signals)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    }
    try:
        for name, proc in procs.items():
            _wait_for(signals / f"{name}.judged", proc)  # both have read the stale lock
        (signals / "a.go").touch()
        _wait_for(signals / "a.held", procs["a"])  # a broke the stale lock and holds its own
        (signals / "b.go").touch()
        out, err = procs["b"].communicate(timeout=60)
        assert procs["b"].returncode == 3, err
        assert f"locked by contender a (pid {procs['a'].pid} on " in out
        assert json.loads(lock_path(store).read_text())["command"] == "contender a"
        assert not (signals / "b.held").exists()
        (signals / "a.done").touch()
        _, err = procs["a"].communicate(timeout=60)
        assert procs["a"].returncode == 0, err
        assert not lock_path(store).exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["signals"]  # no break lock or temporary file
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
