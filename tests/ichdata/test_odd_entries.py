"""Odd entries in SOURCE: each is accounted for in the quarantine, and the conversion goes on.

Non-UTF-8 names, symbolic link loops, dangling links, FIFOs, paths longer than the OS opens and
folders the user cannot read (issue 11 item 5). Names are kept losslessly (`ichdata.paths`).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ichdata.config import ConvertConfig
from ichdata.convert import convert, convert_shards
from ichdata.finalize import finalize
from ichdata.paths import fs_path, path_text
from ichdata.plan import plan
from ichdata.scan import scan, walk
from ichdata.store import open_store, quarantine_csv_path
from ichdata.verify import verify_store

LATIN1 = os.fsdecode(b"caf\xe9")  # a Latin-1 name: not valid UTF-8


def _deep_file(root: Path, name_len: int = 250, depth: int = 20) -> str:
    """A file under folders nested deeper than PATH_MAX; returns the deepest listable folder's text path.

    Made with `dir_fd`, since no path to it can be opened.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    parts: list[str] = []
    try:
        for k in range(depth):
            name = f"{k:02d}" + "d" * (name_len - 2)
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            parts.append(name)
        f = os.open("deep.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, b"x")
        os.close(f)
    finally:
        os.close(fd)
    return "/".join(parts)


@pytest.fixture(scope="module")
def odd_source(tmp_path_factory, convert_inputs) -> tuple[Path, dict[str, str]]:
    """A source with good series and one entry of each odd kind; returns it and reason -> text path."""
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("odd") / "src"
    written = convert_inputs.write_case(root, "axial", rng, n=3)
    convert_inputs.write_case(root, "tilted", rng, n=3)
    # A slice with a Latin-1 name is stored, under its name.
    os.rename(root / written[0].path, root / "axial" / (LATIN1 + ".dcm"))
    # A non-DICOM file whose name is Latin-1 and holds a newline.
    (root / f"notes_{LATIN1}\n.txt").write_text("an export note")
    os.symlink("loop_b", root / "loop_a")
    os.symlink("loop_a", root / "loop_b")
    os.symlink(root / "nowhere", root / "gone.dcm")
    os.mkfifo(root / "pipe")
    os.symlink(root / "tilted", root / "linked_folder")
    return root, {
        "symlink_loop": "loop_a",
        "dangling_symlink": "gone.dcm",
        "not_a_file": "pipe",
        "not_dicom": path_text(f"notes_{LATIN1}\n.txt"),
    }


def test_path_text_round_trips_any_name() -> None:
    names = [
        "axial/f01",
        "ünïcødé/名前.dcm",
        LATIN1,
        os.fsdecode(b"\xff\xfe/\x80x"),
        'x"y\\z',
        '"quoted"',
        "tab\there",
        "new\nline",
        "\x85c1",
        "",
    ]
    for name in names:
        text = path_text(name)
        assert fs_path(text) == name
        text.encode("utf-8")  # valid Unicode: Parquet, Zarr and CSV take it
        assert text.isprintable()
    assert path_text("axial/f01") == "axial/f01"  # ordinary names are their own text
    assert path_text(LATIN1 + ".dcm") == '"caf\\xe9.dcm"'
    assert path_text("new\nline") == '"new\\x0aline"'


def test_odd_entries_are_quarantined_and_the_run_goes_on(odd_source, tmp_path) -> None:
    root, odd = odd_source
    deep = _deep_file(root)
    store = tmp_path / "odd.zarr"
    summary = convert(ConvertConfig(root, store, shard_size=4), progress=False, client=None)
    s = open_store(store)
    q = s.quarantine.set_index("path")
    for reason, path in odd.items():
        assert q.at[path, "reason"] == reason, path
    assert q.at["linked_folder", "detail"].startswith("a symbolic link to a folder")
    assert q.at["loop_b", "reason"] == "symlink_loop"
    too_long = [p for p in q.index if q.at[p, "reason"] == "path_too_long"]
    assert len(too_long) == 1
    assert deep.startswith(too_long[0])
    # Six slices stored, one of them under its Latin-1 name, which maps back to the bytes on disk.
    assert s.n_slices == 6
    latin = [p for p in s.source_path if p.startswith('"')]
    assert latin == ['"axial/caf\\xe9.dcm"']
    assert os.fsencode(fs_path(latin[0])) == b"axial/caf\xe9.dcm"
    assert (root / fs_path(latin[0])).is_file()
    assert summary.quarantined == s.quarantine["reason"].value_counts().to_dict()
    report = verify_store(store)
    assert report.ok, str(report)
    # The CSV is valid UTF-8 and one line per row.
    csv = pd.read_csv(quarantine_csv_path(store), keep_default_na=False, encoding="utf-8")
    assert len(csv) == len(s.quarantine)
    # A second run finds the same entries and reports nothing new.
    again = convert(ConvertConfig(root, store), progress=False, client=None)
    assert again.n_new == 0
    assert again.quarantined == {}
    assert len(open_store(store).quarantine) == len(s.quarantine)


def test_walk_reports_what_is_not_a_regular_file(odd_source) -> None:
    root, odd = odd_source
    tree = walk(root)
    reasons = {path: reason for path, reason, _ in tree.odd}
    for reason, path in odd.items():
        if reason != "not_dicom":
            assert reasons[path] == reason
    assert odd["not_dicom"] in tree.files
    assert all(f.isprintable() for f in tree.files)


def _convert_in_process(src: Path, store: Path) -> dict:
    """The conversion's stages without a cluster; what the store holds and what `verify` says."""
    finalize(convert_shards(plan(scan(src), store, shard_size=4), None))
    s = open_store(store)
    return {
        "n_slices": s.n_slices,
        "quarantine": s.quarantine.to_dict("records"),
        "verify": str(verify_store(store)),
    }


def _as_user(uid: int, gid: int, fn: Callable[[], dict]) -> dict:
    """`fn()` in a forked child that has dropped root for `uid`/`gid`; its result or its traceback.

    Forked, not a new interpreter: the test's Python may live where that user cannot read it (under
    /root), and everything the child runs is already imported.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            payload = json.dumps({"ok": fn()})
            code = 0
        except BaseException:
            payload = json.dumps({"error": traceback.format_exc()})
        finally:
            with os.fdopen(w, "w") as f:
                f.write(payload)
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = json.loads(f.read() or '{"error": "the child wrote nothing"}')
    os.waitpid(pid, 0)
    assert "error" not in data, data["error"]
    return data["ok"]


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
@pytest.mark.skipif(_nobody() is None, reason="no user 'nobody' to drop privileges to")
def test_an_unreadable_folder_is_quarantined_for_a_user_who_cannot_read_it(convert_inputs) -> None:
    """As root every folder is readable: the conversion runs in a child as `nobody`.

    The folder and the file `nobody` cannot read are set aside; the rest is stored and verifies.
    """
    nobody = _nobody()
    assert nobody is not None
    top = Path(tempfile.mkdtemp(prefix="ich-odd-"))
    try:
        os.chmod(top, 0o755)
        src, store = top / "src", top / "out" / "s.zarr"
        convert_inputs.write_case(src, "axial", np.random.default_rng(2), n=3)
        (src / "locked").mkdir()
        (src / "locked" / "secret.dcm").write_bytes(b"x")
        (src / "axial" / "no_read.dcm").write_bytes(b"x")
        for p in [src, *src.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(src / "locked", 0o700)
        os.chmod(src / "axial" / "no_read.dcm", 0o600)
        (top / "out").mkdir()
        os.chown(top / "out", nobody.pw_uid, nobody.pw_gid)
        _convert_in_process(src, top / "warm.zarr")  # as root: imports and compiles what the child runs
        out = _as_user(nobody.pw_uid, nobody.pw_gid, lambda: _convert_in_process(src, store))
        q = {row["path"]: row for row in out["quarantine"]}
        assert out["n_slices"] == 3
        assert q["locked"]["reason"] == "unreadable_path"
        assert "Permission denied" in q["locked"]["detail"]
        assert q["axial/no_read.dcm"]["reason"] == "unreadable_path"
        assert out["verify"].endswith(": OK"), out["verify"]
    finally:
        shutil.rmtree(top)
