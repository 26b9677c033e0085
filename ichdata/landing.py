"""A landing folder: where `ich pull` puts studies for `ich convert` to find, one study at a time.

Complete studies lie in view as `LANDING/<study uid>/<series uid>/<sop instance uid>.dcm`. A study
being fetched lies under `LANDING/.ich-incoming/<study uid>/…`, which the conversion never scans
(`ichdata.convert.excluded_paths`); each instance is written under a temporary name and renamed, and
the study's series move into view only when every instance the archive lists for the study is there
(`publish`; `ich listen` publishes a study once its sender has gone quiet). So a conversion running
beside a pull never meets half a study or half a file, and a pull that was stopped resumes from the
instances it had written. UIDs become file names only after
`check_uid`: an archive's answer never names a path outside LANDING.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from ichdata.atomic import write_bytes_atomic

__all__ = ["INCOMING", "check_uid", "held_instances", "incoming_dir", "publish", "write_instance"]

#: The folder under LANDING where studies are fetched before they move into view.
INCOMING = ".ich-incoming"
_SUFFIX = ".dcm"
# DICOM UIDs are digits and dots (PS3.5 9.1); RSNA-style `ID_…` ids are letters, digits and `_`. A
# name must not start with a dot (hidden, `.`, `..`) and holds no separator.
_UID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}")


def check_uid(uid: str, what: str) -> str:
    """`uid` if it can name a file or folder here; ValueError naming `what` otherwise."""
    if not _UID.fullmatch(uid):
        raise ValueError(f"{what} {uid[:80]!r} is not a UID (digits and dots, at most 64 characters)")
    return uid


def incoming_dir(landing: str | os.PathLike[str]) -> Path:
    """`LANDING/.ich-incoming`: studies being fetched, out of the conversion's view."""
    return Path(landing) / INCOMING


def _instance_path(study_dir: Path, series_uid: str, sop_uid: str) -> Path:
    return (
        study_dir
        / check_uid(series_uid, "Series Instance UID")
        / (check_uid(sop_uid, "SOP Instance UID") + _SUFFIX)
    )


def held_instances(landing: str | os.PathLike[str], study_uid: str) -> set[str]:
    """The SOP Instance UIDs of `study_uid` that LANDING holds, in view or still incoming."""
    check_uid(study_uid, "Study Instance UID")
    held: set[str] = set()
    for root in (Path(landing) / study_uid, incoming_dir(landing) / study_uid):
        if not root.is_dir():
            continue
        for series in root.iterdir():
            if series.is_dir() and not series.name.startswith("."):
                held.update(
                    f.name[: -len(_SUFFIX)]
                    for f in series.iterdir()
                    if f.name.endswith(_SUFFIX) and not f.name.startswith(".")
                )
    return held


def write_instance(
    landing: str | os.PathLike[str], study_uid: str, series_uid: str, sop_uid: str, data: bytes
) -> Path:
    """Write one instance's Part 10 bytes into the study's incoming folder, atomically; returns its path."""
    study_dir = incoming_dir(landing) / check_uid(study_uid, "Study Instance UID")
    path = _instance_path(study_dir, series_uid, sop_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
    return path


def publish(landing: str | os.PathLike[str], study_uid: str, expected: Iterable[str]) -> bool:
    """Move the study's incoming series into view once LANDING holds every one of `expected`.

    `expected` are the SOP Instance UIDs the archive lists for the study. A series new to the view
    moves as one folder (one rename: a conversion sees all of it or none); instances of a series
    already in view move one by one, and one already in view is never replaced (the incoming copy of
    the same SOP Instance UID is dropped). Returns whether the study is complete in view.
    """
    check_uid(study_uid, "Study Instance UID")
    if not set(expected) <= held_instances(landing, study_uid):
        return False
    incoming = incoming_dir(landing) / study_uid
    if not incoming.is_dir():
        return True
    view = Path(landing) / study_uid
    view.mkdir(exist_ok=True)
    for series in sorted(incoming.iterdir()):
        if not series.is_dir():
            continue
        target = view / series.name
        if not target.exists():
            os.replace(series, target)
            continue
        for f in sorted(series.iterdir()):
            if f.name.endswith(_SUFFIX) and not f.name.startswith("."):
                if (target / f.name).exists():
                    f.unlink()  # the same instance again: the one in view (maybe converted) stays
                else:
                    os.replace(f, target / f.name)
        _remove_empty(series)
    _remove_empty(incoming)
    return True


def _remove_empty(folder: Path) -> None:
    """Remove `folder` if nothing but our own temporary files is left in it."""
    for f in folder.iterdir():
        if not (f.name.startswith(".") and f.name.endswith(".tmp")):
            return
    for f in folder.iterdir():
        f.unlink(missing_ok=True)
    folder.rmdir()
