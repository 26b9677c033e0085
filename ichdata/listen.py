"""`ich listen LANDING`: a DICOM C-STORE receiver for a PACS or modality that pushes its studies.

It accepts CT Image Storage and Enhanced CT Image Storage (and Verification, C-ECHO) in any transfer
syntax pynetdicom accepts, and writes each instance as it came (the file meta, then the dataset's
bytes as sent: nothing is decoded and encoded again) into the landing layout `ich pull` writes
(`ichdata.landing`): first under `LANDING/.ich-incoming/<study>/…`, then in view once every
association that sent the study has ended and `--quiet` seconds passed since the later of its last
instance and that end. More instances of a published study go through the incoming folder again and
join it (`landing.publish` never overwrites a file in view), so a later `ich convert` appends them.
On Ctrl-C or SIGTERM the server stops, the studies whose associations had ended are published and
the others stay incoming; the next `ich listen` on LANDING publishes what it finds there after the
quiet period. Studies are named by their Study Instance UID (as `ich pull` names them), never by a
patient's name or ID. pynetdicom is imported when the server starts, so `ich --help` stays light.
"""

from __future__ import annotations

import errno
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ichdata import landing as _landing
from ichdata.errors import UserError
from ichdata.options import option

__all__ = ["VERIFICATION", "ListenConfig", "ListenResult", "check_ae_title", "listen"]

# C-STORE statuses (PS3.4 B.2.3): out of resources, and "cannot understand" for a dataset we refuse.
_OUT_OF_RESOURCES = 0xA700
_CANNOT_UNDERSTAND = 0xC000
VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (C-ECHO), PS3.4 A.4
_GRACE_S = 1.0  # on a stop, how long associations that are ending may take to end
_UIDS = (
    ("StudyInstanceUID", "Study Instance UID"),
    ("SeriesInstanceUID", "Series Instance UID"),
    ("SOPInstanceUID", "SOP Instance UID"),
)


def _raw_text(ds: Any, keyword: str) -> str:
    """The element's value as sent, undecoded: pydicom's checks would warn with the value on stderr."""
    from pydicom.datadict import tag_for_keyword

    elem = ds.get_item(tag_for_keyword(keyword))
    value = None if elem is None else elem.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    return "" if value is None else str(value)


def check_ae_title(title: str, what: str) -> str:
    """`title` if it is an AE title (1-16 printable ASCII characters, no backslash); `UserError` otherwise."""
    stripped = title.strip(" ")
    if not stripped or len(title) > 16 or any(not " " <= c <= "~" or c == "\\" for c in title):
        raise UserError(
            f"{what} {title[:40]!r}: an AE title is 1 to 16 printable ASCII characters without a backslash"
        )
    return stripped


@dataclass(frozen=True)
class ListenConfig:
    """The options of `ich listen`."""

    landing: Path = option(
        positional=True, metavar="LANDING", help="landing folder: one folder per received study (created)"
    )
    port: int = option(11112, metavar="PORT", help="TCP port to listen on (default 11112)")
    host: str = option(
        "127.0.0.1", metavar="ADDRESS", help="address to bind (default 127.0.0.1: this machine only)"
    )
    ae_title: str = option(
        "ICH", metavar="AE", help="our AE title; associations calling another are rejected"
    )
    allow_ae: list[str] | None = option(
        None, metavar="AE", help="accept associations only from this calling AE title (repeatable)"
    )
    quiet: float = option(
        30.0,
        metavar="S",
        help="publish a study S seconds after its last instance and association (default 30)",
    )

    def check(self) -> None:
        """The checks made before the server starts, each a one-line `UserError`."""
        if not 1 <= self.port <= 65535:
            raise UserError(f"--port {self.port}: expected a TCP port from 1 to 65535")
        check_ae_title(self.ae_title, "--ae-title")
        for title in self.allow_ae or ():
            check_ae_title(title, "--allow-ae")
        if not self.quiet >= 0:
            raise UserError(f"--quiet {self.quiet}: expected seconds, 0 or more")
        if self.landing.exists() and not self.landing.is_dir():
            raise UserError(f"LANDING {self.landing}: is a file; expected a folder (created if missing)")
        parent = self.landing.absolute().parent
        if not parent.is_dir():
            raise UserError(f"LANDING {self.landing}: its folder {parent} does not exist; create it first")


@dataclass
class ListenResult:
    """What a listener received and did, for the summary line on exit."""

    landing: Path
    instances: int = 0
    duplicates: int = 0  # instances LANDING already held in view: acknowledged, not written again
    refused: int = 0
    published: int = 0  # publications (a study published twice counts twice)
    left: list[str] = field(default_factory=list)  # studies left incoming for the next run
    elapsed_s: float = 0.0

    def __str__(self) -> str:
        left = (
            f", {len(self.left)} left in {_landing.incoming_dir(self.landing)} for the next run"
            if self.left
            else ""
        )
        return (
            f"received {self.instances:,} instances ({self.duplicates} already held, {self.refused} refused); "
            f"published {self.published} studies{left} in {self.elapsed_s:.0f} s -> {self.landing}"
        )


@dataclass
class _Study:
    """A study with instances incoming: who is sending it and since when it is quiet."""

    last: float  # time.monotonic() of the last instance or of the end of an association that sent it
    pending: int = 0  # instances incoming, not yet published
    senders: set[int] = field(default_factory=set)  # id() of the open associations that sent it
    lock: threading.Lock = field(default_factory=threading.Lock)  # a write and a publish never overlap


class _Receiver:
    """The state shared by the association threads (C-STORE, connection closed) and the main thread."""

    def __init__(self, landing: Path, log: Callable[[str], None]) -> None:
        self.landing = landing
        self.log = log
        self.lock = threading.Lock()
        self.studies: dict[str, _Study] = {}
        self.result = ListenResult(landing=landing)

    def adopt_leftovers(self) -> None:
        """Take in the studies an earlier run left incoming, quiet since their newest file was written."""
        incoming = _landing.incoming_dir(self.landing)
        if not incoming.is_dir():
            return
        now_wall, now = time.time(), time.monotonic()
        for folder in sorted(incoming.iterdir()):
            try:
                _landing.check_uid(folder.name, "Study Instance UID")
            except ValueError:
                continue  # not ours to publish
            files = [f for f in folder.glob("*/*.dcm") if not f.name.startswith(".")]
            if files:
                newest = max(f.stat().st_mtime for f in files)
                self.studies[folder.name] = _Study(last=now - max(0.0, now_wall - newest), pending=len(files))

    def on_store(self, event: Any) -> int:
        """C-STORE: check the UIDs, write the instance as sent into the study's incoming folder."""
        try:
            ds = event.dataset
            uids = [_raw_text(ds, keyword) for keyword, _ in _UIDS]
        except Exception:  # a dataset pydicom cannot parse
            return self._refuse(event, "its dataset cannot be read")
        for uid, (_, what) in zip(uids, _UIDS, strict=True):
            try:
                _landing.check_uid(uid, what)
            except ValueError:
                # The value is not named: it came from the sender and may be anything.
                return self._refuse(event, f"its {what} is missing or not a UID")
        study_uid, series_uid, sop_uid = uids
        with self.lock:
            study = self.studies.setdefault(study_uid, _Study(last=time.monotonic()))
            study.senders.add(id(event.assoc))
        with study.lock:
            in_view = self.landing / study_uid / series_uid / f"{sop_uid}.dcm"
            try:
                if in_view.exists():
                    with self.lock:
                        self.result.instances += 1
                        self.result.duplicates += 1
                        study.last = time.monotonic()
                    return 0x0000
                again = (_landing.incoming_dir(self.landing) / study_uid / series_uid / in_view.name).exists()
                _landing.write_instance(self.landing, study_uid, series_uid, sop_uid, event.encoded_dataset())
            except OSError as exc:
                why = "no space left" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
                self.log(f"ich listen: study {study_uid}: an instance could not be written ({why})")
                return _OUT_OF_RESOURCES
            with self.lock:
                study.pending += 0 if again else 1
                study.last = time.monotonic()
                self.result.instances += 1
        return 0x0000

    def _refuse(self, event: Any, why: str) -> int:
        with self.lock:
            self.result.refused += 1
        calling = str(event.assoc.requestor.ae_title)[:16]
        self.log(f"ich listen: refused an instance from AE {calling!r}: {why}; nothing written")
        return _CANNOT_UNDERSTAND

    def on_close(self, event: Any) -> None:
        """An association ended (released or aborted): its studies' quiet period starts now."""
        sender, now = id(event.assoc), time.monotonic()
        with self.lock:
            for study in self.studies.values():
                if sender in study.senders:
                    study.senders.discard(sender)
                    study.last = max(study.last, now)

    def publish_quiet(
        self, quiet: float, out: Callable[[str], None], *, skip: frozenset[str] = frozenset()
    ) -> None:
        """Publish each study no association is sending and quiet for `quiet` seconds (not in `skip`)."""
        now = time.monotonic()
        with self.lock:
            ready = [
                (uid, s)
                for uid, s in self.studies.items()
                if not s.senders and s.pending and now - s.last >= quiet and uid not in skip
            ]
        for uid, study in ready:
            with study.lock:
                with self.lock:
                    if study.senders:  # a new association began sending it meanwhile
                        continue
                    count, study.pending = study.pending, 0
                _landing.publish(self.landing, uid, ())
            with self.lock:
                self.result.published += 1
            out(f"received study {uid}: {count} instances")


def listen(
    config: ListenConfig,
    *,
    out: Callable[[str], None] = print,
    log: Callable[[str], None] | None = None,
    ready: Callable[[str], None] | None = None,
) -> ListenResult:
    """What `ich listen` runs: serve C-STORE until Ctrl-C or SIGTERM, publishing studies as they go quiet.

    `out` gets one line per published study and the summary on exit (also when a signal ends it: the
    `KeyboardInterrupt` is raised again after), `log` a line per refused or failed instance (stderr by
    default), `ready` one line once the port is bound. Raises `UserError` for the mistakes of
    `ListenConfig.check` and a port that cannot be bound.
    """
    from pydicom.uid import CTImageStorage, EnhancedCTImageStorage
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

    started = time.monotonic()
    config.check()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    landing = Path(config.landing)
    landing.mkdir(exist_ok=True)
    receiver = _Receiver(landing, log)
    receiver.adopt_leftovers()

    ae = AE(ae_title=check_ae_title(config.ae_title, "--ae-title"))
    ae.require_called_aet = True
    if config.allow_ae:
        ae.require_calling_aet = [check_ae_title(t, "--allow-ae") for t in config.allow_ae]
    for sop_class in (CTImageStorage, EnhancedCTImageStorage):
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(VERIFICATION)
    handlers: list[Any] = [(evt.EVT_C_STORE, receiver.on_store)]
    # Released and aborted fire in the association's own thread, before it ends (what a stop waits
    # for); a connection closed without either (the peer vanished) still ends the association here.
    handlers += [(e, receiver.on_close) for e in (evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_CONN_CLOSE)]
    try:
        server = ae.start_server((config.host, config.port), block=False, evt_handlers=handlers)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(
                f"--port {config.port}: already in use on {config.host}; stop what listens there or choose "
                "another port"
            ) from None
        raise UserError(
            f"--host {config.host} --port {config.port}: cannot listen there ({exc.strerror})"
        ) from None
    assert server is not None  # block=False returns the server
    if ready is not None:
        ready(f"listening on {config.host}:{config.port} as {config.ae_title.strip()} -> {landing}")
    tick = max(0.05, min(1.0, config.quiet / 4))
    try:
        while True:
            receiver.publish_quiet(config.quiet, out)
            time.sleep(tick)
    except KeyboardInterrupt:
        # Stop accepting; the studies still being sent stay incoming (their senders are cut off and
        # will send again), the others are complete as far as anyone can tell: publish them now.
        # An association being released as the signal came gets a moment to end as released.
        server.shutdown()
        deadline = time.monotonic() + _GRACE_S
        for assoc in server.active_associations:
            assoc.join(max(0.0, deadline - time.monotonic()))
        with receiver.lock:
            cut = frozenset(uid for uid, s in receiver.studies.items() if s.senders)
        for assoc in server.active_associations:
            assoc.abort()
        receiver.publish_quiet(0.0, out, skip=cut)
        _finish(receiver, started, out)
        raise
    finally:
        ae.shutdown()


def _finish(receiver: _Receiver, started: float, out: Callable[[str], None]) -> None:
    result = receiver.result
    result.left = sorted(uid for uid, s in receiver.studies.items() if s.pending)
    result.elapsed_s = time.monotonic() - started
    out(str(result))
