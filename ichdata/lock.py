"""One writer per store: `store_lock(path, command=...)`, a lock file beside the path (`STORE.lock`).

`ich convert`, the Prefect `ingest` flow and `ich predict --store` hold it while they write a store,
and any command that writes an output group of its own (a features group) takes the same lock on
that group's path. The lock file lies beside the path, not inside it: `--overwrite` replaces the
store folder, and a new store does not exist yet. It holds one JSON line: the holder's host, pid,
process start, the time it took the lock and its command, which a refusal (`StoreLocked`) names.

Creation is atomic on NFS and Lustre: the record is written whole to a temporary file of the
process's own beside the lock, then hard-linked to `STORE.lock`. `link` fails if the name exists,
on every file system that has hard links; NFS may answer a retried `link` that did succeed with
"exists", so success is read from the temporary file's link count (2), as `open(2)` advises for
NFS. Unlike `O_CREAT|O_EXCL`, no reader ever finds the lock file empty or half written. Where the
file system has no hard links (some FUSE and SMB mounts), `O_CREAT|O_EXCL` is the fallback; a lock
file that cannot be parsed counts as held until it is as old as a stale one. `flock` is not used:
it is not shared between the nodes of a cluster on every NFS setup, and not on Lustre without
`-o flock`.

A lock is stale when its holder is gone:
- held on this host: its pid does not exist, is a zombie, or is another process than the one that
  took the lock (the start time recorded, from `/proc`, differs: a pid reused after a reboot or a
  wrap-around is not the holder);
- held on another host (whose processes cannot be seen from here): its holder refreshes the lock
  file's modification time every `HEARTBEAT_S`, and a lock not refreshed for `STALE_AFTER_S` is
  stale. Ages are taken against the file system's clock (the modification time of a file this
  process has just written beside the lock), not this host's, so clock skew between nodes does not
  matter. A holder stopped for longer (Ctrl-Z) can lose its lock; it logs a warning when it sees that.

A stale lock is broken under a second lock (`STORE.lock.break`, made the same way, held for
microseconds): whoever holds it checks that the lock is still the stale one it judged, removes it
and creates its own. Two processes that find the same stale lock at once therefore end with exactly
one holder; without the second lock, the later one could remove the lock the earlier one had just
made (Mercurial breaks its repository locks this way).

A thread that holds a lock may take it again (predict's conversion runs inside predict's lock); the
lock is released when the outermost block ends, and only if the file is still this holder's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ichdata.errors import UserError

__all__ = ["HEARTBEAT_S", "STALE_AFTER_S", "Holder", "StoreLocked", "lock_path", "store_lock"]

_log = logging.getLogger(__name__)

#: How often a holder refreshes its lock file's modification time (seconds).
HEARTBEAT_S = 30.0
#: Age (seconds, by the file system's clock) after which a lock of another host's process is stale.
STALE_AFTER_S = 600.0
#: How long to wait for another process that is breaking the same stale lock (it takes microseconds).
_BREAK_WAIT_S = 10.0


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock file records.

    `start` identifies the process beyond its pid (`boot id:start time in clock ticks` on Linux; ""
    where `/proc` is not there); `since` is when it took the lock (UTC, ISO 8601); `token` is unique
    to this taking of the lock.
    """

    host: str
    pid: int
    start: str
    since: str
    command: str
    token: str

    def describe(self) -> str:
        """`ich convert (pid 4242 on node07, since 2026-01-01T10:00:00+00:00)`."""
        return f"{self.command} (pid {self.pid} on {self.host}, since {self.since})"


class StoreLocked(UserError):
    """Another process writes the store (or output group): the message names it and what to do."""

    def __init__(self, path: Path, lock: Path, holder: Holder | None, *, breaking: bool = False) -> None:
        if holder is None:
            who = "a process that left no readable record"
            gone = f"if no ich command is writing it, remove {lock}"
        elif holder.host == _host():
            who = holder.describe()
            gone = "wait for it to finish or stop it; if it is killed, the next run takes the lock over"
        else:
            who = holder.describe()
            gone = (
                "wait for it to finish or stop it; if it is gone, the lock is taken over once "
                f"{STALE_AFTER_S / 60:.0f} minutes have passed without its heartbeat"
            )
        if breaking:
            gone = "another process is taking its stale lock over; try again"
        super().__init__(f"{path}: locked by {who}; {gone} (lock file {lock})")
        self.path, self.lock, self.holder = path, lock, holder


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file of the store (or output group) at `path`: `PATH.lock` beside it.

    Symlinks are resolved first, so that every name of one store gives the same lock.
    """
    real = Path(os.path.realpath(path))
    return real.with_name(real.name + ".lock")


# Per thread: the lock files this thread holds, with how many blocks hold each.
_held = threading.local()


@contextlib.contextmanager
def store_lock(path: str | os.PathLike[str], *, command: str) -> Iterator[Holder]:
    """Hold the one-writer lock of the store (or output group) at `path` while the block runs.

    `command` names the holder in other processes' refusals (e.g. `"ich convert"`). Yields this
    holder's record. Taking the lock writes nothing but the lock file; a refusal writes nothing.

    Raises:
        StoreLocked: another live process holds it (the message names it, and what to do).
        UserError: the folder that would hold the lock file does not exist.
    """
    lock = lock_path(path)
    held: dict[str, tuple[Holder, int]] = _held.__dict__.setdefault("locks", {})
    key = str(lock)
    if key in held:  # this thread holds it already: an inner block of the same writer
        me, depth = held[key]
        held[key] = (me, depth + 1)
        try:
            yield me
        finally:
            held[key] = (held[key][0], held[key][1] - 1)
        return
    if not lock.parent.is_dir():
        raise UserError(f"{path}: the folder {lock.parent} does not exist; create it first")
    me = _acquire(Path(path), lock, command)
    held[key] = (me, 1)
    beat = _Heartbeat(lock, me)
    beat.start()
    try:
        yield me
    finally:
        del held[key]
        beat.stop()
        _release(lock, me)


# -------------------------------------------------------------------------------------------- holders


def _host() -> str:
    return socket.gethostname()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The identity of the live process `pid` beyond its number; None when there is none.

    `boot id:start time in clock ticks` from `/proc/PID/stat` (a zombie is gone); "" where `/proc` is
    not there and the process exists (then only its pid can be compared).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""
    except OSError:
        return ""
    # Fields after the command name (which may hold spaces and parentheses): state is field 3 and
    # the start time field 22 of proc(5).
    rest = stat[stat.rindex(")") + 2 :].split()
    if rest[0] in ("Z", "X"):
        return None
    return f"{_boot_id()}:{rest[19]}"


def _me(command: str) -> Holder:
    pid = os.getpid()
    return Holder(
        host=_host(),
        pid=pid,
        start=_process_start(pid) or "",
        since=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        command=command,
        token=uuid.uuid4().hex,
    )


def _alive(holder: Holder) -> bool:
    """Whether `holder`, a process of this host, is still the process that took the lock."""
    now = _process_start(holder.pid)
    return now is not None and not (holder.start and now and now != holder.start)


# ----------------------------------------------------------------------------------------- lock files


@dataclass(frozen=True)
class _Found:
    """A lock file as read: its holder (None if unreadable), its inode and its age by the fs clock."""

    holder: Holder | None
    inode: int
    mtime: float


def _read(lock: Path) -> _Found | None:
    """The lock file at `lock`, or None when there is none."""
    try:
        st = lock.stat()
        text = lock.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(text)
        holder: Holder | None = Holder(**fields) if isinstance(fields, dict) else None
    except (ValueError, TypeError):
        holder = None
    return _Found(holder, st.st_ino, st.st_mtime)


def _create(lock: Path, me: Holder) -> tuple[bool, float]:
    """Create `lock` holding `me`, atomically: whether this call made it, and the fs clock's now."""
    record = json.dumps(asdict(me)) + "\n"
    tmp = lock.with_name(f".{lock.name}.{me.host}.{me.pid}.{me.token[:12]}.tmp")
    try:
        tmp.write_text(record, encoding="utf-8")
        now = tmp.stat().st_mtime
        try:
            os.link(tmp, lock)
        except FileExistsError:
            return tmp.stat().st_nlink == 2, now  # NFS: a retried link that had succeeded
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                raise
            return _create_exclusive(lock, record), now
        return True, now
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(lock: Path, record: str) -> bool:
    """`O_CREAT|O_EXCL`, for file systems without hard links."""
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(record)
    return True


def _stale(found: _Found, now: float) -> bool:
    """Whether the lock `found` has lost its holder (see the module docstring); `now`: the fs clock's."""
    h = found.holder
    if h is not None and h.host == _host():
        return not _alive(h)
    return now - found.mtime > STALE_AFTER_S


def _same(a: _Found, b: _Found) -> bool:
    if a.holder is None or b.holder is None:
        return a.holder is None and b.holder is None and (a.inode, a.mtime) == (b.inode, b.mtime)
    return a.inode == b.inode and a.holder.token == b.holder.token


def _acquire(path: Path, lock: Path, command: str) -> Holder:
    me = _me(command)
    deadline = time.monotonic() + _BREAK_WAIT_S
    while True:
        made, now = _create(lock, me)
        if made:
            return me
        found = _read(lock)
        if found is None:
            continue  # released between our attempt and the read: try again
        if not _stale(found, now):
            raise StoreLocked(path, lock, found.holder)
        if not _break(lock, found, me):
            # Another process is breaking it: it takes microseconds unless that process was stopped.
            if time.monotonic() > deadline:
                raise StoreLocked(path, lock, found.holder, breaking=True)
            time.sleep(0.05)


def _break(lock: Path, judged: _Found, me: Holder, depth: int = 0) -> bool:
    """Remove the stale lock `judged` if it is still there, holding `LOCK.break` meanwhile.

    Returns False when another process holds `LOCK.break` (it is breaking the same lock).
    """
    brk = lock.with_name(lock.name + ".break")
    mine = Holder(me.host, me.pid, me.start, me.since, f"{me.command} (taking over a stale lock)", me.token)
    made, now = _create(brk, mine)
    if not made:
        other = _read(brk)
        if other is not None and depth < 2 and _stale(other, now):
            _break(brk, other, me, depth + 1)  # its breaker died in the microseconds it held it
        return False
    try:
        current = _read(lock)
        if current is not None and _same(current, judged):
            lock.unlink(missing_ok=True)
            _log.warning(
                "%s: took over the lock of %s, which is gone",
                lock,
                judged.holder.describe() if judged.holder else "an unknown process",
            )
        return True
    finally:
        _release(brk, mine)


def _release(lock: Path, me: Holder) -> None:
    """Remove `lock` if it is still `me`'s (a holder that lost it leaves the new holder's lock alone)."""
    found = _read(lock)
    if found is not None and found.holder is not None and found.holder.token == me.token:
        lock.unlink(missing_ok=True)


class _Heartbeat(threading.Thread):
    """Refreshes the lock file's modification time every `HEARTBEAT_S`, so that it never looks stale.

    Stops refreshing (with a warning) once the file is no longer this holder's.
    """

    def __init__(self, lock: Path, me: Holder) -> None:
        super().__init__(name="ich-lock-heartbeat", daemon=True)
        self.lock, self.me = lock, me
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(HEARTBEAT_S):
            found = _read(self.lock)
            if found is None or found.holder is None or found.holder.token != self.me.token:
                _log.warning(
                    "%s: this process (%s) no longer holds the lock: it was taken over while this "
                    "process did not refresh it",
                    self.lock,
                    self.me.describe(),
                )
                return
            with contextlib.suppress(OSError):
                os.utime(self.lock)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
