"""`ich listen`: a real `ich listen` on 127.0.0.1, sent to by pynetdicom's SCU, converted as `ich pull`'s landing."""

from __future__ import annotations

import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, MRImageStorage
from pynetdicom import AE

from ichdata import landing
from ichdata.config import ConvertConfig
from ichdata.convert import convert
from ichdata.listen import VERIFICATION
from ichdata.testing import HospitalStudy, stored_from_hu, write_ct_slice, write_hospital_studies

ICH = str(Path(sys.executable).parent / "ich")
WAIT_S = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Listener:
    """A running `ich listen` subprocess and its stdout, line by line."""

    def __init__(self, land: Path, *args: str, quiet: float = 0.3) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [ICH, "listen", str(land), "--port", str(self.port), "--quiet", str(quiet), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.expect("listening on 127.0.0.1:")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, start: str) -> str:
        """The next stdout line that starts with `start` (the lines before it are kept in `seen`)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line {start!r} from ich listen; got {self.seen}") from None
            self.seen.append(line)
            if line.startswith(start):
                return line

    def stop(self, signum: int) -> tuple[int, str]:
        """Send `signum`; the exit status and stderr. The stdout lines left are read into `seen`."""
        self.proc.send_signal(signum)
        self.proc.wait(timeout=WAIT_S)
        self.reader.join(timeout=WAIT_S)  # stdout read to its end
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.proc.returncode, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=WAIT_S)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def listening(land: Path, *args: str, quiet: float = 0.3) -> Iterator[Listener]:
    listener = Listener(land, *args, quiet=quiet)
    try:
        yield listener
    finally:
        listener.close()


def _associate(port: int, calling: str = "SCANNER", called: str = "ICH", mr: bool = False) -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")  # as the files are: sent as they are
    ae.add_requested_context(VERIFICATION)
    if mr:
        ae.add_requested_context(MRImageStorage)
    return ae.associate("127.0.0.1", port, ae_title=called)


def _send(port: int, files: tuple[Path, ...] | list[Path]) -> None:
    assoc = _associate(port)
    assert assoc.is_established
    try:
        for f in files:
            assert assoc.send_c_store(f).Status == 0x0000
    finally:
        assoc.release()


def _dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta: the dataset as encoded (PS3.10 7.1: group length first)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00"
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


def _in_view(land: Path, study: HospitalStudy) -> list[Path]:
    return sorted((land / study.study_uid).glob("*/*.dcm"))


@pytest.fixture
def hospital(tmp_path: Path) -> list[HospitalStudy]:
    return write_hospital_studies(tmp_path / "src", studies=2, slices=4, image_size=64)


def test_a_study_appears_whole_after_its_association_as_sent_and_converts_as_its_files(
    hospital: list[HospitalStudy], tmp_path: Path, assert_same_content: Callable[[Path, Path], None]
) -> None:
    land = tmp_path / "landing"
    first, second = hospital
    with listening(land) as listener:
        assoc = _associate(listener.port)
        for f in first.files:
            assert assoc.send_c_store(f).Status == 0x0000
        # every instance is written, the quiet period passes, but the association is still open
        incoming = landing.incoming_dir(land) / first.study_uid
        assert len(list(incoming.glob("*/*.dcm"))) == 4
        time.sleep(1.0)
        assert not (land / first.study_uid).exists()
        assert listener.lines.empty()
        assoc.release()
        assert listener.expect("received study ") == f"received study {first.study_uid}: 4 instances"
        _send(listener.port, second.files)
        assert listener.expect("received study ") == f"received study {second.study_uid}: 4 instances"

    assert sorted(p.name for p in land.iterdir()) == sorted(
        [landing.INCOMING, first.study_uid, second.study_uid]
    )
    assert not any(landing.incoming_dir(land).iterdir())
    for study in hospital:
        received = {p.stem: p for p in _in_view(land, study)}
        assert sorted(received) == sorted(study.sop_uids)
        for sop, sent in zip(study.sop_uids, study.files, strict=True):
            assert _dataset_bytes(received[sop]) == _dataset_bytes(sent), sop
    # no patient name or ID in what the listener printed
    assert not [m for s in hospital for m in (s.patient_name, s.patient_id) if m in "\n".join(listener.seen)]

    a, b = tmp_path / "received.zarr", tmp_path / "files.zarr"
    convert(ConvertConfig(land, a), progress=False)
    convert(ConvertConfig(tmp_path / "src", b), progress=False)
    assert_same_content(a, b)


def test_more_instances_of_a_published_study_join_it_and_replace_none(tmp_path: Path) -> None:
    land = tmp_path / "landing"
    (study,) = write_hospital_studies(tmp_path / "a", studies=1, slices=4)
    # the same UIDs with one more slice; the phantom differs, so the first four files' bytes differ
    (again,) = write_hospital_studies(tmp_path / "b", studies=1, slices=5)
    assert again.sop_uids[:4] == study.sop_uids
    assert again.files[0].read_bytes() != study.files[0].read_bytes()
    with listening(land) as listener:
        _send(listener.port, study.files)
        listener.expect(f"received study {study.study_uid}: 4 instances")
        before = {p: p.read_bytes() for p in _in_view(land, study)}
        _send(listener.port, again.files)
        assert listener.expect("received study ") == f"received study {study.study_uid}: 1 instances"
        code, err = listener.stop(signal.SIGINT)
    assert code == 130
    assert err.strip() == "ich: interrupted"
    after = _in_view(land, study)
    assert sorted(p.stem for p in after) == sorted(again.sop_uids)
    assert {p: p.read_bytes() for p in after if p in before} == before  # nothing in view replaced
    assert not any(landing.incoming_dir(land).iterdir())
    assert "received 9 instances (4 already held, 0 refused); published 2 studies in" in listener.seen[-1]


def test_other_sop_classes_callers_and_bad_uids_are_refused(
    hospital: list[HospitalStudy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    land = tmp_path / "landing"
    bad = tmp_path / "bad.dcm"
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    write_ct_slice(
        bad,
        stored_from_hu(np.zeros((8, 8), np.float32)),
        image_id="1.2.3.4",
        study_uid="../../escaped",
        series_uid="1.2.3",
        patient_id="MRN0",
        image_position=(0.0, 0.0, 0.0),
    )
    outside = sorted(tmp_path.rglob("*"))
    with listening(land, "--allow-ae", "SCANNER", "--allow-ae", "PACS") as listener:
        assert not _associate(listener.port, calling="STRANGER").is_established
        assert not _associate(listener.port, called="NOT-ICH").is_established
        assoc = _associate(listener.port, mr=True)
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert accepted == {CTImageStorage, VERIFICATION}
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(bad).Status == 0xC000
        assoc.release()
        code, err = listener.stop(signal.SIGTERM)
    assert code == 143
    assert err.splitlines() == [
        "ich listen: refused an instance from AE 'SCANNER': its Study Instance UID is missing or not a UID; "
        "nothing written",
        "ich: terminated",
    ]
    assert sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(land)) == outside
    assert [p for p in land.rglob("*") if p.is_file()] == []
    assert "received 0 instances (0 already held, 1 refused); published 0 studies in" in listener.seen[-1]


def test_a_stop_publishes_released_studies_and_a_restart_the_ones_cut_off(
    hospital: list[HospitalStudy], tmp_path: Path
) -> None:
    land = tmp_path / "landing"
    first, second = hospital
    with listening(land, quiet=600) as listener:
        _send(listener.port, second.files)  # released, but the quiet period is far off
        assoc = _associate(listener.port)
        for f in first.files[:2]:
            assert assoc.send_c_store(f).Status == 0x0000
        code, err = listener.stop(signal.SIGTERM)  # while `first` is still being sent
    assert code == 143
    assert err.strip() == "ich: terminated"
    assert listener.seen[1:-1] == [f"received study {second.study_uid}: 4 instances"]
    assert (
        f"published 1 studies, 1 left in {landing.incoming_dir(land)} for the next run" in listener.seen[-1]
    )
    assert len(_in_view(land, second)) == 4
    assert not (land / first.study_uid).exists()
    assert len(list((landing.incoming_dir(land) / first.study_uid).glob("*/*.dcm"))) == 2

    with listening(land, quiet=0.2) as again:
        assert again.expect("received study ") == f"received study {first.study_uid}: 2 instances"
        _send(again.port, first.files[2:])
        assert again.expect("received study ") == f"received study {first.study_uid}: 2 instances"
    assert sorted(p.stem for p in _in_view(land, first)) == sorted(first.sop_uids)
    assert not any(landing.incoming_dir(land).iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "--port 0: expected a TCP port from 1 to 65535"),
        (["--port", "70000"], "--port 70000: expected a TCP port from 1 to 65535"),
        (["--ae-title", "A" * 17], "--ae-title 'AAAAAAAAAAAAAAAAA': an AE title is 1 to 16 printable ASCII"),
        (["--ae-title", "ICHÉ"], "--ae-title 'ICHÉ': an AE title is 1 to 16 printable ASCII"),
        (["--allow-ae", "a\\b"], "--allow-ae 'a\\\\b': an AE title is 1 to 16 printable ASCII"),
        (["--quiet", "-1"], "--quiet -1.0: expected seconds, 0 or more"),
    ],
)
def test_each_mistake_is_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    assert main(["listen", str(tmp_path / "landing"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ich: error: {message}"), err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "landing").exists()


def test_a_missing_parent_or_a_port_in_use_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    missing = tmp_path / "no" / "landing"
    assert main(["listen", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"ich: error: LANDING {missing}: its folder {missing.parent} does not exist; create it first\n"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["listen", str(tmp_path / "landing"), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"ich: error: --port {port}: already in use on 127.0.0.1; stop what listens there or choose another port\n"
    )


def test_publish_joins_a_study_in_view_and_replaces_no_file_there(tmp_path: Path) -> None:
    landing.write_instance(tmp_path, "1.2", "1.2.3", "1.2.3.4", b"first")
    landing.publish(tmp_path, "1.2", ())
    landing.write_instance(tmp_path, "1.2", "1.2.3", "1.2.3.4", b"the same instance again")
    landing.write_instance(tmp_path, "1.2", "1.2.3", "1.2.3.5", b"a new one")
    assert landing.publish(tmp_path, "1.2", ())
    series = tmp_path / "1.2" / "1.2.3"
    assert {p.name: p.read_bytes() for p in series.iterdir()} == {
        "1.2.3.4.dcm": b"first",
        "1.2.3.5.dcm": b"a new one",
    }
    assert not (landing.incoming_dir(tmp_path) / "1.2").exists()
